"""The `sharedfs` command: one subcommand per tool module's main()."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

USAGE = """usage: sharedfs COMMAND [ARGS...]

commands:
  mkfs     make a volume                 (sharedfs mkfs VOLUME --size 3G)
  mount    mount a volume on this host   (sharedfs mount VOLUME MOUNTPOINT [--master H:P])
  master   run a volume's lock master    (sharedfs master VOLUME --listen HOST:PORT)
  umount   unmount and wait until clean  (sharedfs umount MOUNTPOINT)
  fsck     check and repair a volume     (sharedfs fsck -n|-y VOLUME)
  status   show a volume's cluster       (sharedfs status VOLUME [--master HOST:PORT] [--watch])
  journal  show a volume's log           (sharedfs journal VOLUME [--records])
  inspect  look inside a volume          (sharedfs inspect VOLUME superblock|inode N|path P|block N)
  mirror   keep a secondary in step      (sharedfs mirror attach|status|resync|verify|promote)

'sharedfs COMMAND --help' tells more."""


COMMANDS = ("mkfs", "mount", "master", "umount", "fsck", "status", "journal", "inspect", "mirror")


def _command(name: str) -> Callable[[list[str]], None]:
    # Import only the module asked for: `mkfs` need not load pyfuse3.
    module = importlib.import_module(f"sharedfs.{name}")
    return module.main  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        from . import __version__

        print(f"sharedfs {__version__}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        print(
            f"sharedfs: unknown command {argv[0]!r} ('sharedfs --help' lists them)", file=sys.stderr
        )
        sys.exit(2)
    _command(argv[0])(argv[1:])


if __name__ == "__main__":
    main()
