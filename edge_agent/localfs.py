"""Crash-safe local file operations: the agent's own temporary names, and a guarded unlink."""

from __future__ import annotations

import errno
import hashlib
import os
import stat as stat_mod

from .core.policy import LocalStat

AGENT_MARK = b".edge-agent-"   # every temporary file the agent makes carries this in its name


def is_agent_temp(name: bytes | str) -> bool:
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    return AGENT_MARK in raw


def local_stat(st: os.stat_result) -> LocalStat:
    return LocalStat(st.st_ino, st.st_size, st.st_mtime_ns)


def stat_regular(path: str | bytes) -> LocalStat | None:
    """The stat of a regular file at `path` (not following symlinks), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat_mod.S_ISREG(st.st_mode):
        return None
    return local_stat(st)


def fsync_dir(path: str | bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling_temp(path: bytes, what: bytes) -> bytes:
    """A hidden agent-temporary name beside `path`, within the 255-byte limit of a file name."""
    d, base = os.path.split(path)
    if len(base) > 200:
        base = base[:100] + b"." + hashlib.blake2b(base, digest_size=8).hexdigest().encode()
    return os.path.join(d, b"." + base + AGENT_MARK + what)


def deleting_name(path: bytes) -> bytes:
    return sibling_temp(path, b"deleting")


def guarded_unlink(path: bytes, expected: LocalStat) -> str:
    """Delete `path` only if it is still exactly the file that was hashed.

    The file is first renamed to an agent-temporary name, so a DAQ that publishes a new
    file under the same name at that instant cannot have the new one deleted: the file
    actually moved is checked, and put back if it is not the expected one. A crash at any
    point leaves either the file at `path` or the temporary name, which the next call
    handles. Returns "deleted", "gone" (nothing there) or "changed" (left in place).
    """
    tmp = deleting_name(path)
    moved = stat_regular(tmp)
    if moved is None:
        try:
            os.rename(path, tmp)
        except FileNotFoundError:
            return "gone"
        moved = stat_regular(tmp)
    if moved != expected:
        # not ours to delete: put it back without clobbering anything that appeared since
        try:
            os.link(tmp, path)
            os.unlink(tmp)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        return "changed"
    os.unlink(tmp)
    fsync_dir(os.path.dirname(path) or b".")
    return "deleted"
