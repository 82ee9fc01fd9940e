"""A full walk of a rule's directory: what events may have missed (restart, overflow, NFS).

Symlinks are never followed (neither to files nor into directories): they are reported.
Paths are bytes throughout, so a name that is not valid UTF-8 is still handled.
"""

from __future__ import annotations

import os
import re
import stat as stat_mod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Iterator

from ..localfs import AGENT_MARK

from ..errors import PermanentError, SymlinkInPath
from ..localfs import LocalFile


@dataclass(frozen=True)
class Entry:
    """One path a rescan walked past: a regular file with its lstat, or why it cannot be taken."""
    path: bytes
    relpath: str                 # for people and templates; undecodable bytes shown as \x escapes
    st: os.stat_result | None    # lstat of a regular file; None when `problem` is set
    problem: str | None = None   # why this entry is not a regular file we can take
    held: bool = False           # a directory another agent holds as its buffer: its tree left out


def relpath_of(root: bytes, path: bytes) -> str:
    # the walk's paths are root + "/" + names: cut the prefix (os.path.relpath makes both paths
    # absolute, a getcwd() each, which was a fifth of a million-file rescan); anything else the slow way
    prefix = root.rstrip(b"/") + b"/"
    if path.startswith(prefix) and not _UNCLEAN.search(path[len(prefix) - 1:]):
        return path[len(prefix):].decode("utf-8", "backslashreplace")
    return os.path.relpath(path, root).decode("utf-8", "backslashreplace")


_UNCLEAN = re.compile(rb"//|/\.\.?(/|$)")


def undecodable(relpath_bytes: bytes) -> bool:
    try:
        relpath_bytes.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def classify(root: bytes, path: bytes, listed: bool = False) -> Entry | None:
    """lstat one path, reached from root without following a symlink below it (`listed`: the walk
    has just listed its directory, a plain lstat does). None if it does not exist (or is a directory)."""
    try:
        st = os.lstat(path) if listed else LocalFile(root, path).lstat()
    except FileNotFoundError:
        return None
    except SymlinkInPath:
        return Entry(path, relpath_of(root, path), None,
                     "a directory on its path is now a symlink: symlinks are never followed")
    except PermanentError as exc:   # not below root: a row of a rule whose directory was changed
        return Entry(path, relpath_of(root, path), None, str(exc))
    except OSError as exc:
        return Entry(path, relpath_of(root, path), None, f"cannot stat: {exc.strerror}")
    if st is None:
        return None
    rel = relpath_of(root, path)
    if stat_mod.S_ISDIR(st.st_mode):
        return None
    if stat_mod.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path).decode("utf-8", "backslashreplace")
        except OSError:
            target = "?"
        return Entry(path, rel, None, f"symlink to {target}: symlinks are never followed")
    if not stat_mod.S_ISREG(st.st_mode):
        return Entry(path, rel, None, "not a regular file (fifo, socket or device)")
    return Entry(path, rel, st)


def walk(root: bytes, recursive: bool, held: Callable[[bytes], str | None] | None = None) -> Iterator[Entry]:
    """Every non-directory entry under root, depth first; unreadable directories are reported.
    `held(directory)`: why a subdirectory is another agent's (its whole tree is then left out and
    reported as one entry), or None."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except FileNotFoundError:
            continue
        except OSError as exc:
            yield Entry(d, relpath_of(root, d), None, f"directory cannot be listed: {exc.strerror}")
            continue
        with it:
            for de in it:
                if AGENT_MARK in de.name:
                    continue     # the agent's own files (buffer lock, temporary names): never data
                p = de.path
                try:
                    is_dir = de.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    if recursive:
                        why = held(p) if held is not None else None
                        if why is None:
                            stack.append(p)
                        else:
                            yield Entry(p, relpath_of(root, p), None, why, held=True)
                    continue
                e = classify(root, p, listed=True)
                if e is not None:
                    yield e
