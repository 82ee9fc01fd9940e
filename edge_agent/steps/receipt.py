"""The delete step's custody receipt: once the lake holds a version's N verified replicas, and
before its local file may go, the rule's receipt of it is written durably (core/receipts.py says
when and what, receipts.py where and how). No receipt, no deletion: a receipt that cannot be
written fails the step (retryable) and the file stays."""

from __future__ import annotations

import dataclasses
import socket
from urllib.parse import urlsplit

import structlog

from .. import __version__, receipts
from ..core import policy
from ..core import receipts as core
from ..errors import PermanentError
from ..ledger import FileRecord, display_path
from ..urls import shown_url
from .context import StepContext

log = structlog.get_logger("edge_agent.steps")


def write(rec: FileRecord, ctx: StepContext, c: policy.Confirmation, local_copy: str) -> str | None:
    """After it the rule's receipt of `rec` says what `c` confirmed (`local_copy`: core.TO_DELETE or
    core.KEPT), durably; an equal one already there (a step repeated after a crash) stands as it is.
    Returns the receipt's path, or None: the rule writes none, or (beside the file) the file's
    directory is gone. Raises receipts.ReceiptUnwritable (retryable), or SymlinkInPath."""
    rule = ctx.rule(rec)
    if rule.receipts == "none":
        return None
    assert rec.scope and rec.name and rec.adler32 and rec.blake3 and rec.size is not None
    target = receipts.place(rule.receipts, rule.directory, rule.receipts_directory, rec.path)
    version = core.Version(rec.id, rec.version, rec.rule, rec.relpath, rec.path, rec.scope, rec.name, rec.dataset,
                           rec.size, rec.mtime_ns, rec.adler32, rec.md5, rec.blake3, rec.confirmed_at)
    shown = [dataclasses.replace(r, url=_plain(r.url)) for r in c.good]
    doc = core.document(version, shown, rule.copies, local_copy, ctx.clock(), socket.gethostname(), ctx.holder,
                        __version__)
    where = display_path(target.path)
    old = receipts.read(target)
    if old is not None and not core.is_receipt(old):
        # a file of someone else's (a DAQ's data file named so) is where the receipt goes: never
        # written over; this file is kept too, until a person moves one of them
        raise PermanentError(f"{where} is not a custody receipt of edge-agent's (a DAQ file of that name?): it "
                             f"is never replaced, and {rec.relpath} is kept until it is moved away "
                             f"(then `edge-agent retry {rec.id}`)")
    if core.same(old, doc):
        if local_copy == core.TO_DELETE:
            receipts.settle(target)
        return where
    ctx.check_claim(rec)        # with a shared ledger: one writer per version (its temporary name is one)
    try:
        receipts.write(target, core.encode(doc), make_dirs=rule.receipts == "directory", writer=rec.id)
    except FileNotFoundError:
        # beside a file whose directory went with it (only a file found gone gets here): there is
        # nothing left to stand beside, and no directory of the DAQ's is made for it
        log.warning("no custody receipt: the file's directory is gone", file_id=rec.id, path=rec.relpath)
        return None
    log.info("custody receipt written", file_id=rec.id, did=rec.did, receipt=where, local_copy=local_copy)
    return where


def _plain(url: str) -> str:
    """A copy's URL as the catalogue lists it, but for a credential or a signature it may carry:
    the receipt says where the copy is, and is readable by anyone on the host."""
    p = urlsplit(url)
    return shown_url(url) if p.username or p.password or p.query or p.fragment else url
