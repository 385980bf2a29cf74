"""The pyfuse3 Operations adapter: translates FUSE requests into FileSystem calls.

Nothing here decides filesystem semantics; it converts types (Attr ->
EntryAttributes), errors (FsError -> FUSEError; storage failures -> EIO), and
keeps file handles.  Only FUSEError may leave a handler: anything else would
end pyfuse3.main().  A failed read fails just its operation (which undoes
what it changed); a failed write closes the host's gate to storage, and the
host withdraws from the cluster (storage.fence): every later call gets EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from . import format as fmt
from .cache import Buffer
from .errors import FsError, StorageError
from .fs import Attr, Ctx, FileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Handle:
    ino: int
    append: bool


def fuse_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map every failure of a handler to a FUSEError."""

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> T:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            log.debug("host %d: %s%r: %s", self.fs.host, fn.__name__, args[:2], e)
            raise pyfuse3.FUSEError(e.errno) from None
        except StorageError as e:
            log.error("host %d: storage failed in %s: %s", self.fs.host, fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("host %d: internal error in %s", self.fs.host, fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


#: How long giving up a block waits for the kernel to drop its caches.  The
#: kernel can be stuck behind one of our own requests on the same inode (a
#: read holding a page lock while it waits for the block we are shipping):
#: then the block goes anyway and the invalidation lands a moment later.
INVALIDATE_TIMEOUT = 0.05
#: How long the kernel may keep entries and attributes: long, since a
#: change on another host invalidates them exactly (Invalidator).
CACHE_TIMEOUT = 60.0
_DIR_TYPES = {fmt.BlockType.DIRHDR, fmt.BlockType.DIRBUCKET, fmt.BlockType.DIRTABLE}


class Invalidator:
    """Drops what the kernel cached from a block before the block leaves this
    host: attributes of the inodes in an inode table block, pages of a file
    whose data or map block it is, entries of a directory whose block it is.
    Kernel notifications run in worker threads, never on the event loop."""

    def __init__(self, fs: FileSystem) -> None:
        self.fs = fs
        self.calls = 0
        self.timeouts = 0

    def _targets(self, buf: Buffer) -> list[tuple[Callable[..., None], tuple[Any, ...]]]:
        fs = self.fs
        if buf.btype is fmt.BlockType.INODES:
            first = _first_ino_of(fs, buf.blockno)
            return [
                (pyfuse3.invalidate_inode, (ino, True))
                for ino in range(first, first + fs.sb.inodes_per_block)
                if fs.lookups.get(ino)
            ]
        if not buf.owner:
            return []
        if buf.btype is fmt.BlockType.DIRBUCKET:
            # The names this bucket held, as far as the kernel knows them.
            known = fs.names.get(buf.owner, set())
            try:
                held = {e.name for e in fmt.unpack_bucket(buf.data, buf.blockno)[1]}
            except fmt.CorruptVolume:
                held = set(known)
            gone = known & held
            known -= gone
            calls: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
                (pyfuse3.invalidate_entry, (buf.owner, name)) for name in gone
            ]
            calls.append((pyfuse3.invalidate_inode, (buf.owner, True)))
            return calls
        if buf.btype in _DIR_TYPES:
            return [(pyfuse3.invalidate_inode, (buf.owner, True))]
        return [(pyfuse3.invalidate_inode, (buf.owner, False))]

    async def before_give_up(self, buf: Buffer) -> None:
        calls = self._targets(buf)
        if not calls:
            return
        self.calls += len(calls)
        with trio.move_on_after(INVALIDATE_TIMEOUT) as scope:
            await trio.to_thread.run_sync(_run_calls, calls, abandon_on_cancel=True)
        if scope.cancelled_caught:
            self.timeouts += 1
            log.info(
                "host %d: kernel invalidation for block %d still running", self.fs.host, buf.blockno
            )


def _first_ino_of(fs: FileSystem, blockno: int) -> int:
    sb = fs.sb
    g = sb.group_of_block(blockno)
    idx = (blockno - sb.itable_start(g)) * sb.inodes_per_block
    return g * sb.inodes_per_group + idx + 1


def _run_calls(calls: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> None:
    for fn, args in calls:
        while True:
            try:
                fn(*args)
            except InterruptedError:
                continue  # a signal (mount.unblocked_fuse_reads): not done yet
            except OSError:
                pass  # the kernel had already forgotten it
            break


def _ctx(ctx: pyfuse3.RequestContext) -> Ctx:
    return Ctx(ctx.uid, ctx.gid)


class Operations(pyfuse3.Operations):
    """Attributes:
    fs: the filesystem core.
    timeout: how long the kernel may cache attributes and entries.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: FileSystem, *, timeout: float = CACHE_TIMEOUT) -> None:
        super().__init__()
        self.fs = fs
        self.timeout = timeout
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.invalidator = Invalidator(fs)
        fs.cache.on_give_up = self.invalidator.before_give_up

    # -- conversions -----------------------------------------------------
    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = a.generation
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = a.size
        e.st_blksize = a.blksize
        e.st_blocks = a.blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        e.attr_timeout = self.timeout
        e.entry_timeout = self.timeout
        return e

    def _open_handle(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(ino, bool(flags & os.O_APPEND))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    # -- lifecycle -------------------------------------------------------
    def init(self) -> None:
        log.info("host %d: FUSE session started", self.fs.host)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # forget() must never raise: log and go on.
        try:
            await self.fs.forget(list(inode_list))
        except Exception:
            log.exception("host %d: forget failed", self.fs.host)

    # -- names -----------------------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._entry(await self.fs.lookup(parent_inode, name))

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._entry(await self.fs.getattr(inode))

    @fuse_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        a = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return self._entry(a)

    @fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.fs.readlink(inode)

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        return self._entry(await self.fs.mknod(parent_inode, name, mode, rdev, _ctx(ctx)))

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return self._entry(await self.fs.mkdir(parent_inode, name, mode, _ctx(ctx)))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.unlink(parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.rmdir(parent_inode, name)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return self._entry(await self.fs.symlink(parent_inode, name, target, _ctx(ctx)))

    @fuse_errors
    async def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(parent_old, name_old, parent_new, name_new, flags)

    @fuse_errors
    async def link(self, inode: int, new_parent: int, new_name: bytes, ctx: Any) -> Any:
        return self._entry(await self.fs.link(inode, new_parent, new_name))

    # -- files -----------------------------------------------------------
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        await self.fs.open(inode)
        if flags & os.O_TRUNC:
            # pyfuse3 asks for atomic O_TRUNC: the kernel leaves the
            # truncation of an existing file to us (`> file` in a shell).
            a = await self.fs.getattr(inode)
            if stat.S_ISREG(a.mode) and a.size:
                await self.fs.setattr(inode, size=0)
        return self._open_handle(inode, flags)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        try:
            a = await self.fs.create(parent_inode, name, mode, _ctx(ctx))
        except FsError as e:
            # Another host created it between the kernel's lookup and this
            # create: open(O_CREAT) without O_EXCL opens what is there.
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            a = await self.fs.lookup(parent_inode, name)
            if stat.S_ISDIR(a.mode):
                raise FsError(errno.EISDIR) from None
            if flags & os.O_TRUNC and a.size:
                a = await self.fs.setattr(a.ino, size=0)
        return self._open_handle(a.ino, flags), self._entry(a)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(self._handles[fh].ino, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handles[fh]
        return await self.fs.write(h.ino, off, buf, append=h.append)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(self._handles[fh].ino, datasync)

    # -- directories -----------------------------------------------------
    @fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        await self.fs.getattr(inode)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        after = start_id
        while True:
            batch = await self.fs.readdir(fh, after)
            if not batch:
                return
            for entry, attr in batch:
                if not pyfuse3.readdir_reply(token, entry.name, self._entry(attr), entry.cookie):
                    return
                if entry.name not in (b".", b".."):  # pyfuse3: no lookup for these
                    self.fs.readdir_ref(attr.ino, fh, entry.name)
                after = entry.cookie

    async def releasedir(self, fh: int) -> None:
        pass

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    @fuse_errors
    async def statfs(self, ctx: Any) -> Any:
        s = await self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.block_size
        out.f_frsize = s.block_size
        out.f_blocks = s.blocks
        out.f_bfree = s.free_blocks
        out.f_bavail = s.free_blocks
        out.f_files = s.files
        out.f_ffree = s.free_files
        out.f_favail = s.free_files
        out.f_namemax = s.namemax
        return out

    # -- extended attributes ---------------------------------------------
    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self.fs.setxattr(inode, name, value)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self.fs.getxattr(inode, name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.fs.listxattr(inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self.fs.removexattr(inode, name)
