"""A minimal pyfuse3 + trio passthrough filesystem: SOURCE mirrored on MOUNTPOINT.

    python tools/passthrough.py SOURCE MOUNTPOINT [--foreground] [--debug]

Why: it is the ceiling for a Python FUSE filesystem in the benchmarks (issue
#9 wants sharedfs measured against it and against ext4 in the same run).
Every request crosses the kernel and pyfuse3 as sharedfs's do, with
the same mount options, timeouts and capabilities (sharedfs.mount.fuse_options
and sharedfs.fuse_ops.Operations), and then does the least a filesystem can:
one or two os calls on the host filesystem.  Those calls run on the event
loop, blocking it, as pyfuse3's examples/passthroughfs.py (Nikolaus Rath's,
which this follows) does: nothing is faster for one request at a time, so
that is the honest ceiling, though a slow disk stalls every other request.

Inode numbers are the host's (SOURCE itself is the root inode); each one
known to the kernel maps to its paths under SOURCE, several for hard links.

Without --foreground it goes to the background once the mount is up: when
the command returns 0, the mount is usable.  `fusermount3 -u MOUNTPOINT`,
SIGTERM and SIGINT end it with exit 0, unmounted.

Left out: mknod, extended attributes, ACLs, locks, fallocate,
copy_file_range, rename flags (RENAME_NOREPLACE/EXCHANGE give EINVAL, so
tools fall back to a plain rename), `.` and `..` in readdir, O_DIRECT on the
host (Python's buffers are not aligned; the kernel still bypasses its own
page cache), flush (pyfuse3 answers ENOSYS once, and the kernel stops
sending it), inode generations (0, as in the example: a host inode number
reused while the kernel holds an unlinked file open under it would be taken
for that file).  SOURCE must hold one host filesystem (inode numbers from
mounts beneath it would collide; so would a host inode 1 other than SOURCE)
and must not change beside the mount while it is up.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pyfuse3
import trio

from sharedfs.fuse_ops import CACHE_TIMEOUT
from sharedfs.mount import fuse_options as sharedfs_fuse_options
from sharedfs.mount import unblocked_fuse_reads

log = logging.getLogger("passthrough")

R = TypeVar("R")


def fuse_errors(
    fn: Callable[..., Coroutine[Any, Any, R]],
) -> Callable[..., Coroutine[Any, Any, R]]:
    """OSError -> FUSEError: anything else leaving a handler ends pyfuse3.main()."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> R:
        try:
            return await fn(*args)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    return wrapper


