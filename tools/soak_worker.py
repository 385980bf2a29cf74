"""One worker of `tools/torture soak` (started by tools/soak.py).

The worker owns a directory on one host's mount and keeps an exact model of
it in memory: every file's bytes, mode and link count, every symlink's
target, every directory's mode and entries.  It runs random POSIX operations
there (create, writes at offsets, overwrite, O_APPEND, truncate up and down,
rename, unlink, mkdir/rmdir, hard and symbolic links, chmod, fsync, calls
that must fail with a given errno) and after each one reads back what the
operation touched (entry, contents, its directory's listing) and compares it
with the model.  A mismatch or an unexpected errno is an error: one line in
the counters, after which the model is read back from the mount so that the
next error is a new one.

For the other hosts: now and then the worker publishes a file it will never
change again (path, size and xxh64 appended to its feed, a file outside the
filesystem) or a new name in the mount's shared directory; it reads the
feeds of workers on other hosts and checks, through its own mount, their
published files and that their names are in the shared directory's listing.

After --seconds it checks its whole directory once more, writes the model's
manifest (what a fresh mount must show), its counters, and exits 0; exit 1
means the worker itself broke.  Only the standard library and xxhash, so
that twelve of them start quickly.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import json
import os
import random
import signal
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import xxhash

#: Subdirectories of the runner's work directory (outside the filesystem).
FEEDS, STATS, MODELS = "feeds", "stats", "models"
#: The directory every worker of every host creates names in, at the mount's root.
SHARED = "shared"
#: In a worker's directory: the files it published, which nothing changes.
PUB = "pub"

#: Entries (files, links, directories) a worker keeps outside pub/: few
#: enough that reading back a whole directory after a step stays cheap.
MAX_ENTRIES = 40
MAX_FILE = 256 << 10
MAX_DEPTH = 3
MAX_PUBLISHED = 200
MAX_SHARED = 60
#: A worker stops after this many errors: past the first few they are
#: usually echoes of one fault, and the report shows the first ones.
MAX_ERRORS = 10
STATS_EVERY = 1.0
#: Sizes around the 4 KiB block and page boundaries, and a few larger.
SIZES = (0, 1, 100, 4095, 4096, 4097, 8192, 12289, 65536, 70001, 150000)
FILE_MODES = (0o600, 0o640, 0o644, 0o664, 0o700, 0o755, 0o444, 0o400)
DIR_MODES = (0o700, 0o750, 0o755, 0o775)

#: Relative frequency of each step.
WEIGHTS = {
    "create": 8,
    "write": 10,
    "overwrite": 4,
    "append": 8,
    "truncate": 5,
    "rename": 6,
    "unlink": 4,
    "mkdir": 2,
    "rmdir": 2,
    "link": 3,
    "symlink": 3,
    "chmod": 3,
    "fsync": 2,
    "read": 12,
    "refused": 3,
    "verify": 1,
    "publish": 2,
    "check_published": 4,
    "shared_create": 1,
    "shared_check": 2,
}


class Mismatch(Exception):
    """What the mount showed is not what the model says: one line."""


@dataclass(eq=False)
class File:
    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644
    nlink: int = 1


@dataclass(eq=False)
class Symlink:
    target: str


@dataclass(eq=False)
class Dir:
    entries: dict[str, Node] = field(default_factory=dict)
    mode: int = 0o755


Node = File | Symlink | Dir
#: An entry as compared: ["f", size, xxh64, mode, nlink], ["l", target] or
#: ["d", mode, nlink]; lists, so that a manifest read back from JSON compares.
Entry = list[Any]


def digest(data: bytes | bytearray) -> str:
    return xxhash.xxh64_hexdigest(data)


def model_entry(node: Node) -> Entry:
    if isinstance(node, File):
        return ["f", len(node.data), digest(node.data), node.mode, node.nlink]
    if isinstance(node, Symlink):
        return ["l", node.target]
    subdirs = sum(isinstance(n, Dir) for n in node.entries.values())
    return ["d", node.mode, 2 + subdirs]


def disk_entry(path: str) -> Entry:
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            data = f.read()
        # st_size and the bytes read are checked apart: the digest covers both.
        return ["f", st.st_size, digest(data), mode, st.st_nlink]
    if stat.S_ISLNK(st.st_mode):
        return ["l", os.readlink(path)]
    if stat.S_ISDIR(st.st_mode):
        return ["d", mode, st.st_nlink]
    return ["?", stat.S_IFMT(st.st_mode)]


def describe(e: Entry | None) -> str:
    if e is None:
        return "nothing"
    if e[0] == "f":
        return f"file of {e[1]} B xxh64 {e[2]} mode {e[3]:o} nlink {e[4]}"
    if e[0] == "l":
        return f"symlink to {e[1]!r}"
    if e[0] == "d":
        return f"directory mode {e[1]:o} nlink {e[2]}"
    return f"file type {e[1]:o}"


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def model_manifest(root: Dir) -> dict[str, Entry]:
    """Every path under `root` (relative) and its entry."""
    out: dict[str, Entry] = {}

    def walk(d: Dir, rel: str) -> None:
        for name, node in d.entries.items():
            out[join(rel, name)] = model_entry(node)
            if isinstance(node, Dir):
                walk(node, join(rel, name))

    walk(root, "")
    return out


def disk_manifest(top: str) -> dict[str, Entry]:
    """Every path under the directory `top` (relative) and its entry."""
    out: dict[str, Entry] = {}

    def walk(rel: str) -> None:
        for name in os.listdir(os.path.join(top, rel)):
            out[join(rel, name)] = e = disk_entry(os.path.join(top, rel, name))
            if e[0] == "d":
                walk(join(rel, name))

    walk("")
    return out


def manifest_diff(want: dict[str, Entry], got: dict[str, Entry]) -> str | None:
    """The first path where two manifests differ, as one line; None if equal."""
    for rel in sorted(want.keys() | got.keys()):
        if want.get(rel) != got.get(rel):
            return f"{rel}: want {describe(want.get(rel))}, got {describe(got.get(rel))}"
    return None


def load_tree(top: str) -> Dir:
    """The model of what is under `top` now (after an error, to go on from:
    right or wrong, what the mount shows becomes what the model expects)."""
    by_ino: dict[int, File] = {}

    def load(path: str) -> Dir:
        d = Dir(mode=stat.S_IMODE(os.lstat(path).st_mode))
        for name in os.listdir(path):
            sub = os.path.join(path, name)
            st = os.lstat(sub)
            if stat.S_ISDIR(st.st_mode):
                d.entries[name] = load(sub)
            elif stat.S_ISLNK(st.st_mode):
                d.entries[name] = Symlink(os.readlink(sub))
            else:
                # st_nlink, not the names found: what the mount says, also
                # when it is wrong, so that one fault is reported once.
                f = by_ino.get(st.st_ino)
                if f is None:
                    with open(sub, "rb") as fh:
                        f = File(bytearray(fh.read()), stat.S_IMODE(st.st_mode), st.st_nlink)
                    by_ino[st.st_ino] = f
                d.entries[name] = f
        return d

    return load(top)


def put(buf: bytearray, off: int, data: bytes) -> None:
    """pwrite() on the model: a write past the end leaves a hole of zeros
    (one of no bytes changes nothing, also past the end)."""
    if not data:
        return
    if off > len(buf):
        buf.extend(bytes(off - len(buf)))
    buf[off : off + len(data)] = data


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def worker_host(name: str) -> int:
    """'h2-t0' -> 2."""
    return int(name.split("-")[0][1:])


def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    """One write (or pwrite) call; a short write is an error on a local-size write."""
    n = os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)
    if n != len(data):
        raise Mismatch(f"wrote {n} of {len(data)} bytes")


def expect_errno(want: int, fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except OSError as e:
        if e.errno != want:
            raise Mismatch(f"want {errno.errorcode[want]}, got {errname(e)}") from None
        return
    raise Mismatch(f"want {errno.errorcode[want]}, but it succeeded")


class Feed:
    """The feeds: what each worker published, one file per worker in the
    work directory.  Ours is appended to with one write() per line; the
    others' are read from where we left off, a torn last line kept for
    later.  Only workers on other hosts count."""

    def __init__(self, top: str, me: str) -> None:
        self.top = top
        self.host = worker_host(me)
        self._fd = os.open(os.path.join(top, f"{me}.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._offsets: dict[str, int] = {}
        self._rest: dict[str, bytes] = {}
        #: (path below the mount's root, size, xxh64) of published files.
        self.files: list[tuple[str, int, str]] = []
        #: Names created in the shared directory.
        self.names: list[str] = []

    def publish(self, line: str) -> None:
        os.write(self._fd, f"{line}\n".encode())

    def refresh(self) -> None:
        for fname in sorted(os.listdir(self.top)):
            if worker_host(fname) == self.host:
                continue
            with open(os.path.join(self.top, fname), "rb") as f:
                f.seek(self._offsets.get(fname, 0))
                chunk = f.read()
            self._offsets[fname] = self._offsets.get(fname, 0) + len(chunk)
            *lines, self._rest[fname] = (self._rest.get(fname, b"") + chunk).split(b"\n")
            for line in lines:
                self._take(line.decode().split())

    def _take(self, parts: list[str]) -> None:
        if parts[0] == "F":
            self.files.append((parts[1], int(parts[2]), parts[3]))
        else:
            self.names.append(parts[1])


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.me: str = args.name
        self.mnt: str = args.mnt
        self.root = os.path.join(args.mnt, self.me)
        self.shared = os.path.join(args.mnt, SHARED)
        self.work: str = args.work
        # Local steps draw from `rng` only, so that a seed replays a worker's
        # own sequence; what it reads of other hosts depends on timing.
        self.rng = random.Random(args.seed)
        self.xrng = random.Random(args.seed + 1_000_003)
        self.tree = Dir()
        self.feed = Feed(os.path.join(args.work, FEEDS), self.me)
        self.ops: Counter[str] = Counter()
        self.cross: Counter[str] = Counter()
        self.errors: list[str] = []
        self.n_errors = 0
        self.seq = 0
        self.published = 0
        self.shared_names: list[str] = []
        #: Published files and shared names found wrong or missing once: a
        #: fault is reported once, not again at every later check.
        self.lost: set[str] = set()
        self.doing = ""
        self._stats_at = 0.0

    # -- the loop ---------------------------------------------------------------------
    def run(self, seconds: float, skip: set[str]) -> None:
        self.guarded("mkdir", self.start)
        deadline = time.monotonic() + seconds
        kinds = [k for k in WEIGHTS if k not in skip]
        weights = [WEIGHTS[k] for k in kinds]
        while time.monotonic() < deadline and self.n_errors < MAX_ERRORS:
            kind = self.rng.choices(kinds, weights)[0]
            self.guarded(kind, getattr(self, f"op_{kind}"))
            if time.monotonic() - self._stats_at >= STATS_EVERY:
                self.write_stats(done=False)
        self.guarded("verify", self.op_verify)
        self.write_json(MODELS, model_manifest(self.tree))
        self.write_stats(done=True)

    def start(self) -> bool:
        self.doing = f"mkdir {self.me} and {self.me}/{PUB}"
        os.mkdir(self.root, 0o755)
        os.mkdir(os.path.join(self.root, PUB), 0o755)
        self.tree.entries[PUB] = Dir()
        self.check(PUB)
        return True

    def guarded(self, kind: str, op: Callable[[], bool]) -> None:
        """Run one step; count it if it found something to act on."""
        self.doing = ""
        try:
            if op():
                self.ops[kind] += 1
        except Mismatch as e:
            self.fail(f"{self.me} {kind} {self.doing}: {e}")
        except OSError as e:
            where = f" on {e.filename}" if e.filename else ""
            self.fail(f"{self.me} {kind} {self.doing}: unexpected {errname(e)}{where}")

    def fail(self, what: str) -> None:
        self.n_errors += 1
        self.errors.append(what)
        print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)
        try:
            self.tree = load_tree(self.root)
        except OSError as e:
            self.errors.append(f"{self.me}: its directory cannot be read back: {errname(e)}")
            self.n_errors = MAX_ERRORS

    def write_stats(self, *, done: bool) -> None:
        self._stats_at = time.monotonic()
        self.write_json(
            STATS,
            {
                "name": self.me,
                "done": done,
                "ops": dict(self.ops),
                "errors": self.n_errors,
                "first_errors": self.errors,
                "cross": dict(self.cross),
                "published": self.published,
                "shared": len(self.shared_names),
            },
        )

    def write_json(self, sub: str, obj: object) -> None:
        """Replaced whole (rename), so the runner never reads half a file."""
        path = os.path.join(self.work, sub, f"{self.me}.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(obj, f)
        os.replace(f"{path}.tmp", path)

    # -- the model --------------------------------------------------------------------
    def abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def lookup(self, rel: str) -> Node:
        node: Node = self.tree
        for part in rel.split("/") if rel else ():
            assert isinstance(node, Dir)
            node = node.entries[part]
        return node

    def dir(self, rel: str) -> Dir:
        d = self.lookup(rel)
        assert isinstance(d, Dir), rel
        return d

    def parent(self, rel: str) -> tuple[str, Dir, str]:
        head, _, name = rel.rpartition("/")
        return head, self.dir(head), name

    def nodes(self) -> Iterator[tuple[str, Node]]:
        """Everything the steps may change: all but pub/ and the root."""

        def walk(d: Dir, rel: str) -> Iterator[tuple[str, Node]]:
            for name, node in d.entries.items():
                sub = join(rel, name)
                if sub == PUB:
                    continue
                yield sub, node
                if isinstance(node, Dir):
                    yield from walk(node, sub)

        return walk(self.tree, "")

    def pick(self, kind: type | tuple[type, ...]) -> tuple[str, Any] | None:
        found = [(rel, n) for rel, n in self.nodes() if isinstance(n, kind)]
        return self.rng.choice(found) if found else None

    def pick_dir(self, avoid: str | None = None) -> str:
        """The root or a directory below it, not inside `avoid`."""
        dirs = [""] + [rel for rel, n in self.nodes() if isinstance(n, Dir)]
        if avoid is not None:
            dirs = [d for d in dirs if d != avoid and not d.startswith(avoid + "/")]
        return self.rng.choice(dirs)

    def full(self) -> bool:
        return sum(1 for _ in self.nodes()) >= MAX_ENTRIES

    def new_name(self, drel: str, prefix: str) -> str:
        self.seq += 1
        return join(drel, f"{prefix}{self.seq}")

    def data(self, limit: int = MAX_FILE) -> bytes:
        return self.rng.randbytes(min(self.rng.choice(SIZES), limit))

    def links_of(self, f: File) -> list[str]:
        return [rel for rel, n in self.nodes() if n is f]

    # -- checks -----------------------------------------------------------------------
    def check(self, *rels: str) -> None:
        """Each entry and its directory's listing, as the model has them."""
        for rel in rels:
            head, d, name = self.parent(rel)
            self.check_listing(head)
            node = d.entries.get(name)
            if node is None:
                expect_errno(errno.ENOENT, os.lstat, self.abs(rel))
                continue
            want, got = model_entry(node), disk_entry(self.abs(rel))
            if want != got:
                ino = os.lstat(self.abs(rel)).st_ino  # for sharedfs inspect and fsck's lines
                raise Mismatch(f"{rel} (inode {ino}): want {describe(want)}, got {describe(got)}")

    def check_listing(self, drel: str) -> None:
        want, got = set(self.dir(drel).entries), set(os.listdir(self.abs(drel)))
        if want != got:
            raise Mismatch(
                f"listing of {drel or '.'}: missing {sorted(want - got)[:5]}, "
                f"extra {sorted(got - want)[:5]}"
            )

    def check_file(self, rel: str) -> None:
        f = self.lookup(rel)
        assert isinstance(f, File)
        self.check(*self.links_of(f))

    # -- steps that change the directory ---------------------------------------------
    def op_create(self) -> bool:
        if self.full():
            return False
        rel = self.new_name(self.pick_dir(), "f")
        data, mode = self.data(), self.rng.choice(FILE_MODES)
        self.doing = f"{rel} ({len(data)} B, mode {mode:o})"
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        _, d, name = self.parent(rel)
        d.entries[name] = File(bytearray(data), mode)
        self.check(rel)
        return True

    def op_write(self) -> bool:
        """pwrite()s at random offsets, within the file, across its end, past it."""
        found = self.pick(File)
        if found is None:
            return False
        rel, f = found
        fd = os.open(self.abs(rel), os.O_WRONLY)
        try:
            for _ in range(self.rng.randint(1, 3)):
                off = self.rng.randint(0, min(len(f.data) + 8192, MAX_FILE))
                data = self.data(MAX_FILE - off)
                self.doing = f"{rel} at {off} ({len(data)} B, size {len(f.data)})"
                write_all(fd, data, off)
                put(f.data, off, data)
        finally:
            os.close(fd)
        self.check_file(rel)
        return True

    def op_overwrite(self) -> bool:
        found = self.pick(File)
        if found is None:
            return False
        rel, f = found
        chunks = [self.data(MAX_FILE // 2) for _ in range(self.rng.randint(1, 2))]
        self.doing = f"{rel} with O_TRUNC ({'+'.join(str(len(c)) for c in chunks)} B)"
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_TRUNC)
        try:
            f.data[:] = b""
            for chunk in chunks:
                write_all(fd, chunk)
                f.data += chunk
        finally:
            os.close(fd)
        self.check_file(rel)
        return True

    def op_append(self) -> bool:
        found = self.pick(File)
        if found is None:
            return False
        rel, f = found
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_APPEND)
        try:
            for _ in range(self.rng.randint(1, 3)):
                data = self.data(MAX_FILE - len(f.data))
                self.doing = f"{rel} with O_APPEND ({len(data)} B at {len(f.data)})"
                write_all(fd, data)
                f.data += data
        finally:
            os.close(fd)
        self.check_file(rel)
        return True

    def op_truncate(self) -> bool:
        found = self.pick(File)
        if found is None:
            return False
        rel, f = found
        if self.rng.random() < 0.5:
            size = self.rng.randint(0, len(f.data))
        else:
            size = min(len(f.data) + self.rng.choice((1, 4095, 4096, 5000, 65536)), MAX_FILE)
        by_fd = self.rng.random() < 0.5
        self.doing = f"{rel} from {len(f.data)} to {size} ({'ftruncate' if by_fd else 'truncate'})"
        if by_fd:
            fd = os.open(self.abs(rel), os.O_WRONLY)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        else:
            os.truncate(self.abs(rel), size)
        del f.data[size:]
        f.data.extend(bytes(size - len(f.data)))
        self.check_file(rel)
        return True

    def op_rename(self) -> bool:
        """To a new name or over an existing one, possibly in another of our
        directories; the refusals POSIX asks for are checked too."""
        found = self.pick((File, Symlink, Dir))
        if found is None:
            return False
        src, node = found
        ddir = self.pick_dir(avoid=src if isinstance(node, Dir) else None)
        existing = [join(ddir, n) for n in self.dir(ddir).entries]
        existing = [e for e in existing if e not in (src, PUB)]
        if existing and self.rng.random() < 0.4:
            dst = self.rng.choice(existing)
        else:
            dst = self.new_name(ddir, "r")
        self.doing = f"{src} to {dst}"
        _, ddir_node, dname = self.parent(dst)
        target = ddir_node.entries.get(dname)
        refusal = rename_refusal(src, node, dst, target)
        if refusal is not None:
            expect_errno(refusal, os.rename, self.abs(src), self.abs(dst))
            self.check(src, dst)
            return True
        os.rename(self.abs(src), self.abs(dst))
        if target is node:
            # Two links of one file: POSIX says rename does nothing.
            self.check(src, dst)
            return True
        _, sdir, sname = self.parent(src)
        del sdir.entries[sname]
        if isinstance(target, File):
            target.nlink -= 1
        ddir_node.entries[dname] = node
        self.check(src, dst)
        if isinstance(target, File) and target.nlink:
            self.check(*self.links_of(target))
        return True

    def op_unlink(self) -> bool:
        found = self.pick((File, Symlink))
        if found is None:
            return False
        rel, node = found
        self.doing = rel
        os.unlink(self.abs(rel))
        _, d, name = self.parent(rel)
        del d.entries[name]
        self.check(rel)
        if isinstance(node, File):
            node.nlink -= 1
            if node.nlink:
                self.check(*self.links_of(node))
        return True

    def op_mkdir(self) -> bool:
        drel = self.pick_dir()
        if self.full() or drel.count("/") + 1 >= MAX_DEPTH:
            return False
        rel, mode = self.new_name(drel, "d"), self.rng.choice(DIR_MODES)
        self.doing = f"{rel} mode {mode:o}"
        os.mkdir(self.abs(rel), mode)
        _, d, name = self.parent(rel)
        d.entries[name] = Dir(mode=mode)
        self.check(rel)
        return True

    def op_rmdir(self) -> bool:
        empty = [rel for rel, n in self.nodes() if isinstance(n, Dir) and not n.entries]
        if not empty:
            return False
        rel = self.rng.choice(empty)
        self.doing = rel
        os.rmdir(self.abs(rel))
        _, d, name = self.parent(rel)
        del d.entries[name]
        self.check(rel)
        return True

    def op_link(self) -> bool:
        found = self.pick(File)
        if found is None or self.full():
            return False
        rel, f = found
        new = self.new_name(self.pick_dir(), "h")
        self.doing = f"{rel} as {new}"
        os.link(self.abs(rel), self.abs(new))
        _, d, name = self.parent(new)
        d.entries[name] = f
        f.nlink += 1
        self.check(*self.links_of(f))
        return True

    def op_symlink(self) -> bool:
        if self.full():
            return False
        rel = self.new_name(self.pick_dir(), "l")
        _, d, name = self.parent(rel)
        siblings = sorted(d.entries)
        target = self.rng.choice(
            siblings + [f"nowhere{self.seq}", "../" * self.rng.randint(1, 3) + "x", "a" * 200]
        )
        self.doing = f"{rel} -> {target[:40]}"
        os.symlink(target, self.abs(rel))
        d.entries[name] = Symlink(target)
        self.check(rel)
        return True

    def op_chmod(self) -> bool:
        found = self.pick((File, Dir))
        if found is None:
            return False
        rel, node = found
        node.mode = self.rng.choice(FILE_MODES if isinstance(node, File) else DIR_MODES)
        self.doing = f"{rel} to {node.mode:o}"
        os.chmod(self.abs(rel), node.mode)
        self.check(rel)
        return True

    def op_fsync(self) -> bool:
        """fsync or fdatasync of a file, now and then of a directory."""
        if self.rng.random() < 0.2:
            rel, flags, sync = self.pick_dir(), os.O_RDONLY, os.fsync
        else:
            found = self.pick(File)
            if found is None:
                return False
            rel, flags = found[0], os.O_WRONLY
            sync = self.rng.choice((os.fsync, os.fdatasync))
        self.doing = f"{sync.__name__} of {rel or '.'}"
        fd = os.open(self.abs(rel), flags)
        try:
            sync(fd)
        finally:
            os.close(fd)
        if rel:
            self.check(rel)
        return True

    # -- steps that only read ---------------------------------------------------------
    def op_read(self) -> bool:
        """The size, and a pread() of a random range (also past the end)."""
        found = self.pick(File)
        if found is None:
            return False
        rel, f = found
        off = self.rng.randint(0, len(f.data) + 100)
        n = self.rng.choice(SIZES) + 1
        self.doing = f"{rel} at {off} ({n} B, size {len(f.data)})"
        with open(self.abs(rel), "rb") as fh:
            st = os.fstat(fh.fileno())
            got = os.pread(fh.fileno(), n, off)
        want = bytes(f.data[off : off + n])
        if st.st_size != len(f.data) or got != want:
            raise Mismatch(
                f"inode {st.st_ino}: size {st.st_size}, read {len(got)} B xxh64 {digest(got)}; "
                f"want size {len(f.data)}, {len(want)} B {digest(want)}"
            )
        return True

    def op_refused(self) -> bool:
        """A call POSIX refuses, with the errno it gives."""
        cases: list[tuple[int, Callable[..., object], tuple[object, ...]]] = [
            (errno.ENOENT, os.stat, (self.abs(f"missing{self.seq}"),)),
            (errno.ENOENT, os.rmdir, (self.abs(f"missing{self.seq}"),)),
            (errno.EEXIST, os.mkdir, (self.abs(PUB),)),
            (errno.EISDIR, os.open, (self.abs(PUB), os.O_WRONLY)),
        ]
        found = self.pick(File)
        if found is not None:
            path = self.abs(found[0])
            cases += [
                (errno.EEXIST, os.open, (path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
                (errno.ENOTDIR, os.stat, (os.path.join(path, "x"),)),
                (errno.EINVAL, os.readlink, (path,)),
                (errno.ENOTDIR, os.rmdir, (path,)),
            ]
        full = [rel for rel, n in self.nodes() if isinstance(n, Dir) and n.entries]
        if full:
            cases.append((errno.ENOTEMPTY, os.rmdir, (self.abs(self.rng.choice(full)),)))
        want, fn, args = self.rng.choice(cases)
        self.doing = f"{fn.__name__}{tuple(str(a).removeprefix(self.root) for a in args)}"
        expect_errno(want, fn, *args)
        return True

    def op_verify(self) -> bool:
        """The whole directory, pub/ too, against the model."""
        self.doing = "of the whole directory"
        diff = manifest_diff(model_manifest(self.tree), disk_manifest(self.root))
        if diff is not None:
            raise Mismatch(diff)
        return True

    # -- steps for the other hosts ----------------------------------------------------
    def op_publish(self) -> bool:
        """A new file, written (maybe fsync'd), renamed into pub/ and only
        then announced: nothing writes it again."""
        if self.published >= MAX_PUBLISHED:
            return False
        rel = self.new_name(self.pick_dir(), "p")
        data = self.data() + self.rng.randbytes(self.rng.randint(1, 100))
        self.doing = f"{rel} ({len(data)} B)"
        fd = os.open(self.abs(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, data)
            if self.rng.random() < 0.5:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.published += 1
        final = join(PUB, f"p{self.published}")
        self.doing = f"{rel} to {final}"
        os.rename(self.abs(rel), self.abs(final))
        self.dir(PUB).entries[f"p{self.published}"] = File(bytearray(data), 0o644)
        self.check(rel, final)
        self.feed.publish(f"F {self.me}/{final} {len(data)} {digest(data)}")
        return True

    def op_check_published(self) -> bool:
        """A file another host published, read here: the newest half the time."""
        self.feed.refresh()
        files = [f for f in self.feed.files if f[0] not in self.lost]
        if not files:
            return False
        rel, size, want = files[-1] if self.xrng.random() < 0.5 else self.xrng.choice(files)
        self.doing = f"{rel} ({size} B)"
        self.lost.add(rel)  # until it reads right
        with open(os.path.join(self.mnt, rel), "rb") as f:
            data = f.read()
        if len(data) != size or digest(data) != want:
            raise Mismatch(f"read {len(data)} B xxh64 {digest(data)}, want {size} B {want}")
        self.lost.discard(rel)
        self.cross["files"] += 1
        return True

    def op_shared_create(self) -> bool:
        if len(self.shared_names) >= MAX_SHARED:
            return False
        name = f"{self.me}-{len(self.shared_names)}"
        self.doing = f"{SHARED}/{name}"
        path = os.path.join(self.shared, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, name.encode())
        finally:
            os.close(fd)
        self.shared_names.append(name)
        if name not in os.listdir(self.shared):
            raise Mismatch(f"{name} not in the listing right after its create")
        self.feed.publish(f"S {name}")
        return True

    def op_shared_check(self) -> bool:
        """The shared directory's listing has every name other hosts
        announced (and ours); one of theirs holds what it should."""
        self.feed.refresh()
        if not self.feed.names:
            return False
        self.doing = f"listing of {SHARED}/ ({len(self.feed.names)} names from other hosts)"
        listing = set(os.listdir(self.shared))
        names = [n for n in self.feed.names + self.shared_names if n not in self.lost]
        missing = [n for n in names if n not in listing]
        self.cross["listings"] += 1
        self.cross["names"] += len(names)
        if missing:
            self.lost.update(missing)
            raise Mismatch(f"{len(missing)} names missing, first {missing[:3]}")
        theirs = [n for n in self.feed.names if n not in self.lost]
        if not theirs:
            return True
        name = self.xrng.choice(theirs)
        self.doing = f"read of {SHARED}/{name}"
        self.lost.add(name)  # until it reads right
        with open(os.path.join(self.shared, name), "rb") as f:
            got = f.read()
        if got != name.encode():
            raise Mismatch(f"holds {got[:40]!r}")
        self.lost.discard(name)
        self.cross["files"] += 1
        return True


def rename_refusal(src: str, node: Node, dst: str, target: Node | None) -> int | None:
    """The errno rename(src, dst) must fail with, or None; `node` and
    `target` are what the names hold."""
    if target is None or target is node:
        return None
    if src.startswith(dst + "/"):
        return errno.ENOTEMPTY  # Linux checks this first: dst is an ancestor
    if isinstance(target, Dir) and not isinstance(node, Dir):
        return errno.EISDIR
    if isinstance(node, Dir) and not isinstance(target, Dir):
        return errno.ENOTDIR
    if isinstance(target, Dir) and target.entries:
        return errno.ENOTEMPTY
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mnt", required=True, help="the host's mountpoint")
    ap.add_argument("--name", required=True, help="hN-tT: host N, task T")
    ap.add_argument("--work", required=True, help="the runner's work directory")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--skip", default="", help="step kinds left out, comma-separated")
    args = ap.parse_args()
    # A hung worker's stack, when the runner asks for it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    os.umask(0)  # modes on the mount are exactly those asked for
    Worker(args).run(args.seconds, set(filter(None, args.skip.split(","))))


if __name__ == "__main__":
    main()
