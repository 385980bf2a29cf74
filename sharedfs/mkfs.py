"""`sharedfs mkfs`: lay out a fresh volume and create the root directory."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import time

import trio

from . import format as fmt
from . import journal
from .cli_util import Parser, parse_size, run_tool, setup_logging
from .errors import CorruptVolume, QuietError
from .fs import Ctx
from .host import open_host
from .progress import Progress
from .storage import Storage, open_volume
from .storage.uri import is_uri
from .volume import check_block_size, live_slots, read_backup_superblock, read_superblock

log = logging.getLogger(__name__)


def existing_volume(storage: Storage) -> fmt.Superblock | None:
    for reader in (read_superblock, read_backup_superblock):
        try:
            return reader(storage)
        except CorruptVolume:
            continue
    return None


async def format_volume(storage: Storage, sb: fmt.Superblock, *, quiet: bool = True) -> None:
    """Write the layout `sb` describes onto `storage`, then the root directory."""
    bs = sb.block_size
    # What the volume held is of no use now: a thin NBD export gets it back.
    await storage.trim(0, sb.volume_blocks * bs)
    for node in range(sb.host_slots):
        b = sb.hosts_start + node
        await storage.write(b * bs, fmt.HostSlot().pack(bs, b))
    # An empty log whose page numbers start at random: a page an older
    # filesystem left at the same place never passes for one of ours.
    area = journal.Area.of(sb)
    start = secrets.randbits(40) + 1
    header = journal.JournalHeader(start, start, [0] * sb.host_slots)
    await storage.write(area.header * bs, journal.encode_header(bs, area.header, header))
    await storage.write(sb.mirror_start * bs, bytes(bs * sb.mirror_blocks))
    progress = Progress("mkfs", sb.group_count)
    if quiet:
        progress.enabled = False
    for g in range(sb.group_count):
        await storage.write(sb.bitmap_block(g) * bs, _group_bitmaps(sb, g))
        progress.update(g + 1)
    progress.close()
    fs = open_host(storage, sb)
    await fs.mkroot(Ctx(os.getuid(), os.getgid()))
    await fs.destroy()  # on storage, and the log empty again
    # The superblock goes last, once the rest is durable: a volume
    # interrupted while being made is never taken for a sharedfs volume.
    await storage.flush()
    await storage.write(sb.backup_blockno * bs, sb.pack(sb.backup_blockno), fua=True)
    await storage.write(0, sb.pack(0), fua=True)


def _group_bitmaps(sb: fmt.Superblock, g: int) -> bytes:
    bs = sb.block_size
    bbm = bytearray(bs)
    for i in range(sb.group_overhead()):
        fmt.bit_set(bbm, i)
    fmt.set_bitmap_free_count(bbm, sb.group_blocks(g) - sb.group_overhead())
    fmt.seal(bbm, fmt.BlockType.BITMAP, sb.bitmap_block(g), 0)
    ibm = bytearray(bs)
    fmt.set_bitmap_free_count(ibm, sb.inodes_per_group)
    fmt.seal(ibm, fmt.BlockType.IBITMAP, sb.ibitmap_block(g), 0)
    return bytes(bbm + ibm)


def make_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sharedfs mkfs", description="Make a sharedfs volume.")
    p.add_argument(
        "volume", help="image file (created if missing), block device, or NBD URI (nbd://...)"
    )
    p.add_argument("--size", type=parse_size, help="volume size, e.g. 3G (required for a new file)")
    p.add_argument("--block-size", type=parse_size, default=fmt.DEFAULT_BLOCK_SIZE)
    p.add_argument("--nodes", type=int, default=8, help="host slots (default 8)")
    p.add_argument("--label", default="")
    p.add_argument("--force", action="store_true", help="overwrite an existing sharedfs volume")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def refuse_existing(storage: Storage, force: bool) -> None:
    """Never overwrite a sharedfs volume unasked, nor one that is mounted."""
    old = existing_volume(storage)
    if old is None:
        return
    if not force:
        raise QuietError(
            f"{storage.name}: already holds a sharedfs volume "
            f"(label {old.label!r}); use --force to overwrite it"
        )
    live = live_slots(storage, old)
    if live:
        raise QuietError(f"{storage.name}: is mounted by node {min(live)}; unmount it first")


def open_for_mkfs(volume: str, size: int | None, force: bool) -> Storage:
    """The volume, checked before anything is written; an image file is
    created or resized only after the check (resizing moves its end, where
    the backup superblock is)."""
    if is_uri(volume):
        storage = open_volume(volume)
        try:
            refuse_existing(storage, force)
        except BaseException:
            storage.close()
            raise
        return storage
    if size is None and not os.path.exists(volume):
        raise QuietError(f"{volume}: does not exist; give --size to create it", 2)
    if os.path.exists(volume):
        old = open_volume(volume)
        try:
            refuse_existing(old, force)
        finally:
            old.close()
    return open_volume(volume, create_size=size)


def mkfs(args: argparse.Namespace) -> None:
    storage = open_for_mkfs(args.volume, args.size, args.force)
    try:
        size = args.size or storage.size
        if size > storage.size:
            raise QuietError(f"{args.volume}: the volume is only {storage.size} bytes")
        try:
            sb = fmt.make_geometry(
                size,
                block_size=args.block_size,
                host_slots=args.nodes,
                label=args.label,
                created_ns=time.time_ns(),
                cluster_key=os.urandom(32),
            )
        except ValueError as e:
            raise QuietError(f"{args.volume}: {e}", 2) from None
        check_block_size(storage, sb.block_size)
        trio.run(lambda: format_volume(storage, sb, quiet=args.quiet))
    finally:
        storage.close()
    if not args.quiet:
        print(
            f"{args.volume}: sharedfs v{fmt.FORMAT_VERSION}, {sb.volume_blocks} blocks of "
            f"{sb.block_size} bytes, {sb.group_count} groups, {sb.inode_count} inodes, "
            f"{sb.host_slots} host slots, label {sb.label!r}"
        )


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.debug)
    run_tool(mkfs, args)


if __name__ == "__main__":
    main()
