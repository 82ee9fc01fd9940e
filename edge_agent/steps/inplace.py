"""Register in place: the buffer itself is a lake endpoint. Each version gets the agent's own name
in the buffer (a hard link) before it is hashed; its buffer replica is registered under that name,
released by the lake just before the local file goes, and then that name goes too."""

from __future__ import annotations

import errno
import os

import structlog

from ..errors import FileVanished, PermanentError, RetryableError
from ..failpoints import hit
from ..ledger import FileRecord
from ..localfs import INPLACE_DIR, LocalFile, inplace_link, link_in_place, unlink_in_place
from .context import StepContext

log = structlog.get_logger("edge_agent.steps")


def link(rec: FileRecord, ctx: StepContext, local: LocalFile) -> None:
    """After it: the version's bytes have the agent's own name in the buffer (part of the stat
    recorded at hashing). Raises FileVanished, or PermanentError where hard links cannot be made."""
    try:
        link_in_place(local, inplace_link(ctx.rule(rec).directory, rec.id))
    except FileNotFoundError:
        raise FileVanished(f"{rec.relpath} is gone or no longer a regular file") from None
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS):
            raise PermanentError(f"cannot give {rec.relpath} the agent's own name in the buffer (a hard link "
                                 f"in {os.fsdecode(INPLACE_DIR)}): {exc.strerror}; register in place needs "
                                 "a buffer filesystem with hard links that the agent may write") from None
        raise RetryableError(f"cannot link {rec.relpath} in place: {exc.strerror}") from None


def release(rec: FileRecord, ctx: StepContext, path_unlinked: bool = True) -> None:
    """The lake forgets the buffer copy, then the agent's own name for it goes.

    A version registered at the DAQ's own path (hashed by an older agent, without its own name)
    is released only once that path was unlinked by the guarded unlink: released with a new file
    at the path, the reaper would remove that file."""
    f = ctx.lake_file(rec)
    rule = ctx.settings.rules.get(rec.rule)
    if rule is not None and rule.inject == "register" and f.buffer_path is None and not path_unlinked:
        log.warning("buffer replica kept: it is registered at the DAQ's own path, where a new file lies",
                    file_id=rec.id, did=rec.did, path=rec.relpath)
        return
    ctx.catalogue.release(f)
    hit("after_release")
    unlink(rec, ctx)


def unlink(rec: FileRecord, ctx: StepContext) -> None:
    """The agent's own name for the version goes, if it still names the version's bytes."""
    rule = ctx.settings.rules.get(rec.rule)
    if rule is None or rule.inject != "register" or rec.inode is None:
        return
    unlink_in_place(inplace_link(rule.directory, rec.id), ctx.recorded_stat(rec))
