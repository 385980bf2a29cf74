"""The filesystem core: inodes, directories, block maps, allocation; no pyfuse3.

`FileSystem` has one async method per operation, keyed by inode number; it
returns plain `Attr` values and raises `FsError(errno)`.  Every block it
touches comes from the buffer cache in the mode it needs.  Operations run one
at a time on a host (the `_op` lock): Python gains little from interleaving
them, and it keeps every buffer a handler holds valid until the handler ends.
"""

from __future__ import annotations

import errno
import logging
import random
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import trio

from . import format as fmt
from .agent import OpRetry
from .cache import BlockCache, Buffer
from .errors import CorruptVolume, FsError, StorageError
from .format import BlockType, DirEntry, Inode
from .journal import Log
from .link import LinkClosed
from .protocol import Mode

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
MAX_HEIGHT = 5
#: Blocks read ahead of a sequential reader: one lock request and one
#: storage read per MiB rather than per FUSE request (128 KiB), which on a
#: cold volume waited in turn for both (docs/BENCHMARKS.md, readings).
READ_AHEAD_BYTES = 1 << 20
#: How long an operation that finds the volume full waits for the kernel to
#: forget files unlinked while it still referred to them (FileSystem.run).
ENOSPC_WAIT = 2.0
MAX_DIR_DEPTH = 24  # bucket table of 16M slots
DOT_COOKIE = 1
DOTDOT_COOKIE = 2


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    generation: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int  # in 512-byte units, as stat(2) counts
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    blocks: int
    free_blocks: int
    files: int
    free_files: int
    namemax: int = fmt.MAX_NAME


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who asks: the caller's uid and gid (from the FUSE request)."""

    uid: int = 0
    gid: int = 0


