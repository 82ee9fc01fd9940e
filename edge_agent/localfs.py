"""Local file operations: files reached below a watched directory without following a symlink,
the agent's own temporary names, and a crash-safe guarded unlink."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import structlog

from .core.policy import LocalStat
from .errors import FileVanished, PermanentError, SourceUnreadable, SymlinkInPath

log = structlog.get_logger("edge_agent.localfs")

AGENT_MARK = b".edge-agent-"   # every temporary file the agent makes carries this in its name

# A directory that is only walked through needs search permission, not read permission (O_PATH).
_PATH = getattr(os, "O_PATH", os.O_RDONLY)
_ROOT = os.O_DIRECTORY | os.O_CLOEXEC | _PATH
_DIR = _ROOT | os.O_NOFOLLOW
# O_NONBLOCK: a fifo swapped in between the stat and the open must not hang the open
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# what "the file is not there" looks like from the walk: a name gone, or a directory that became a file
_GONE = (FileNotFoundError, NotADirectoryError)


def is_agent_temp(name: bytes | str) -> bool:
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    return AGENT_MARK in raw


def local_stat(st: os.stat_result) -> LocalStat:
    return LocalStat(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev)


def stat_regular(path: str | bytes) -> LocalStat | None:
    """The stat of a regular file at `path` (not following a symlink as its last component), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat_mod.S_ISREG(st.st_mode):
        return None
    return local_stat(st)


@dataclass(frozen=True)
class LocalFile:
    """A file below a watched directory, reached one directory at a time from `root` without
    following a symlink at any level below it.

    `root` is the rule's configured directory, followed like any configured path (it may be a
    symlink to the buffer disk); its device is recorded with each file, so a root pointed at
    another filesystem does not pass for it. A directory below it swapped for a symlink after a
    file was discovered would otherwise take every stat, read, rename and unlink out of the
    tree: each of them raises SymlinkInPath instead, and so does a symlink as the last component.
    """
    root: bytes
    path: bytes

    @classmethod
    def below(cls, root: str | bytes | os.PathLike[str], path: str | bytes) -> LocalFile:
        return cls(os.fsencode(root), os.fsencode(path))

    @classmethod
    def beside(cls, path: str | bytes | os.PathLike[str]) -> LocalFile:
        """A path whose watched root is not known: only its last component is guarded."""
        p = os.path.abspath(os.fsencode(path))
        return cls(os.path.dirname(p), p)

    def __str__(self) -> str:
        return os.fsdecode(self.path)

    def with_suffix(self, suffix: str | bytes) -> LocalFile:
        """The companion file whose name is this one's plus `suffix` (a marker, a sidecar)."""
        return LocalFile(self.root, self.path + os.fsencode(suffix))

    def parts(self) -> list[bytes]:
        root, path = os.path.normpath(self.root), os.path.normpath(self.path)
        prefix = root if root.endswith(b"/") else root + b"/"
        if not path.startswith(prefix) or len(path) == len(prefix):
            raise PermanentError(f"{self} is not below the watched directory {os.fsdecode(self.root)} "
                                 "(was the rule's directory changed?)")
        return path[len(prefix):].split(b"/")

    @contextlib.contextmanager
    def directory(self) -> Iterator[tuple[int, bytes]]:
        """The directory holding the file, opened from the root without following a symlink, and the
        file's name in it. Raises SymlinkInPath, or FileNotFoundError/NotADirectoryError when the way is gone."""
        parts = self.parts()
        fd = os.open(self.root, _ROOT)
        try:
            for i, part in enumerate(parts[:-1]):
                nxt = self._open_dir(fd, part, parts[:i + 1])
                os.close(fd)
                fd = nxt
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _open_dir(self, fd: int, part: bytes, upto: list[bytes]) -> int:
        try:
            return os.open(part, _DIR, dir_fd=fd)
        except OSError as exc:
            # Linux answers ENOTDIR for a symlink opened with O_DIRECTORY | O_NOFOLLOW, others ELOOP
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP) or not _is_symlink_at(fd, part):
                raise
        raise self._symlink(upto)

    def _symlink(self, upto: list[bytes]) -> SymlinkInPath:
        where = os.fsdecode(os.path.join(self.root, *upto))
        return SymlinkInPath(f"{self}: {where} is now a symbolic link; nothing is read, sent or deleted "
                             "through it")

    def lstat(self) -> os.stat_result | None:
        """The lstat of what is at the path (None: nothing); a symlink as the last component is
        described, one on the way to it raises SymlinkInPath."""
        try:
            with self.directory() as (d, name):
                return os.stat(name, dir_fd=d, follow_symlinks=False)
        except _GONE:
            return None

    def stat(self) -> LocalStat | None:
        """The stat of the regular file at the path, or None (gone, or a directory, fifo, device).
        Raises SymlinkInPath for a symlink at any level, the last one included."""
        st = self.lstat()
        if st is not None and stat_mod.S_ISLNK(st.st_mode):
            raise self._symlink(self.parts())
        return local_stat(st) if st is not None and stat_mod.S_ISREG(st.st_mode) else None

    def open(self) -> BinaryIO:
        """The file opened for reading, unbuffered. Raises FileVanished (gone, not a regular file),
        SymlinkInPath, or SourceUnreadable (no permission to read it)."""
        try:
            with self.directory() as (d, name):
                fd = _open_regular_at(d, name, self)
        except _GONE:
            raise FileVanished(f"{self} is gone") from None
        except PermissionError as exc:
            raise SourceUnreadable(f"cannot read {self}: {exc.strerror}") from None
        return os.fdopen(fd, "rb", buffering=0)

    def unlink(self) -> bool:
        """Remove the name (a symlink there is removed, never followed); False if nothing was there."""
        try:
            with self.directory() as (d, name):
                os.unlink(name, dir_fd=d)
        except _GONE:
            return False
        return True


