"""Copies to a directory: a local disk or a mounted lake filesystem.

A copy is streamed (hashed in the same pass) into an agent-temporary name beside its
final name (locked while written), fsync'd, checked against the recorded hashes, given its
name and the directory fsync'd. A crash leaves at most the temporary file, which the next
attempt takes over; a reader never sees a partial copy under the final name. Bytes already
under the name are replaced only when the version owns them (Expected.may_replace): else the
name is given with a no-clobber link, and other bytes there are DestinationOccupied.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from ..errors import DestinationOccupied, ObjectMissing, PermanentError, RetryableError
from ..hashing import CHUNK, Consumer, Digests, adler32_of, hash_file
from ..localfs import Source, fsync_dir, sibling_temp
from .base import ChunkStream, Expected, Pacer, RemoteStat, Transport
from .tee import read_once

XATTR = "user.edge_agent.adler32"
# Disk full, quota, I/O trouble, a stale NFS handle: the storage may recover.
_RETRYABLE = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT,
              errno.EBUSY, errno.ENOTCONN, errno.EHOSTDOWN}


def url_to_path(url: str) -> str:
    if url.startswith("file://"):
        return unquote(urlparse(url).path)
    return url


def temp_name(final: str) -> str:
    return os.fsdecode(sibling_temp(os.fsencode(final), b"part"))


def _storage_error(exc: OSError, what: str) -> Exception:
    msg = f"{what}: {exc.strerror or exc}"
    if exc.errno in _RETRYABLE:
        return RetryableError(msg)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG):
        return PermanentError(msg)
    return RetryableError(msg)


@contextlib.contextmanager
def _locked_temp(tmp: str) -> Iterator[BinaryIO]:
    """The temporary file of one copy, held under an exclusive lock while it is written, and removed
    by its writer before the lock goes: a second writer of the URL never writes into it (nor, through
    a file descriptor opened before it was published, into the published copy). One left by a crash
    is unlocked: it is taken over and emptied."""
    while True:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RetryableError(f"another copy to {tmp} is being written now") from None
        except OSError:
            pass   # a filesystem without locks: one writer per name still holds (the ledger's names)
        mine = os.fstat(fd)
        try:
            there = os.lstat(tmp)
        except FileNotFoundError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
            if mine.st_nlink == 1:
                break
            # published (linked to its final name) by a writer that died before removing it: only
            # the temporary name goes, never a byte of the published copy
            os.unlink(tmp)
        os.close(fd)   # published or removed by its writer meanwhile: a fresh temporary file
    os.ftruncate(fd, 0)
    fh = os.fdopen(fd, "wb")
    try:
        yield fh
    finally:
        try:
            there = os.lstat(tmp)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(tmp)
        except OSError:
            pass
        fh.close()


def _drop_published_temp(tmp: str, final: str) -> None:
    """A writer killed between publishing its copy (the link) and removing its temporary name left
    that name as a second link to the copy: removed, if nobody writes under it now (its lock is
    free) and it still is the published copy. Only the name goes, never a byte of the copy."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:
        return                     # none (the usual case), or not ours to open
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mine, published = os.fstat(fd), os.stat(final, follow_symlinks=False)
        if (mine.st_dev, mine.st_ino) == (published.st_dev, published.st_ino) \
                and (os.lstat(tmp).st_dev, os.lstat(tmp).st_ino) == (mine.st_dev, mine.st_ino):
            os.unlink(tmp)
    except OSError:
        pass                       # being written now, or gone meanwhile: left to its writer
    finally:
        os.close(fd)