def _dtype(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


def operation(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run a public FileSystem method as one operation (see FileSystem.run)."""

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        self: FileSystem = args[0]  # type: ignore[assignment]
        return await self.run(fn, *args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class FileSystem:
    """Attributes:
    sb: the volume's superblock.
    cache: the buffer cache every block access goes through.
    host: this host's id (for logs and allocation preferences).
    lookups: kernel lookup counts per inode; an unlinked inode lives on
        until its count drops to zero.
    """

    def __init__(self, sb: fmt.Superblock, cache: BlockCache, host: int = 0) -> None:
        self.sb = sb
        self.cache = cache
        self.host = host
        # Every operation that changes metadata is one transaction in it.
        self.log = Log(cache, sb, host)
        self.bs = sb.block_size
        self.ptrs = fmt.ptrs_per_block(self.bs)
        self.lookups: dict[int, int] = {}
        # Unlinked while the kernel still knows them: freed when it forgets.
        self._kept_unlinked: set[int] = set()
        self._freed = trio.Event()
        self._refs: list[tuple[int, int, bytes]] = []
        # Names the kernel may have cached under each directory: what must be
        # invalidated when the directory's blocks go to another host.
        self.names: dict[int, set[bytes]] = {}
        self._op = trio.Lock()
        self.retries = 0
        # The inodes the running operation has read: one object per inode.
        self._op_inodes: dict[int, Inode] = {}
        # Next physical block to try for each file, so sequential writes
        # land on adjacent blocks (and go to storage in one call).
        self._goal: dict[int, int] = {}
        # Per file being read sequentially: the logical block its reader
        # comes to next, and how far ahead of it the cache already holds.
        self._reading: dict[int, tuple[int, int]] = {}
        # Per group, inode table blocks known formatted: the count only
        # grows, so what we saw once committed holds, and reading an inode
        # need not take the group's inode bitmap (which the host
        # allocating there holds in X) every time.
        self._itable_known: dict[int, int] = {}

    def _undo(self) -> None:
        self._op_inodes.clear()
        self._refs.clear()
        self.cache.abort_op()

    @property
    def fenced(self) -> bool:
        """This host lost its lease (or its master): everything is EIO."""
        return bool(self.cache.fenced)

    async def run(self, fn: Callable[..., Awaitable[T]], *args: object, **kwargs: object) -> T:
        """Run `fn` as one operation (_run).  One that finds the volume full
        while files unlinked with the kernel still referring to them hold
        space runs once more when the kernel has let go of them (it does
        soon after the unlink, on its own time: `rm big; cp other .` must
        not fail on it), or after ENOSPC_WAIT."""
        try:
            return await self._run(fn, *args, **kwargs)
        except FsError as e:
            if e.errno != errno.ENOSPC or not self._kept_unlinked:
                raise
        with trio.move_on_after(ENOSPC_WAIT):
            while self._kept_unlinked:
                await self._freed.wait()
        return await self._run(fn, *args, **kwargs)

    async def _run(self, fn: Callable[..., Awaitable[T]], *args: object, **kwargs: object) -> T:
        """Run `fn` under the host's operation lock, as one cache operation:
        if another host needs a block it holds while it waits, the cache undoes
        it and it runs again.  Then let the cache write back or evict (no
        buffer is in use between operations)."""
        start = None
        while True:
            if self.fenced:
                raise FsError(errno.EIO, f"this host is fenced: {self.cache.fenced}")
            await self.log.wait_for_room()
            async with self._op:
                self.cache.begin_op(start)
                start = self.cache.op_start
                try:
                    try:
                        result = await fn(*args, **kwargs)
                    except (OpRetry, CorruptVolume):
                        raise
                    except BaseException:
                        # Blocks a failed operation allocated are recorded in
                        # the inodes it changed so far: store those too.
                        await self._store_inodes()
                        raise
                    await self._store_inodes()
                    self.cache.check_op()
                except OpRetry:
                    self._undo()
                    self.retries += 1
                except CorruptVolume as e:
                    self.cache.end_op()
                    log.error("host %d: corrupt metadata: %s", self.host, e)
                    raise FsError(errno.EIO, str(e)) from e
                except BaseException:
                    # Failed or cancelled midway: what it changed stays, not
                    # logged (the next operation's records carry it).
                    # Undoing it instead made crash replays in
                    # tests/t3_journal.py now and then leave a wrong link
                    # count; not yet understood (issue #4 notes).
                    self._refs.clear()
                    self.cache.end_op()
                    raise
                else:
                    self.log.commit(self.cache.op_changes(), self.cache.op_freed())
                    self._apply_refs()
                    self.cache.end_op()
                    await self.cache.trim()
                    return result
            # Give the host we yielded to a moment to take the block.
            await trio.sleep(random.uniform(0, 0.002))

    # ==================================================================
    # Inodes

    async def _iget(self, ino: int, mode: Mode = Mode.S) -> Inode:
        """The inode, as one object for the whole operation (changes made to
        it are stored when the operation ends)."""
        inode = self._op_inodes.get(ino)
        if inode is not None:
            if mode is Mode.X:
                await self.cache.get(self.sb.inode_location(ino)[0], Mode.X, BlockType.INODES)
            if inode.mode == 0:
                raise FsError(errno.ENOENT)
            return inode
        if not self.sb.valid_ino(ino):
            raise FsError(errno.ENOENT)
        blk, off = self.sb.inode_location(ino)
        g = self.sb.group_of_inode(ino)
        index = blk - self.sb.itable_start(g)
        if index >= self._itable_known.get(g, 0) and index >= await self._itable_init(g):
            raise FsError(errno.ENOENT)
        buf = await self.cache.get(blk, mode, BlockType.INODES)
        inode = Inode.unpack_from(ino, buf.data, off)
        if inode.mode == 0:
            raise FsError(errno.ENOENT)
        self._op_inodes[ino] = inode
        return inode

    async def _iput(self, inode: Inode) -> None:
        self._op_inodes[inode.ino] = inode
        blk, off = self.sb.inode_location(inode.ino)
        packed = bytearray(fmt.INODE_SIZE)
        inode.pack_into(packed, 0)
        # Compare under S: operations that only read must not take X.
        buf = await self.cache.get(blk, Mode.S, BlockType.INODES)
        if buf.data[off : off + fmt.INODE_SIZE] != packed:
            buf = await self.cache.get(blk, Mode.X, BlockType.INODES)
            buf.data[off : off + fmt.INODE_SIZE] = packed
            self.cache.mark_dirty(buf)

    async def _store_inodes(self) -> None:
        """End of an operation: store every inode it changed."""
        try:
            for inode in self._op_inodes.values():
                await self._iput(inode)
        finally:
            self._op_inodes.clear()

    async def _itable_init(self, g: int) -> int:
        buf = await self.cache.get(self.sb.ibitmap_block(g), Mode.S, BlockType.IBITMAP)
        n = fmt.itable_initialized(buf.data)
        if not self.cache.in_flux(buf.blockno):
            self._itable_known[g] = max(self._itable_known.get(g, 0), n)
        return n

    def attr(self, inode: Inode) -> Attr:
        return Attr(
            ino=inode.ino,
            generation=inode.generation,
            mode=inode.mode,
            nlink=inode.nlink,
            uid=inode.uid,
            gid=inode.gid,
            rdev=inode.rdev,
            size=inode.size,
            blksize=self.bs,
            blocks=inode.blocks * (self.bs // 512),
            atime_ns=inode.atime_ns,
            mtime_ns=inode.mtime_ns,
            ctime_ns=inode.ctime_ns,
        )

    async def _ialloc(self, parent: Inode | None, mode: int, ctx: Ctx) -> Inode:
        """A new inode near its parent, in this host's share of the groups
        (hosts allocating side by side then touch different bitmap and inode
        table blocks); directories spread out further."""
        ng = self.sb.group_count
        # Our share: `width` groups from `lo`.  A file goes in its parent's
        # group when that is ours, else in ours at the same place; a
        # directory in the next of ours.  (Fewer groups than host slots: no
        # group of our own; next to the parent, shifted by our number.)
        width = max(1, ng // self.sb.host_slots)
        lo = (self.host * width) % ng
        if parent is None:
            g0 = 0
        else:
            pg = self.sb.group_of_inode(parent.ino)
            if width == 1:
                g0 = pg + lo + (1 if stat.S_ISDIR(mode) else 0)
            elif stat.S_ISDIR(mode):
                g0 = lo + (pg + 1) % width
            elif lo <= pg < lo + width:
                g0 = pg
            else:
                g0 = lo + pg % width
            g0 %= ng
        for k in range(ng):
            g = (g0 + k) % ng
            buf = await self.cache.get(self.sb.ibitmap_block(g), Mode.X, BlockType.IBITMAP)
            if fmt.bitmap_free_count(buf.data) == 0:
                continue
            idx = fmt.find_clear_bit(buf.data, self.sb.inodes_per_group)
            if idx < 0:
                raise CorruptVolume(f"group {g}: inode bitmap full but counted free")
            await self._format_itable_upto(g, buf, idx // self.sb.inodes_per_block)
            fmt.bit_set(buf.data, idx)
            fmt.set_bitmap_free_count(buf.data, fmt.bitmap_free_count(buf.data) - 1)
            self.cache.mark_dirty(buf)
            ino = g * self.sb.inodes_per_group + idx + 1
            blk, off = self.sb.inode_location(ino)
            old = Inode.unpack_from(
                ino, (await self.cache.get(blk, Mode.X, BlockType.INODES)).data, off
            )
            now = time.time_ns()
            gid = ctx.gid
            if parent is not None and parent.mode & stat.S_ISGID:
                gid = parent.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            inode = self._op_inodes[ino] = Inode(
                ino,
                mode=mode,
                uid=ctx.uid,
                gid=gid,
                nlink=1,
                atime_ns=now,
                mtime_ns=now,
                ctime_ns=now,
                generation=old.generation + 1,
            )
            return inode
        raise FsError(errno.ENOSPC)

    async def _format_itable_upto(self, g: int, ibm: Buffer, blk_index: int) -> None:
        done = fmt.itable_initialized(ibm.data)
        for k in range(done, blk_index + 1):
            self.cache.new(self.sb.itable_start(g) + k, BlockType.INODES)
        if blk_index + 1 > done:
            fmt.set_itable_initialized(ibm.data, blk_index + 1)

    async def _ifree(self, inode: Inode) -> None:
        """Release an inode and everything it owns."""
        await self._truncate_blocks(inode, 0)
        if inode.xattr_block:
            await self._free_blocks([inode.xattr_block], [inode.xattr_block])
        g, idx = divmod(inode.ino - 1, self.sb.inodes_per_group)
        buf = await self.cache.get(self.sb.ibitmap_block(g), Mode.X, BlockType.IBITMAP)
        if fmt.bit_test(buf.data, idx):
            fmt.bit_clear(buf.data, idx)
            fmt.set_bitmap_free_count(buf.data, fmt.bitmap_free_count(buf.data) + 1)
            self.cache.mark_dirty(buf)
        await self._iput(Inode(inode.ino, generation=inode.generation))
        self._goal.pop(inode.ino, None)

    # ==================================================================
    # Block allocation

    async def _alloc_blocks(self, inode: Inode, count: int) -> list[int]:
        """`count` free blocks, adjacent where possible, charged to `inode`."""
        goal = self._goal.get(inode.ino) or self.sb.group_start(self.sb.group_of_inode(inode.ino))
        got: list[int] = []
        ng = self.sb.group_count
        g0 = min(max(self.sb.group_of_block(goal), 0), ng - 1)
        try:
            for k in range(ng):
                g = (g0 + k) % ng
                buf = await self.cache.get(self.sb.bitmap_block(g), Mode.X, BlockType.BITMAP)
                free = fmt.bitmap_free_count(buf.data)
                if free == 0:
                    continue
                gs = self.sb.group_start(g)
                nbits = self.sb.group_blocks(g)
                start = goal - gs if k == 0 and gs <= goal < gs + nbits else 0
                taken = 0
                while len(got) < count and taken < free:
                    first, n = fmt.find_clear_run(buf.data, nbits, start, count - len(got))
                    if first < 0:
                        break
                    for i in range(first, first + n):
                        fmt.bit_set(buf.data, i)
                    got.extend(range(gs + first, gs + first + n))
                    taken += n
                    start = first + n
                if taken:
                    fmt.set_bitmap_free_count(buf.data, free - taken)
                    self.cache.mark_dirty(buf)
                if len(got) == count:
                    break
            if len(got) < count:
                raise FsError(errno.ENOSPC)
        except BaseException:
            if got:
                await self._free_blocks(got)
            raise
        inode.blocks += count
        self._goal[inode.ino] = got[-1] + 1
        return got

    async def _free_blocks(self, blocks: list[int], metadata: Iterable[int] = ()) -> None:
        """Give blocks back to their groups; those of `metadata` are revoked
        in the log (a replay must not write their old contents over what
        they hold next)."""
        self.cache.revoke(metadata)
        by_group: dict[int, list[int]] = {}
        for b in blocks:
            if not self.sb.is_data_block(b):
                raise CorruptVolume(f"block pointer {b} is outside the data area")
            by_group.setdefault(self.sb.group_of_block(b), []).append(b)
        for g, bs in sorted(by_group.items()):
            buf = await self.cache.get(self.sb.bitmap_block(g), Mode.X, BlockType.BITMAP)
            gs = self.sb.group_start(g)
            freed = 0
            for b in bs:
                if fmt.bit_test(buf.data, b - gs):
                    fmt.bit_clear(buf.data, b - gs)
                    freed += 1
                self.cache.discard(b)
            fmt.set_bitmap_free_count(buf.data, fmt.bitmap_free_count(buf.data) + freed)
            self.cache.mark_dirty(buf)

    async def _alloc_meta(self, inode: Inode, btype: BlockType) -> Buffer:
        (b,) = await self._alloc_blocks(inode, 1)
        return self.cache.new(b, btype)

    # ==================================================================
    # Block maps (radix tree of INDIRECT blocks under the inode's roots)

    async def _grow_height(self, inode: Inode, end_lbn: int) -> None:
        while fmt.map_capacity(self.bs, inode.height) < end_lbn:
            if inode.height >= MAX_HEIGHT:
                raise FsError(errno.EFBIG)
            if any(inode.roots):
                node = await self._alloc_meta(inode, BlockType.INDIRECT)
                for i, p in enumerate(inode.roots):
                    fmt.set_ptr(node.data, i, p)
                inode.roots = [node.blockno] + [0] * (fmt.N_ROOTS - 1)
            inode.height += 1

    async def _map(
        self, inode: Inode, start: int, n: int, *, alloc: bool = False
    ) -> tuple[list[int], set[int]]:
        """Physical blocks of logical blocks [start, start+n): 0 for holes.

        With `alloc`, holes get fresh blocks (returned in the second value,
        which the caller must initialize); the caller stores the inode.
        """
        fresh: set[int] = set()
        if alloc:
            await self._grow_height(inode, start + n)
        cap = fmt.map_capacity(self.bs, inode.height)
        end = min(start + n, cap)
        out: list[int] = []
        if start < end:
            await self._map_node(
                inode, None, inode.height + 1, start, end - start, alloc, out, fresh
            )
        out.extend([0] * (n - len(out)))
        return out, fresh

    async def _map_node(
        self,
        inode: Inode,
        buf: Buffer | None,
        level: int,
        rem: int,
        cnt: int,
        alloc: bool,
        out: list[int],
        fresh: set[int],
    ) -> None:
        """Walk a node (`buf`, or the inode's roots when None) whose children
        each cover ptrs**(level-1) logical blocks."""

        def get(i: int) -> int:
            return inode.roots[i] if buf is None else fmt.get_ptr(buf.data, i)

        def put(i: int, v: int) -> None:
            if buf is None:
                inode.roots[i] = v
            else:
                fmt.set_ptr(buf.data, i, v)
                self.cache.mark_dirty(buf)

        if level == 1:  # children are data blocks
            ptrs = [get(i) for i in range(rem, rem + cnt)]
            if alloc:
                holes = [k for k, p in enumerate(ptrs) if p == 0]
                if holes:
                    if buf is not None and buf.mode is not Mode.X:
                        buf = await self.cache.get(buf.blockno, Mode.X, BlockType.INDIRECT)
                    new = await self._alloc_blocks(inode, len(holes))
                    for b in new:
                        # Zeroed now: if a later part of this walk fails, the
                        # block stays mapped and must read as a hole did.
                        self.cache.new(b)
                    for k, b in zip(holes, new, strict=True):
                        ptrs[k] = b
                        put(rem + k, b)
                    fresh.update(new)
            for p in ptrs:
                if p and not self.sb.is_data_block(p):
                    raise CorruptVolume(f"inode {inode.ino}: block pointer {p} out of range")
            out.extend(ptrs)
            return
        span = self.ptrs ** (level - 1)
        i, r = divmod(rem, span)
        while cnt > 0:
            c = min(cnt, span - r)
            child = get(i)
            if child == 0 and not alloc:
                out.extend([0] * c)
            else:
                if child == 0:
                    cbuf = await self._alloc_meta(inode, BlockType.INDIRECT)
                    put(i, cbuf.blockno)
                else:
                    if not self.sb.is_data_block(child):
                        raise CorruptVolume(
                            f"inode {inode.ino}: indirect pointer {child} out of range"
                        )
                    cbuf = await self.cache.get(
                        child, Mode.X if alloc else Mode.S, BlockType.INDIRECT
                    )
                cbuf.owner = inode.ino
                await self._map_node(inode, cbuf, level - 1, r, c, alloc, out, fresh)
            cnt -= c
            i += 1
            r = 0

    async def _truncate_blocks(self, inode: Inode, keep: int) -> None:
        """Free every block at logical index >= keep (and emptied indirects)."""
        freed: list[int] = []
        indirect: list[int] = []
        span = self.ptrs**inode.height
        for i in range(fmt.N_ROOTS):
            p = inode.roots[i]
            if p and await self._prune(p, inode.height, i * span, keep, freed, indirect):
                inode.roots[i] = 0
        if freed:
            # A directory's blocks are metadata as its map blocks are.
            await self._free_blocks(freed, freed if stat.S_ISDIR(inode.mode) else indirect)
            inode.blocks -= len(freed)

    async def _prune(
        self, ptr: int, level: int, base: int, keep: int, freed: list[int], indirect: list[int]
    ) -> bool:
        """Free the part >= keep of the subtree at `ptr` (level 0: a data
        block) covering from `base`; True if the whole subtree went."""
        if not self.sb.is_data_block(ptr):
            raise CorruptVolume(f"block pointer {ptr} out of range")
        if base >= keep:
            await self._collect(ptr, level, freed, indirect)
            return True
        if level == 0:
            return False
        buf = await self.cache.get(ptr, Mode.X, BlockType.INDIRECT)
        span = self.ptrs ** (level - 1)
        changed = False
        for i, c in enumerate(fmt.all_ptrs(buf.data, self.bs)):
            cbase = base + i * span
            if (
                c
                and cbase + span > keep
                and await self._prune(c, level - 1, cbase, keep, freed, indirect)
            ):
                fmt.set_ptr(buf.data, i, 0)
                changed = True
        if changed:
            self.cache.mark_dirty(buf)
        return False

    async def _collect(self, ptr: int, level: int, freed: list[int], indirect: list[int]) -> None:
        freed.append(ptr)
        if level == 0:
            return
        indirect.append(ptr)
        buf = await self.cache.get(ptr, Mode.S, BlockType.INDIRECT)
        for c in fmt.all_ptrs(buf.data, self.bs):
            if c:
                if not self.sb.is_data_block(c):
                    raise CorruptVolume(f"block pointer {c} out of range")
                await self._collect(c, level - 1, freed, indirect)

    # ==================================================================
    # File data

    async def _read_data(self, inode: Inode, off: int, size: int) -> bytes:
        end = min(off + size, inode.size)
        if off >= end:
            return b""
        first, last = off // self.bs, (end - 1) // self.bs
        n = last - first + 1
        ahead = self._read_ahead(inode, first, last)
        pbns, _ = await self._map(inode, first, n + ahead)
        present = [p for p in pbns if p]
        bufs = {b.blockno: b for b in await self.cache.get_many(present, Mode.S)} if present else {}
        for b in bufs.values():
            b.owner = inode.ino
        zero = bytes(self.bs)
        chunks = [bufs[p].data if p else zero for p in pbns[:n]]
        data = b"".join(chunks)
        skip = off - first * self.bs
        return data[skip : skip + end - off]

    def _read_ahead(self, inode: Inode, first: int, last: int) -> int:
        """How many blocks past `last` to read with [first, last]: a window
        when the read goes on where the last one ended and has come to the
        end of what was read ahead, else none."""
        nxt, until = self._reading.pop(inode.ino, (-1, -1))
        ahead = 0
        if first == nxt and last >= until:
            blocks = -(-inode.size // self.bs)
            ahead = max(0, min(READ_AHEAD_BYTES // self.bs, blocks - last - 1))
            until = last + ahead
        if first == 0 or first == nxt:
            if len(self._reading) >= 256:  # the oldest reader goes
                del self._reading[next(iter(self._reading))]
            self._reading[inode.ino] = (last + 1, until)
        return ahead

    async def _write_data(self, inode: Inode, off: int, data: bytes | memoryview) -> None:
        if not data:
            return
        end = off + len(data)
        first, last = off // self.bs, (end - 1) // self.bs
        pbns, fresh = await self._map(inode, first, last - first + 1, alloc=True)
        mv = memoryview(data)
        pos = 0
        for k, p in enumerate(pbns):
            lbn = first + k
            bstart = max(off, lbn * self.bs) - lbn * self.bs
            bend = min(end, (lbn + 1) * self.bs) - lbn * self.bs
            if p in fresh:
                buf = await self.cache.get(p, Mode.X)  # zeroed by _map
            elif bstart == 0 and bend == self.bs:
                buf = await self.cache.overwrite(p)
            else:
                buf = await self.cache.get(p, Mode.X)
            buf.data[bstart:bend] = mv[pos : pos + bend - bstart]
            pos += bend - bstart
            buf.owner = inode.ino
            self.cache.mark_dirty(buf)
        if end > inode.size:
            inode.size = end

    async def _set_size(self, inode: Inode, size: int) -> None:
        if size < inode.size:
            keep = -(-size // self.bs)
            await self._truncate_blocks(inode, keep)
            if size % self.bs:
                # Zero the tail of the last block so a later extension reads zeros.
                (p,), _ = await self._map(inode, size // self.bs, 1)
                if p:
                    buf = await self.cache.get(p, Mode.X)
                    buf.data[size % self.bs :] = bytes(self.bs - size % self.bs)
                    self.cache.mark_dirty(buf)
        elif size > fmt.map_capacity(self.bs, MAX_HEIGHT) * self.bs:
            raise FsError(errno.EFBIG)
        inode.size = size

    # ==================================================================
    # Directories (extendible hashing; see format.py)

    async def _dblock(self, dino: Inode, lbn: int, mode: Mode, btype: BlockType) -> Buffer:
        (p,), _ = await self._map(dino, lbn, 1)
        if p == 0:
            raise CorruptVolume(f"directory {dino.ino}: block {lbn} missing")
        buf = await self.cache.get(p, mode, btype)
        buf.owner = dino.ino
        return buf

    async def _dnew(self, dino: Inode, lbn: int, btype: BlockType) -> Buffer:
        (p,), fresh = await self._map(dino, lbn, 1, alloc=True)
        if p not in fresh:
            raise CorruptVolume(f"directory {dino.ino}: block {lbn} already allocated")
        buf = self.cache.new(p, btype)
        buf.owner = dino.ino
        return buf

    async def _table_get(self, dino: Inode, hdr: Buffer, i: int, mode: Mode) -> int:
        lbn, off = fmt.table_slot_location(self.bs, i)
        blk = hdr if lbn == 0 else await self._dblock(dino, lbn, mode, BlockType.DIRTABLE)
        return fmt.get_u32(blk.data, off)

    async def _table_set(self, dino: Inode, hdr: Buffer, i: int, v: int) -> None:
        lbn, off = fmt.table_slot_location(self.bs, i)
        if lbn == 0:
            blk = hdr
        else:
            (p,), _ = await self._map(dino, lbn, 1)
            if p:
                blk = await self.cache.get(p, Mode.X, BlockType.DIRTABLE)
            else:
                blk = await self._dnew(dino, lbn, BlockType.DIRTABLE)
        fmt.set_u32(blk.data, off, v)
        self.cache.mark_dirty(blk)

    async def _bucket_for(self, dino: Inode, h: int, mode: Mode) -> tuple[Buffer, Buffer, int, int]:
        """(header, bucket, global depth, table index) for hash h."""
        hdr = await self._dblock(dino, 0, mode, BlockType.DIRHDR)
        depth = fmt.read_dirhdr(hdr.data)[0]
        idx = h >> (fmt.HASH_BITS - depth) if depth else 0
        blbn = await self._table_get(dino, hdr, idx, mode)
        bucket = await self._dblock(dino, blbn, mode, BlockType.DIRBUCKET)
        return hdr, bucket, depth, idx

    async def _dir_init(self, dino: Inode) -> None:
        hdr = await self._dnew(dino, 0, BlockType.DIRHDR)
        bucket = await self._dnew(dino, 1, BlockType.DIRBUCKET)
        fmt.pack_bucket(bucket.data, 0, [])
        fmt.write_dirhdr(hdr.data, 0, 2, 0)
        fmt.set_u32(hdr.data, fmt.table_slot_location(self.bs, 0)[1], 1)
        dino.size = 2 * self.bs

    async def _dir_find(self, dino: Inode, name: bytes) -> DirEntry | None:
        h = fmt.name_hash(name)
        _, bucket, _, _ = await self._bucket_for(dino, h, Mode.S)
        return fmt.bucket_find(bucket.data, h, name, bucket.blockno)

    async def _dir_add(self, dino: Inode, name: bytes, ino: int, mode: int) -> None:
        h = fmt.name_hash(name)
        while True:
            hdr, bucket, depth, idx = await self._bucket_for(dino, h, Mode.X)
            if fmt.bucket_find(bucket.data, h, name, bucket.blockno) is not None:
                raise FsError(errno.EEXIST)
            seq = fmt.bucket_next_seq(bucket.data, h, bucket.blockno)
            new = DirEntry((h << 16) | seq, ino, _dtype(mode), name)
            if fmt.bucket_append(bucket.data, new, bucket.blockno):
                self.cache.mark_dirty(bucket)
                d, nb, count = fmt.read_dirhdr(hdr.data)
                fmt.write_dirhdr(hdr.data, d, nb, count + 1)
                self.cache.mark_dirty(hdr)
                return
            ldepth, entries = fmt.unpack_bucket(bucket.data, bucket.blockno)
            await self._split(dino, hdr, bucket, depth, idx, ldepth, entries)

    async def _split(
        self,
        dino: Inode,
        hdr: Buffer,
        bucket: Buffer,
        depth: int,
        idx: int,
        ldepth: int,
        entries: list[DirEntry],
    ) -> None:
        if ldepth == depth:
            if depth >= MAX_DIR_DEPTH:
                raise FsError(errno.ENOSPC, "directory hash table is full")
            # Double the table: slot i's bucket now serves slots 2i and 2i+1.
            for i in reversed(range(1 << depth)):
                v = await self._table_get(dino, hdr, i, Mode.X)
                await self._table_set(dino, hdr, 2 * i + 1, v)
                await self._table_set(dino, hdr, 2 * i, v)
            depth += 1
            idx = idx * 2
            _, nb, count = fmt.read_dirhdr(hdr.data)
            fmt.write_dirhdr(hdr.data, depth, nb, count)
            self.cache.mark_dirty(hdr)
        _, nb, count = fmt.read_dirhdr(hdr.data)
        if nb >= fmt.TABLE_BASE:
            raise FsError(errno.ENOSPC, "directory has too many buckets")
        newb = await self._dnew(dino, nb, BlockType.DIRBUCKET)
        fmt.write_dirhdr(hdr.data, depth, nb + 1, count)
        self.cache.mark_dirty(hdr)
        bit = fmt.HASH_BITS - 1 - ldepth
        stay = [e for e in entries if not (e.hash >> bit) & 1]
        move = [e for e in entries if (e.hash >> bit) & 1]
        fmt.pack_bucket(bucket.data, ldepth + 1, stay)
        fmt.pack_bucket(newb.data, ldepth + 1, move)
        self.cache.mark_dirty(bucket)
        dino.size = max(dino.size, (nb + 1) * self.bs)
        # The slots that pointed at the old bucket: its prefix range; the
        # upper half of it now points at the new bucket.
        width = 1 << (depth - ldepth)
        lo = (idx // width) * width
        for i in range(lo + width // 2, lo + width):
            await self._table_set(dino, hdr, i, nb)

    async def _dir_remove(self, dino: Inode, name: bytes) -> DirEntry:
        h = fmt.name_hash(name)
        hdr, bucket, _, _ = await self._bucket_for(dino, h, Mode.X)
        ldepth, entries = fmt.unpack_bucket(bucket.data, bucket.blockno)
        for e in entries:
            if e.name == name:
                fmt.pack_bucket(bucket.data, ldepth, [x for x in entries if x is not e])
                self.cache.mark_dirty(bucket)
                d, nb, count = fmt.read_dirhdr(hdr.data)
                fmt.write_dirhdr(hdr.data, d, nb, count - 1)
                self.cache.mark_dirty(hdr)
                return e
        raise FsError(errno.ENOENT)

    async def _dir_replace(self, dino: Inode, name: bytes, ino: int, mode: int) -> None:
        """Point an existing entry at another inode (same name, same size)."""
        h = fmt.name_hash(name)
        _, bucket, _, _ = await self._bucket_for(dino, h, Mode.X)
        ldepth, entries = fmt.unpack_bucket(bucket.data, bucket.blockno)
        out = [
            DirEntry(e.cookie, ino, _dtype(mode), name) if e.name == name else e for e in entries
        ]
        fmt.pack_bucket(bucket.data, ldepth, out)
        self.cache.mark_dirty(bucket)

    async def _dir_count(self, dino: Inode) -> int:
        hdr = await self._dblock(dino, 0, Mode.S, BlockType.DIRHDR)
        return fmt.read_dirhdr(hdr.data)[2]

    async def _dir_entries(self, dino: Inode, after: int) -> AsyncIterator[DirEntry]:
        """Entries with cookie > after, in cookie order."""
        hdr = await self._dblock(dino, 0, Mode.S, BlockType.DIRHDR)
        depth = fmt.read_dirhdr(hdr.data)[0]
        h = (after + 1) >> 16
        idx = h >> (fmt.HASH_BITS - depth) if depth else 0
        while idx < (1 << depth):
            blbn = await self._table_get(dino, hdr, idx, Mode.S)
            bucket = await self._dblock(dino, blbn, Mode.S, BlockType.DIRBUCKET)
            ldepth, entries = fmt.unpack_bucket(bucket.data, bucket.blockno)
            for e in entries:  # unpack_bucket sorts by cookie
                if e.cookie > after:
                    yield e
            width = 1 << (depth - min(ldepth, depth))
            idx = (idx // width + 1) * width

    # ==================================================================
    # Helpers for the operations

    async def _dir(self, ino: int, mode: Mode = Mode.S) -> Inode:
        inode = await self._iget(ino, mode)
        if not stat.S_ISDIR(inode.mode):
            raise FsError(errno.ENOTDIR)
        if inode.nlink == 0 and mode is Mode.X:
            # Removed (by another host, say) while still someone's working
            # directory: nothing new may appear in it.
            raise FsError(errno.ENOENT)
        return inode

    @staticmethod
    def _name(name: bytes) -> bytes:
        if len(name) > fmt.MAX_NAME:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)
        return name

    def _touch(self, inode: Inode, *, m: bool = True, c: bool = True) -> None:
        now = time.time_ns()
        if m:
            inode.mtime_ns = now
        if c:
            inode.ctime_ns = now

    def _ref(self, ino: int, parent: int = 0, name: bytes = b"") -> None:
        """The kernel will know inode `ino` (as `name` in `parent`) once the
        operation succeeds: counted then, so a retried one counts once."""
        self._refs.append((ino, parent, name))

    def _apply_refs(self) -> None:
        for ino, parent, name in self._refs:
            self.lookups[ino] = self.lookups.get(ino, 0) + 1
            if parent:
                self.names.setdefault(parent, set()).add(name)
        self._refs.clear()

    async def _drop_link(self, inode: Inode) -> None:
        """One fewer name for `inode`; free it once unreachable and unused."""
        inode.nlink -= 1
        inode.ctime_ns = time.time_ns()
        if inode.nlink <= 0 and not self.lookups.get(inode.ino):
            await self._ifree(inode)
        else:
            if inode.nlink <= 0:
                self._kept_unlinked.add(inode.ino)
            await self._iput(inode)

    async def _new_node(
        self, parent_ino: int, name: bytes, mode: int, ctx: Ctx, rdev: int = 0
    ) -> Inode:
        name = self._name(name)
        parent = await self._dir(parent_ino, Mode.X)
        if await self._dir_find(parent, name) is not None:
            raise FsError(errno.EEXIST)
        inode = await self._ialloc(parent, mode, ctx)
        inode.rdev = rdev
        try:
            if stat.S_ISDIR(mode):
                inode.nlink = 2
                inode.parent = parent.ino
                await self._dir_init(inode)
            await self._iput(inode)
            await self._dir_add(parent, name, inode.ino, mode)
        except FsError:
            await self._ifree(inode)
            await self._iput(parent)  # blocks the failed add may have allocated
            raise
        if stat.S_ISDIR(mode):
            parent.nlink += 1
        self._touch(parent)
        await self._iput(parent)
        self._ref(inode.ino, parent.ino, name)
        return inode

    # ==================================================================
    # Operations

    @operation
    async def mkroot(self, ctx: Ctx, mode: int = 0o755) -> None:
        """Create the root directory on a freshly formatted volume (mkfs)."""
        root = await self._ialloc(None, stat.S_IFDIR | mode, ctx)
        if root.ino != fmt.ROOT_INO:
            raise CorruptVolume("root inode is not the first inode")
        root.nlink = 2
        root.parent = fmt.ROOT_INO
        await self._dir_init(root)

    @operation
    async def lookup(self, parent: int, name: bytes) -> Attr:
        dino = await self._dir(parent)
        if name == b".":
            inode = dino
        elif name == b"..":
            inode = await self._iget(dino.parent)
        else:
            e = await self._dir_find(dino, name)
            if e is None:
                raise FsError(errno.ENOENT)
            inode = await self._iget(e.ino)
        self._ref(inode.ino, parent, name)
        return self.attr(inode)

    @operation
    async def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, n in items:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            await self._free_if_unlinked(ino)

    @operation
    async def getattr(self, ino: int) -> Attr:
        return self.attr(await self._iget(ino))

    @operation
    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attr:
        inode = await self._iget(ino, Mode.X)
        if size is not None:
            if stat.S_ISDIR(inode.mode):
                raise FsError(errno.EISDIR)
            if size != inode.size:
                await self._set_size(inode, size)
                self._touch(inode)
        if mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
        if uid is not None:
            inode.uid = uid
        if gid is not None:
            inode.gid = gid
        if atime_ns is not None:
            inode.atime_ns = atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
        inode.ctime_ns = ctime_ns if ctime_ns is not None else time.time_ns()
        await self._iput(inode)
        return self.attr(inode)

    @operation
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        return self.attr(await self._new_node(parent, name, mode, ctx, rdev))

    @operation
    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return self.attr(await self._new_node(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    @operation
    async def create(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        return self.attr(await self._new_node(parent, name, stat.S_IFREG | stat.S_IMODE(mode), ctx))

    @operation
    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        if len(target) >= self.bs:
            raise FsError(errno.ENAMETOOLONG)
        inode = await self._new_node(parent, name, stat.S_IFLNK | 0o777, ctx)
        try:
            await self._write_data(inode, 0, target)
        except FsError:
            await self._dir_remove(await self._dir(parent, Mode.X), name)
            await self._ifree(inode)
            raise
        await self._iput(inode)
        return self.attr(inode)

    @operation
    async def readlink(self, ino: int) -> bytes:
        inode = await self._iget(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return await self._read_data(inode, 0, inode.size)

    @operation
    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        new_name = self._name(new_name)
        inode = await self._iget(ino, Mode.X)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EPERM)
        parent = await self._dir(new_parent, Mode.X)
        await self._dir_add(parent, new_name, ino, inode.mode)
        self._touch(parent)
        await self._iput(parent)
        inode.nlink += 1
        self._touch(inode, m=False)
        await self._iput(inode)
        self._ref(ino, new_parent, new_name)
        return self.attr(inode)

    @operation
    async def unlink(self, parent: int, name: bytes) -> None:
        dino = await self._dir(parent, Mode.X)
        e = await self._dir_find(dino, name)
        if e is None:
            raise FsError(errno.ENOENT)
        inode = await self._iget(e.ino, Mode.X)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EISDIR)
        await self._dir_remove(dino, name)
        self._touch(dino)
        await self._iput(dino)
        await self._drop_link(inode)

    @operation
    async def rmdir(self, parent: int, name: bytes) -> None:
        dino = await self._dir(parent, Mode.X)
        e = await self._dir_find(dino, name)
        if e is None:
            raise FsError(errno.ENOENT)
        inode = await self._iget(e.ino, Mode.X)
        if not stat.S_ISDIR(inode.mode):
            raise FsError(errno.ENOTDIR)
        if await self._dir_count(inode):
            raise FsError(errno.ENOTEMPTY)
        await self._dir_remove(dino, name)
        dino.nlink -= 1
        self._touch(dino)
        await self._iput(dino)
        inode.nlink = 1  # the entry's link goes below; "." goes with the inode
        await self._drop_link(inode)

    @operation
    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise FsError(errno.EINVAL)
        new_name = self._name(new_name)
        src_dir = await self._dir(old_parent, Mode.X)
        dst_dir = src_dir if new_parent == old_parent else await self._dir(new_parent, Mode.X)
        src = await self._dir_find(src_dir, old_name)
        if src is None:
            raise FsError(errno.ENOENT)
        inode = await self._iget(src.ino, Mode.X)
        is_dir = stat.S_ISDIR(inode.mode)
        if is_dir and new_parent != old_parent:
            # Refuse to move a directory into itself or below it.
            p = dst_dir
            while True:
                if p.ino == inode.ino:
                    raise FsError(errno.EINVAL)
                if p.ino == fmt.ROOT_INO:
                    break
                p = await self._iget(p.parent)
        dst = await self._dir_find(dst_dir, new_name)
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if dst.ino == src.ino:
                return  # two names of one inode: POSIX says do nothing
            target = await self._iget(dst.ino, Mode.X)
            if stat.S_ISDIR(target.mode):
                if not is_dir:
                    raise FsError(errno.EISDIR)
                if await self._dir_count(target):
                    raise FsError(errno.ENOTEMPTY)
            elif is_dir:
                raise FsError(errno.ENOTDIR)
            await self._dir_replace(dst_dir, new_name, inode.ino, inode.mode)
            if stat.S_ISDIR(target.mode):
                dst_dir.nlink -= 1
                target.nlink = 1
            await self._dir_remove(src_dir, old_name)
            await self._drop_link(target)
        else:
            await self._dir_add(dst_dir, new_name, inode.ino, inode.mode)
            await self._dir_remove(src_dir, old_name)
        if is_dir and new_parent != old_parent:
            src_dir.nlink -= 1
            dst_dir.nlink += 1
            inode.parent = dst_dir.ino
        self._touch(src_dir)
        self._touch(dst_dir)
        self._touch(inode, m=False)
        # The kernel moves its dentry to the new name without a lookup: it
        # knows that name now, and must forget it when another host changes it.
        self.names.setdefault(new_parent, set()).add(new_name)
        await self._iput(inode)
        await self._iput(src_dir)
        if dst_dir is not src_dir:
            await self._iput(dst_dir)

    @operation
    async def open(self, ino: int) -> Attr:
        # O_TRUNC reaches us as setattr(size=0) before the open.
        return self.attr(await self._iget(ino))

    @operation
    async def read(self, ino: int, off: int, size: int) -> bytes:
        inode = await self._iget(ino)
        return await self._read_data(inode, off, size)

    @operation
    async def write(
        self, ino: int, off: int, data: bytes | memoryview, append: bool = False
    ) -> int:
        inode = await self._iget(ino, Mode.X)
        if append:
            off = inode.size
        if off + len(data) > fmt.map_capacity(self.bs, MAX_HEIGHT) * self.bs:
            raise FsError(errno.EFBIG)
        try:
            await self._write_data(inode, off, data)
            n = len(data)
        except FsError as e:
            if e.errno != errno.ENOSPC:
                raise
            # Like local filesystems, write what fits and report a short count.
            n = await self._write_what_fits(inode, off, data)
        self._touch(inode)
        return n

    async def _write_what_fits(self, inode: Inode, off: int, data: bytes | memoryview) -> int:
        done = 0
        mv = memoryview(data)
        while done < len(data):
            step = min(len(data) - done, self.bs - (off + done) % self.bs)
            try:
                await self._write_data(inode, off + done, mv[done : done + step])
            except FsError as e:
                if e.errno != errno.ENOSPC or done == 0:
                    raise
                break
            done += step
        return done

    async def fsync(self, ino: int, datasync: bool = False) -> None:
        """The file's data and every metadata change so far on storage.
        Data is not logged: the dirty data blocks go to storage themselves,
        before the log records that point at them (so that a crash never
        leaves metadata pointing at blocks whose data never arrived); the
        log makes the metadata durable, which stays in the cache."""
        await self.getattr(ino)
        wrote = await self.cache.flush(self.cache.dirty_data())
        if self.log.pending:
            # Records not yet durable, ours in the PLC or another task's
            # append under way: force() waits for both.
            await self.log.force()  # its storage flush covers the data too
        elif wrote:
            await self.cache.storage.flush()

    async def sync(self) -> None:
        await self.log.force()
        await self.cache.sync()

    @operation
    async def readdir(self, ino: int, after: int, limit: int = 256) -> list[tuple[DirEntry, Attr]]:
        """Up to `limit` entries with cookie > after, each with its attributes;
        "." and ".." come first, with cookies 1 and 2."""
        dino = await self._dir(ino)
        out: list[tuple[DirEntry, Attr]] = []
        if after < DOT_COOKIE:
            out.append((DirEntry(DOT_COOKIE, ino, _dtype(dino.mode), b"."), self.attr(dino)))
        if after < DOTDOT_COOKIE:
            parent = await self._iget(dino.parent)
            out.append(
                (DirEntry(DOTDOT_COOKIE, parent.ino, _dtype(parent.mode), b".."), self.attr(parent))
            )
        async with aclosing(self._dir_entries(dino, max(after, DOTDOT_COOKIE))) as entries:
            async for e in entries:
                if len(out) >= limit:
                    break
                try:
                    out.append((e, self.attr(await self._iget(e.ino))))
                except FsError:
                    log.error(
                        "host %d: directory %d: entry %r names a free inode", self.host, ino, e.name
                    )
        return out[:limit]

    def readdir_ref(self, ino: int, parent: int, name: bytes) -> None:
        """The kernel took an entry readdir returned: one more lookup."""
        self._ref(ino, parent, name)
        self._apply_refs()

    @operation
    async def statfs(self) -> StatFs:
        free = files_free = 0
        for g in range(self.sb.group_count):
            b = await self.cache.get(self.sb.bitmap_block(g), Mode.S, BlockType.BITMAP)
            i = await self.cache.get(self.sb.ibitmap_block(g), Mode.S, BlockType.IBITMAP)
            free += fmt.bitmap_free_count(b.data)
            files_free += fmt.bitmap_free_count(i.data)
        return StatFs(self.bs, self.sb.data_blocks, free, self.sb.inode_count, files_free)

    # -- extended attributes ---------------------------------------------

    async def _xattrs(
        self, inode: Inode, mode: Mode = Mode.S
    ) -> tuple[Buffer | None, dict[bytes, bytes]]:
        if not inode.xattr_block:
            return None, {}
        if not self.sb.is_data_block(inode.xattr_block):
            raise CorruptVolume(f"inode {inode.ino}: xattr block out of range")
        buf = await self.cache.get(inode.xattr_block, mode, BlockType.XATTR)
        return buf, fmt.unpack_xattrs(buf.data, buf.blockno)

    @operation
    async def getxattr(self, ino: int, name: bytes) -> bytes:
        _, xs = await self._xattrs(await self._iget(ino))
        if name not in xs:
            raise FsError(errno.ENODATA)
        return xs[name]

    @operation
    async def listxattr(self, ino: int) -> list[bytes]:
        _, xs = await self._xattrs(await self._iget(ino))
        return list(xs)

    @operation
    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if not name or len(name) > 255:
            raise FsError(errno.ERANGE)
        inode = await self._iget(ino, Mode.X)
        buf, xs = await self._xattrs(inode, Mode.X)
        xs[name] = value
        if fmt.xattrs_size(xs) > fmt.payload_size(self.bs):
            raise FsError(errno.ENOSPC)
        if buf is None:
            buf = await self._alloc_meta(inode, BlockType.XATTR)
            inode.xattr_block = buf.blockno
        fmt.pack_xattrs(buf.data, xs)
        self.cache.mark_dirty(buf)
        self._touch(inode, m=False)
        await self._iput(inode)

    @operation
    async def removexattr(self, ino: int, name: bytes) -> None:
        inode = await self._iget(ino, Mode.X)
        buf, xs = await self._xattrs(inode, Mode.X)
        if buf is None or name not in xs:
            raise FsError(errno.ENODATA)
        del xs[name]
        if xs:
            fmt.pack_xattrs(buf.data, xs)
            self.cache.mark_dirty(buf)
        else:
            await self._free_blocks([buf.blockno], [buf.blockno])
            inode.blocks -= 1
            inode.xattr_block = 0
        self._touch(inode, m=False)
        await self._iput(inode)

    # -- lifecycle -------------------------------------------------------

    async def write_back_every(self, interval: float) -> None:
        """The mount's write-back task: every interval a checkpoint (dirty
        blocks written, past images older than the last checkpoint covered
        through the master, the log's checkpoint moved past what is now on
        storage).  A fenced host stops quietly: it may write nothing more."""
        while True:
            await trio.sleep(interval)
            try:
                await self.log.checkpoint()
            except (StorageError, LinkClosed) as e:
                if self.fenced:
                    return
                # The next round tries again; what is dirty stays dirty.
                log.error("host %d: checkpoint failed: %s", self.host, e)

    async def trim_when_crowded(self) -> None:
        """The mount's task for blocks other hosts hand us (Handoff): they
        can take the cache past its capacity while no operation runs here
        to trim it after."""
        while True:
            await self.cache.crowded.wait()
            try:
                async with self._op:
                    await self.cache.trim()
            except (StorageError, LinkClosed) as e:
                if self.fenced:
                    return
                log.error("host %d: trimming the cache failed: %s", self.host, e)

    async def destroy(self) -> None:
        """Unmount: free inodes unlinked while open, write everything back,
        and leave nothing of ours that the log must keep."""
        await self._free_orphans()
        await self.sync()
        # Other hosts go on asking for our blocks, and each dirty one we ship
        # leaves a past image here.  Once we hold no block, none can: then
        # have every past image covered by a write of the newest copy.
        self.cache.drop_all()
        await self.cache.write_past_images()
        # Nothing of ours is unwritten now: our mark leaves the log header.
        await self.log.checkpoint()
        await self.cache.sync()
        self.cache.drop_all()
        if self.cache.dirty_count or self.cache.pis:
            # A Bye says all we changed is on storage.  Without one we leave
            # as a crashed host does: the master has the others rebuild what
            # we held from storage and the log (our records are all there).
            log.warning(
                "host %d: %d blocks and %d past images still unwritten at unmount: "
                "leaving them to recovery",
                self.host,
                self.cache.dirty_count,
                len(self.cache.pis),
            )
            return
        await self.cache.agent.bye()

    @operation
    async def _free_orphans(self) -> None:
        for ino in list(self.lookups):
            await self._free_if_unlinked(ino)
        self.lookups.clear()

    async def _free_if_unlinked(self, ino: int) -> None:
        """The kernel let go of `ino`: free it if no name reaches it any more."""
        if ino in self._kept_unlinked:
            self._kept_unlinked.discard(ino)
            self._freed.set()
            self._freed = trio.Event()
        try:
            inode = await self._iget(ino, Mode.X)
        except FsError:
            return
        if inode.nlink <= 0:
            await self._ifree(inode)