class Passthrough(pyfuse3.Operations):
    """The kernel's inodes and handles on the host's paths and fds.

    File handles are host fds, one per open; directory handles index a
    listing taken when a readdir starts at offset 0."""

    # The capabilities sharedfs asks for (sharedfs.fuse_ops.Operations).
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, source: bytes) -> None:
        super().__init__()
        self._source = source
        self._root_ino = os.lstat(source).st_ino
        self._paths: dict[int, set[bytes]] = {pyfuse3.ROOT_INODE: {source}}
        self._lookups: dict[int, int] = {}
        self._fds: dict[int, int] = {}  # open fd -> inode
        self._dirs: dict[int, tuple[int, list[bytes]]] = {}  # dir handle -> inode, listing
        self._next_dir = 1

    # -- inodes and paths --------------------------------------------------
    def _ino(self, st: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if st.st_ino == self._root_ino else st.st_ino

    def _path(self, ino: int) -> bytes:
        try:
            return next(iter(self._paths[ino]))
        except (KeyError, StopIteration):
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent), name)

    def _remember(self, path: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """The entry for a reply that adds one to the kernel's lookup count."""
        ino = self._ino(st)
        self._paths.setdefault(ino, set()).add(path)
        self._lookups[ino] = self._lookups.get(ino, 0) + 1
        return self._entry(st)

    def _entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._ino(st)
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        e.attr_timeout = CACHE_TIMEOUT
        e.entry_timeout = CACHE_TIMEOUT
        return e

    def _stat(self, ino: int) -> os.stat_result:
        if self._paths.get(ino):
            return os.lstat(self._path(ino))
        # Unlinked but still open: only an fd reaches it (rare, so a scan).
        for fd, open_ino in self._fds.items():
            if open_ino == ino:
                return os.fstat(fd)
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _forget_path(self, path: bytes, st: os.stat_result) -> None:
        self._paths.get(self._ino(st), set()).discard(path)

    def _chown(self, path: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Give a new entry to its creator; skipped when that is us, which
        saves a syscall and lets a mount by a user create at all."""
        if (ctx.uid, ctx.gid) != (os.geteuid(), os.getegid()):
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)

    # -- names -------------------------------------------------------------
    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        if name == b".":
            path = parent
        elif name == b"..":
            # The root's parent is the root: nothing above SOURCE shows.
            path = parent if parent_inode == pyfuse3.ROOT_INODE else os.path.dirname(parent)
        else:
            path = os.path.join(parent, name)
        return self._remember(path, os.lstat(path))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            left = self._lookups.pop(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
            elif ino != pyfuse3.ROOT_INODE:
                self._paths.pop(ino, None)

    @fuse_errors
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self._stat(inode))

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # The fd when the kernel gives one (ftruncate of an unlinked file);
        # a path is not followed (chown and utimes of a symlink are its own).
        target = self._path(inode) if fh is None else fh
        nofollow = {"follow_symlinks": False} if fh is None else {}
        if fields.update_size:
            os.truncate(target, attr.st_size)
        if fields.update_mode:  # never for a symlink: Linux has no lchmod
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid, **nofollow)
        if fields.update_atime or fields.update_mtime:
            atime, mtime = attr.st_atime_ns, attr.st_mtime_ns
            if not (fields.update_atime and fields.update_mtime):
                # os.utime sets both: the one not asked for stays as it is.
                old = os.stat(target, **nofollow)
                atime = atime if fields.update_atime else old.st_atime_ns
                mtime = mtime if fields.update_mtime else old.st_mtime_ns
            os.utime(target, ns=(atime, mtime), **nofollow)
        return self._entry(os.stat(target, **nofollow))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(self._path(inode))

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mkdir(path, mode)
        self._chown(path, ctx)
        return self._remember(path, os.lstat(path))

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.symlink(target, path)
        self._chown(path, ctx)
        return self._remember(path, os.lstat(path))

    @fuse_errors
    async def link(
        self, inode: int, new_parent: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        return self._remember(path, os.lstat(path))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        os.unlink(path)
        self._forget_path(path, st)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        os.rmdir(path)
        self._forget_path(path, st)

    @fuse_errors
    async def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # os has no renameat2
        old = self._child(parent_old, name_old)
        new = self._child(parent_new, name_new)
        moved = os.lstat(old)
        try:
            replaced: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            replaced = None
        os.rename(old, new)
        if replaced is not None and replaced.st_ino == moved.st_ino:
            return  # two links to one inode: rename(2) leaves both
        if replaced is not None:
            self._forget_path(new, replaced)
        if stat.S_ISDIR(moved.st_mode):
            self._move_tree(old, new)
        else:
            paths = self._paths.get(self._ino(moved), set())
            paths.discard(old)
            paths.add(new)

    def _move_tree(self, old: bytes, new: bytes) -> None:
        """A renamed directory takes the paths of all it holds along: the
        kernel keeps their inodes and asks for them by number."""
        under = old + b"/"
        for paths in self._paths.values():
            for p in [p for p in paths if p == old or p.startswith(under)]:
                paths.discard(p)
                paths.add(new + p[len(old) :])

    # -- files -------------------------------------------------------------
    def _handle(self, fd: int, st: os.stat_result) -> pyfuse3.FileInfo:
        self._fds[fd] = self._ino(st)
        # keep_cache as sharedfs: pages stay cached across opens.
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # O_TRUNC comes here too (libfuse asks for atomic O_TRUNC).
        fd = os.open(self._path(inode), host_flags(flags))
        return self._handle(fd, os.fstat(fd))

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = os.open(path, host_flags(flags) | os.O_CREAT, mode)
        try:
            self._chown(path, ctx)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return self._handle(fd, st), self._remember(path, st)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    @fuse_errors
    async def release(self, fh: int) -> None:
        del self._fds[fh]
        os.close(fh)

    # -- directories -------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._path(inode)  # ENOENT now rather than at the first readdir
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = (inode, [])
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino, names = self._dirs[fh]
        path = self._path(ino)
        if start_id == 0:
            # A listing per pass (rewinddir starts a new one), so that an
            # offset is an index into it: no entry skipped or repeated,
            # hard links included, whatever changes meanwhile.
            names = os.listdir(path)
            self._dirs[fh] = (ino, names)
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # removed since the listing
            if not pyfuse3.readdir_reply(token, names[i], self._entry(st), i + 1):
                return
            self._remember(child, st)

    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self._path(self._dirs[fh][0]), os.O_RDONLY | os.O_DIRECTORY)
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            os.close(fd)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = os.statvfs(self._source)
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.f_bsize
        out.f_frsize = s.f_frsize
        out.f_blocks = s.f_blocks
        out.f_bfree = s.f_bfree
        out.f_bavail = s.f_bavail
        out.f_files = s.f_files
        out.f_ffree = s.f_ffree
        out.f_favail = s.f_favail
        out.f_namemax = s.f_namemax
        return out


def host_flags(flags: int) -> int:
    """The kernel's open flags, for the host: O_DIRECT would need aligned
    buffers, which Python's are not."""
    return flags & ~os.O_DIRECT


def fuse_options(source: str, debug: bool) -> set[str]:
    """sharedfs's own options (the same, not a copy that could drift),
    named for this filesystem."""
    opts = sharedfs_fuse_options(source, ["debug"] if debug else [])  # debug: every request
    opts.discard("subtype=sharedfs")
    opts.add("subtype=passthrough")
    return opts


async def serve() -> bool:
    """Answer requests until the kernel ends the session (an unmount: False)
    or a signal comes (True: still mounted)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            signalled = trio.Event()
            nursery.start_soon(terminate_on, signals, signalled)
            with unblocked_fuse_reads():  # as sharedfs's loop: see there
                await pyfuse3.main()
            nursery.cancel_scope.cancel()
    return signalled.is_set()


async def terminate_on(signals: AsyncIterator[int], signalled: trio.Event) -> None:
    async for signum in signals:
        log.info("signal %d: unmounting", signum)
        signalled.set()
        pyfuse3.terminate()
        return


def daemonize() -> None:
    """Leave the caller: pyfuse3.init has mounted, so the parent exits 0 and
    requests wait in the kernel until the child serves them."""
    if os.fork():
        os._exit(0)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="passthrough.py", description="Mirror SOURCE on MOUNTPOINT through FUSE."
    )
    p.add_argument("source", help="directory to mirror")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    p.add_argument("--debug", action="store_true", help="log every request (to stderr)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    source = os.path.realpath(args.source)  # the root is a directory, not a link
    if not os.path.isdir(source):
        sys.exit(f"passthrough: {source}: not a directory")
    # Modes come from the kernel with the caller's umask applied: ours must
    # not take more away.
    os.umask(0)
    ops = Passthrough(os.fsencode(source))
    try:
        pyfuse3.init(ops, os.path.abspath(args.mountpoint), fuse_options(source, args.debug))
    except RuntimeError as e:
        sys.exit(f"passthrough: {args.mountpoint}: cannot mount: {e}")
    if not args.foreground:
        daemonize()
    unmount = True  # until the kernel says it unmounted
    try:
        unmount = trio.run(serve)
    finally:
        pyfuse3.close(unmount=unmount)


if __name__ == "__main__":
    main()