class PosixTransport(Transport):
    """Copies to a local or mounted directory: written under a temporary name, fsynced, published
    whole by a link."""
    scheme = "file"

    def __init__(self, fsync: bool = True, chunk_size: int = CHUNK) -> None:
        self.fsync = fsync
        self.chunk_size = chunk_size

    def put(self, source: Source, url: str, expected: Expected, pace: Pacer,
            also: Sequence[Consumer] = ()) -> Digests:
        final = url_to_path(url)
        if expected.known and self._identical(final, expected):
            _drop_published_temp(temp_name(final), final)
            return expected.digests()
        if not expected.may_replace and os.path.lexists(final):
            raise DestinationOccupied(f"{final} holds other bytes that this file version did not write; "
                                      "they are never replaced")
        tmp = temp_name(final)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
        except OSError as exc:
            raise _storage_error(exc, f"cannot create {os.path.dirname(final)}") from None
        tee = read_once(source, expected, pace=pace, also=also, chunk_size=self.chunk_size, whole=True)
        try:
            with tee, _locked_temp(tmp) as dst:
                for chunk in tee.chunks():
                    dst.write(chunk)
                dst.flush()
                if self.fsync:
                    os.fsync(dst.fileno())
                got = tee.digests()
                self._record(tmp, got)
                self._publish(tmp, final, expected, got)
                if self.fsync:
                    fsync_dir(os.path.dirname(final))
                return got
        except OSError as exc:
            raise _storage_error(exc, f"copy to {final} failed") from None

    def _publish(self, tmp: str, final: str, expected: Expected, got: Digests) -> None:
        """Give the copy its name. Without may_replace, a no-clobber link: bytes that appeared under
        the name meanwhile are kept (an identical copy is success)."""
        if expected.may_replace:
            os.replace(tmp, final)
            return
        try:
            os.link(tmp, final)
        except FileExistsError:
            there = Expected(got.size, got.blake3, got.adler32, got.md5)
            if self._identical(final, there):
                return
            raise DestinationOccupied(f"{final} appeared with other bytes while the copy was written; "
                                      "kept, not replaced") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # a filesystem without hard links (FAT, some FUSE): checked, then renamed
            if os.path.lexists(final):
                raise DestinationOccupied(f"{final} appeared while the copy was written; kept") from None
            os.rename(tmp, final)

    def _identical(self, path: str, expected: Expected) -> bool:
        """Is exactly this content already there? Read back with blake3: adler32 alone is weak."""
        try:
            if os.stat(path).st_size != expected.size:
                return False
            return hash_file(path, chunk_size=self.chunk_size).blake3 == expected.blake3
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _storage_error(exc, f"cannot read back {path}") from None

    def stat(self, url: str, verify: str = "reread") -> RemoteStat | None:
        path = url_to_path(url)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _storage_error(exc, f"cannot stat {path}") from None
        if verify == "recorded":
            rec = self._recorded(path, st)
            if rec is not None:
                return RemoteStat(st.st_size, rec)
        try:
            size, adler = adler32_of(path, self.chunk_size)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _storage_error(exc, f"cannot read back {path}") from None
        return RemoteStat(size, adler)

    def exists(self, url: str) -> bool:
        return os.path.lexists(url_to_path(url))

    @contextlib.contextmanager
    def open(self, url: str) -> Iterator[BinaryIO]:
        """The file at `url` (a path or file:// URL), read in chunks; read errors in the taxonomy."""
        path = url_to_path(url)
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the `with` below
        except FileNotFoundError:
            raise ObjectMissing(f"{path}: not found") from None
        except OSError as exc:
            raise _storage_error(exc, f"cannot read {path}") from None

        def chunks() -> Iterator[bytes]:
            while True:
                try:
                    chunk = fh.read(self.chunk_size)
                except OSError as exc:
                    raise _storage_error(exc, f"reading {path} failed") from None
                if not chunk:
                    return
                yield chunk
        with fh, ChunkStream(chunks()) as stream:
            yield stream  # type: ignore[misc]

    def same_bytes(self, url: str, d: Digests) -> bool:
        return self._identical(url_to_path(url), Expected(d.size, d.blake3, d.adler32, d.md5))

    def delete(self, url: str) -> None:
        path = url_to_path(url)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage_error(exc, f"cannot delete {path}") from None

    # The checksum recorded with a copy is only trusted while size and mtime are unchanged.
    def _record(self, path: str, d: Digests) -> None:
        try:
            st = os.stat(path)
            os.setxattr(path, XATTR, f"{d.adler32}:{d.size}:{st.st_mtime_ns}".encode())
        except OSError:
            pass  # no xattrs here: confirmation re-reads instead

    def _recorded(self, path: str, st: os.stat_result) -> str | None:
        try:
            adler, size, mtime = os.getxattr(path, XATTR).decode().split(":")
        except (OSError, ValueError):
            return None
        if int(size) == st.st_size and int(mtime) == st.st_mtime_ns:
            return adler
        return None
