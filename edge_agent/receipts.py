"""Custody receipts on disk: where a rule puts a file's receipt, and the durable write of it.

Beside the file (`receipts = "beside"`) the receipt is reached from the rule's directory like the
file itself, never through a symlink below it, and no directory is made: the file's own is there,
or the file is gone with it. In a receipts directory (`receipts = "directory"`) the file's
subdirectories are made as needed, each new one made durable in its parent.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from .core.receipts import receipt_name
from .errors import RetryableError, SymlinkInPath
from .localfs import LocalFile, fsync_dir_at, temp_base

_DIR = os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW | getattr(os, "O_PATH", os.O_RDONLY)
# A fresh inode, never an existing one truncated: a leftover at the temporary name may be a hard
# link to a file of the DAQ's (O_TRUNC would empty that file too); it is unlinked first.
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ReceiptUnwritable(RetryableError):
    """A receipt could not be written (disk full, permissions, a file where a directory should be):
    the local file is kept, and the deletion tried again after a backoff."""


def place(mode: str, rule_dir: str | bytes | os.PathLike[str], receipts_dir: str | bytes | os.PathLike[str] | None,
          path: bytes) -> LocalFile:
    """Where the receipt of the file at absolute `path` under `rule_dir` lives: beside it, or at the
    same relative place under `receipts_dir`, named by core.receipts.receipt_name."""
    root = os.fsencode(rule_dir)
    d, name = os.path.split(path)
    if mode == "beside":
        return LocalFile(root, os.path.join(d, receipt_name(name)))
    assert receipts_dir is not None, "receipts = 'directory' needs receipts_directory (settings check it)"
    top = os.fsencode(receipts_dir)
    rel = os.path.relpath(d, root)
    parent = top if rel == "." else os.path.join(top, rel)
    return LocalFile(top, os.path.join(parent, receipt_name(name)))


def read(target: LocalFile) -> bytes | None:
    """The receipt's bytes, or None when there is none (or its way is not there)."""
    try:
        with target.directory() as (d, name):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=d)
    except OSError:       # gone, a symlink where the receipt should be (not ours): none to compare
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            return fh.read(1 << 20)
        except OSError:   # a directory under the name: the write will say why it cannot replace it
            return None


def write(target: LocalFile, body: bytes, make_dirs: bool, writer: int) -> None:
    """After it `body` is durably the receipt at `target`: written to the agent's temporary name for
    it (one per `writer`, the file version: a leftover of a crash mid-write is overwritten by the
    next attempt, never left to pile up), fsync'd, renamed over any older receipt, and the directory
    fsync'd; a crash at any point leaves the old receipt or the new one whole, never a part.
    `make_dirs`: missing directories below the target's root are made (durably). Raises
    FileNotFoundError when the directory is gone and not to be made, SymlinkInPath for a symlink
    on the way, else ReceiptUnwritable with the reason."""
    try:
        with _directory(target, make_dirs) as (d, name):
            _write_at(d, name, body, writer)
    except SymlinkInPath:
        raise
    except (FileNotFoundError, NotADirectoryError) as exc:
        if not make_dirs:
            raise FileNotFoundError(errno.ENOENT, "the directory is gone", str(target)) from None
        raise ReceiptUnwritable(f"cannot write the custody receipt {target}: {exc.strerror or exc}; the "
                                "local file is kept until it can be") from None
    except OSError as exc:
        raise ReceiptUnwritable(f"cannot write the custody receipt {target}: {exc.strerror or exc}; the "
                                "local file is kept until it can be") from None


@contextlib.contextmanager
def _directory(target: LocalFile, make_dirs: bool) -> Iterator[tuple[int, bytes]]:
    if not make_dirs:
        with target.directory() as (d, name):
            yield d, name
        return
    os.makedirs(target.root, mode=0o755, exist_ok=True)
    parts = target.parts()
    fd = os.open(target.root, os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY))
    try:
        for i, part in enumerate(parts[:-1]):
            nxt = _subdir(fd, part, target, parts[:i + 1])
            os.close(fd)
            fd = nxt
        yield fd, parts[-1]
    finally:
        os.close(fd)


def _subdir(fd: int, part: bytes, target: LocalFile, upto: list[bytes]) -> int:
    """The directory `part` in `fd`, made (and its entry fsync'd) if missing; never a symlink."""
    try:
        os.mkdir(part, 0o755, dir_fd=fd)
        fsync_dir_at(fd)
    except FileExistsError:
        pass
    try:
        return os.open(part, _DIR, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(os.path.join(target.root, *upto)):
            raise SymlinkInPath(f"{target}: {os.fsdecode(os.path.join(target.root, *upto))} is a symbolic "
                                "link; no receipt is written through it") from None
        raise


def settle(target: LocalFile) -> None:
    """The receipt found already there is made durable in its directory (an earlier write may have
    been cut short between its rename and the directory's fsync, by a kill -9)."""
    try:
        with target.directory() as (d, _):
            fsync_dir_at(d)
    except OSError as exc:
        raise ReceiptUnwritable(f"cannot make the custody receipt {target} durable: {exc.strerror or exc}; "
                                "the local file is kept until it can be") from None


def _write_at(d: int, name: bytes, body: bytes, writer: int) -> None:
    tmp = temp_base(name, b"receipt.%d" % writer)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=d)        # a crash's leftover: its name only, never its inode's bytes
    fd = os.open(tmp, _NEW, 0o644, dir_fd=d)
    try:
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=d)
        raise
    fsync_dir_at(d)