def _is_symlink_at(d: int, name: bytes) -> bool:
    try:
        return stat_mod.S_ISLNK(os.stat(name, dir_fd=d, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_regular_at(d: int, name: bytes, shown: LocalFile) -> int:
    """An fd of the regular file `name` in directory `d`; never opens a symlink, fifo or device."""
    st = os.stat(name, dir_fd=d, follow_symlinks=False)   # a device is not even opened (a tape rewinds)
    if stat_mod.S_ISLNK(st.st_mode):
        raise shown._symlink(shown.parts())
    if not stat_mod.S_ISREG(st.st_mode):
        raise FileVanished(f"{shown} is no longer a regular file")
    try:
        fd = os.open(name, _FILE, dir_fd=d)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise shown._symlink(shown.parts()) from None
        raise
    try:
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            raise FileVanished(f"{shown} is no longer a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# What the transports and the hashing read: a LocalFile (the daemon), or a plain path (tests, benchmarks).
Source = str | LocalFile


def open_source(source: Source) -> BinaryIO:
    """Open a file to send or hash, unbuffered, errors in the agent's taxonomy (see LocalFile.open)."""
    return (source if isinstance(source, LocalFile) else LocalFile.beside(source)).open()


def fsync_dir(path: str | bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_at(d: int) -> None:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=d)   # d may be an O_PATH fd
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir_at = _fsync_dir_at    # the receipts' writes (receipts.py) are made durable the same way


def temp_base(base: bytes, what: bytes) -> bytes:
    """A hidden agent-temporary file name for `base`, within the 255-byte limit of a file name."""
    if len(base) > 200:
        base = base[:100] + b"." + hashlib.blake2b(base, digest_size=8).hexdigest().encode()
    return b"." + base + AGENT_MARK + what


def sibling_temp(path: bytes, what: bytes) -> bytes:
    """A hidden agent-temporary name beside `path`."""
    d, base = os.path.split(path)
    return os.path.join(d, temp_base(base, what))


def deleting_name(path: bytes, inode: int) -> bytes:
    """The agent's temporary name for version `inode` of `path` while it is being deleted: one per
    version, so a leftover of a crash can never be taken for another version of the same path."""
    return sibling_temp(path, _deleting(inode))


def _deleting(inode: int) -> bytes:
    return b"deleting.%d" % inode


# An older agent's name, one per path: still finished when it holds the version being deleted.
_OLD_DELETING = b"deleting"

# Reads the file about to be deleted; False keeps it (its content is not what was hashed).
Recheck = Callable[[BinaryIO], bool]


def guarded_unlink(target: bytes | LocalFile, expected: LocalStat, recheck: Recheck | None = None) -> str:
    """Delete the file only if it is still exactly the version that was hashed.

    Its stat at its name must be `expected`, ctime and device included where recorded. Then it is
    renamed to this version's agent-temporary name (deleting_name), so a DAQ that publishes a new
    file under the same name at that instant cannot have the new one deleted, and the file actually
    moved is checked again (and put back if it is not the expected one). The rename stamps a new
    ctime on ext4, xfs and tmpfs, so after it only inode, device, size and mtime can be compared:
    ctime was compared right before, and the one change to it since is the rename itself.
    `recheck` then reads the content of the moved file (nobody reaches it by its name any more)
    before it goes. A crash at any point leaves either the file at its name or this version's
    temporary name, which the next call handles like the moved file. A file put back finds its
    name taken by a new one: it goes to a name of its own beside it (restored_name) that the
    watcher sees, never left under an agent name. Nothing below the root is followed if it is a
    symlink (SymlinkInPath). Returns "deleted", "gone" (nothing there) or "changed" (left in place).
    """
    f = target if isinstance(target, LocalFile) else LocalFile.beside(target)
    try:
        with f.directory() as (d, name):
            return _guarded_unlink_at(d, name, expected, recheck, f)
    except _GONE:
        return "gone"


def finish_deleting(target: LocalFile, expected: LocalStat, recheck: Recheck | None = None,
                    delete: bool = True) -> str:
    """Only the second half of guarded_unlink: this version's leftover of a deletion cut short (the
    crash came between the rename and the unlink) is deleted if it is still the version, put back
    otherwise, and always put back if `delete` is False (nothing may be deleted now). The name
    itself is never looked at: it may hold a newer version. "gone": there was no leftover."""
    try:
        with target.directory() as (d, name):
            tmp, moved = _leftover_at(d, name, expected)
            if moved is None:
                return "gone"
            if not delete:
                _put_back(d, tmp, name, moved, target)
                return "changed"
            return _settle_at(d, name, tmp, moved, expected, recheck, target)
    except _GONE:
        return "gone"


def leftover(target: LocalFile, expected: LocalStat) -> LocalStat | None:
    """The stat of this version's leftover of a deletion cut short, without its ctime (the rename
    changed it), or None."""
    try:
        with target.directory() as (d, name):
            moved = _leftover_at(d, name, expected)[1]
    except _GONE:
        return None
    return dataclasses.replace(moved, ctime_ns=None) if moved is not None else None


def _regular_at(d: int, name: bytes) -> LocalStat | None:
    try:
        st = os.stat(name, dir_fd=d, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return local_stat(st) if stat_mod.S_ISREG(st.st_mode) else None


def _leftover_at(d: int, name: bytes, expected: LocalStat) -> tuple[bytes, LocalStat | None]:
    """This version's temporary name and what it holds. An older agent's per-path name counts only
    when it holds this very inode; another version's leftover is that version's to finish."""
    tmp = temp_base(name, _deleting(expected.inode))
    moved = _regular_at(d, tmp)
    if moved is None:
        old = temp_base(name, _OLD_DELETING)
        left = _regular_at(d, old)
        if left is not None and (left.inode, left.dev) == (expected.inode, expected.dev or left.dev):
            return old, left
    return tmp, moved


def _guarded_unlink_at(d: int, name: bytes, expected: LocalStat, recheck: Recheck | None,
                       shown: LocalFile) -> str:
    tmp, moved = _leftover_at(d, name, expected)   # a leftover of a crash between the rename and the unlink
    if moved is None:
        try:
            st = os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            return "gone"
        if not stat_mod.S_ISREG(st.st_mode) or not expected.same_file(local_stat(st)):
            return "changed"             # not ours to delete; nothing was moved
        try:
            os.rename(name, tmp, src_dir_fd=d, dst_dir_fd=d)
        except FileNotFoundError:
            return "gone"
        moved = _regular_at(d, tmp)
        if moved is None:
            return "gone"
    return _settle_at(d, name, tmp, moved, expected, recheck, shown)


def _settle_at(d: int, name: bytes, tmp: bytes, moved: LocalStat, expected: LocalStat,
               recheck: Recheck | None, shown: LocalFile) -> str:
    """The file moved to `tmp`: deleted if it is the expected version, else put back."""
    ours = expected.same_file(dataclasses.replace(moved, ctime_ns=None))
    if ours and recheck is not None:
        try:
            ours = _recheck_at(d, tmp, moved, recheck, shown)
        except BaseException:
            _put_back(d, tmp, name, moved, shown)
            raise
    if not ours:
        _put_back(d, tmp, name, moved, shown)
        return "changed"
    os.unlink(tmp, dir_fd=d)
    _fsync_dir_at(d)
    return "deleted"


def _recheck_at(d: int, tmp: bytes, moved: LocalStat, recheck: Recheck, shown: LocalFile) -> bool:
    fd = _open_regular_at(d, tmp, shown)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (moved.dev, moved.inode):
            return False
        return recheck(fh)


def restored_name(name: bytes, inode: int, attempt: int = 0) -> bytes:
    """A name beside `name` for a file put back while a new file holds `name`: not hidden, no agent
    mark, and the original suffixes kept (img.fits.fz -> img.restored-<inode>.fits.fz), so the
    rule's include globs on the suffix still take it as a data file."""
    mark = b".restored-%d" % inode + (b"-%d" % attempt if attempt else b"")
    cut = name.find(b".", 1)
    stem, suffix = (name, b"") if cut < 0 else (name[:cut], name[cut:])
    room = 255 - len(mark) - len(suffix)
    if room < 1:                          # a very long suffix: only the last one is kept
        suffix = os.path.splitext(name)[1][:255 - len(mark) - 1]
        room = 255 - len(mark) - len(suffix)
    return stem[:room] + mark + suffix


def _put_back(d: int, tmp: bytes, name: bytes, moved: LocalStat, shown: LocalFile) -> None:
    """Not ours to delete: back under its name, without clobbering anything that appeared since.
    If a new file took the name meanwhile, under a name of its own that the watcher finds, so it
    is sent as a file of its own; never left under the agent's temporary name, where nobody looks."""
    for attempt in range(100):
        target = name if attempt == 0 else restored_name(name, moved.inode, attempt - 1)
        try:
            os.link(tmp, target, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False)
        except FileExistsError:
            continue
        os.unlink(tmp, dir_fd=d)
        _fsync_dir_at(d)
        if target != name:
            log.warning("file put back under another name: a new file took its name", path=str(shown),
                        restored=os.fsdecode(os.path.join(os.path.dirname(shown.path), target)))
        return
    raise FileExistsError(errno.EEXIST, "no free name to put the file back under", str(shown))


# ---------------------------------------------------------------- register in place
# A file registered where it lies (the buffer is itself a lake endpoint) is registered under a second
# name that only the agent writes: a hard link in this directory below the rule's root, one per
# version. The lake's reaper, told to drop the buffer replica, removes that name, never the DAQ's:
# a new file the DAQ publishes under the old path meanwhile is out of its reach.
INPLACE_DIR = b".edge-agent-inplace"


def inplace_link(root: str | bytes | os.PathLike[str], file_id: int) -> LocalFile:
    """The agent's own name for version `file_id` of a file registered in place."""
    r = os.fsencode(root)
    return LocalFile(r, os.path.join(r, INPLACE_DIR, b"%d%s" % (file_id, AGENT_MARK + b"inplace")))


def link_in_place(local: LocalFile, link: LocalFile) -> None:
    """Give `local` its in-place name `link` (a hard link), made before the file is hashed (the link
    is part of the stat that is recorded). Idempotent: a link to the same inode is success; a stale
    one (a crash, a version that failed) is replaced, since nobody else writes in that directory."""
    with local.directory() as (src_dir, name):
        os.makedirs(os.path.dirname(link.path), mode=0o755, exist_ok=True)
        with link.directory() as (dst_dir, link_name):
            src = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
            if not stat_mod.S_ISREG(src.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", os.fsdecode(local.path))
            try:
                there = os.stat(link_name, dir_fd=dst_dir, follow_symlinks=False)
            except FileNotFoundError:
                there = None
            if there is not None and (there.st_dev, there.st_ino) == (src.st_dev, src.st_ino):
                return
            if there is not None:
                os.unlink(link_name, dir_fd=dst_dir)
            os.link(name, link_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    fsync_dir(os.path.dirname(link.path))


def unlink_in_place(link: LocalFile, expected: LocalStat) -> None:
    """Remove a version's in-place name, only if it still names the hashed inode. ctime is not
    compared: dropping the DAQ's name (our guarded unlink) changed it."""
    guarded_unlink(link, dataclasses.replace(expected, ctime_ns=None))
