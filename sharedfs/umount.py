"""`sharedfs umount`: unmount a host and wait until its volume is clean.

`fusermount3 -u` returns as soon as the kernel lets go, while the host is
still writing back; this command waits for the host process to finish, so a
following fsck or mount finds the volume clean.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .cli_util import Parser, run_tool
from .errors import QuietError
from .storage import open_volume
from .volume import live_slots, open_superblock, read_slot, slot_is_live

WAIT_SECONDS = 120.0


def mounted_volume(mountpoint: str) -> str:
    """The volume mounted at `mountpoint` (from /proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, source = right.split()[:2]
            if fields[4] == mountpoint and fstype == "fuse.sharedfs":
                return source
    raise QuietError(f"{mountpoint}: no sharedfs volume is mounted there", 32)


def umount(args: argparse.Namespace) -> None:
    mountpoint = os.path.abspath(args.mountpoint)
    volume = mounted_volume(mountpoint)
    storage = open_volume(volume)
    try:
        sb = open_superblock(storage)
        nodes = [
            n for n, s in live_slots(storage, sb, watch=0).items() if s.mountpoint == mountpoint
        ]
        cmd = ["fusermount3", "-u"] + (["-z"] if args.lazy else []) + [mountpoint]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise QuietError(f"{mountpoint}: {r.stderr.strip() or 'fusermount3 failed'}", 32)
        deadline = time.monotonic() + WAIT_SECONDS
        while any(slot_is_live(read_slot(storage, sb, n)) for n in nodes):
            if time.monotonic() > deadline:
                raise QuietError(f"{mountpoint}: unmounted, but the host is still writing back", 1)
            time.sleep(0.05)
    finally:
        storage.close()


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="sharedfs umount", description=__doc__.splitlines()[0])
    p.add_argument("mountpoint")
    p.add_argument("-z", "--lazy", action="store_true", help="detach even if busy")
    run_tool(umount, p.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
