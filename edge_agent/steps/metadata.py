"""What a version's DID carries besides its bytes: the rule's fixed metadata, FITS header keywords
(read in the hashing pass: a FITS file whose own checksums fail is corrupt at the source and is not
sent), the rule's extractor's keys (steps/extract.py) and the JSON object of a sidecar file."""

from __future__ import annotations

import json
from typing import Any

import structlog

from ..errors import FileChanged, PermanentError, RetryableError
from ..fits import FitsScan
from ..ledger import FileRecord
from ..settings import Completion
from .context import StepContext
from .extract import Extraction

log = structlog.get_logger("edge_agent.steps")

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz")


def fits_scan(rec: FileRecord, ctx: StepContext) -> FitsScan | None:
    """A scanner to feed the hashing pass with, for a FITS file of a rule that reads headers."""
    if ctx.rule(rec).fits == "auto" and rec.relpath.lower().endswith(FITS_SUFFIXES):
        return FitsScan()
    return None


def gather(rec: FileRecord, ctx: StepContext, scan: FitsScan | None, extraction: Extraction) -> dict[str, Any]:
    """The DID's metadata: the rule's, then the FITS keywords, then the extractor's, then the
    sidecar's (later ones win: the more particular to the file, the later; the sidecar is what the
    DAQ wrote down for this very file). Raises PermanentError for a FITS file failing its own
    verification (fits_verify) or a failed extractor (unless skipped), FileChanged if the sidecar
    vanished, RetryableError if it cannot be read now."""
    return {**ctx.rule(rec).metadata, **_fits_metadata(rec, ctx, scan), **extraction.metadata(),
            **_sidecar(rec, ctx)}


def _fits_metadata(rec: FileRecord, ctx: StepContext, scan: FitsScan | None) -> dict[str, Any]:
    """Header keywords as metadata; a FITS file whose own checksums fail is corrupt at the source."""
    if scan is None:
        return {}
    res = scan.result()
    if not res.is_fits:
        return {}
    rule = ctx.rule(rec)
    corrupt = res.problems(tolerate_trailing=True)
    if corrupt and rule.fits_verify:
        raise PermanentError("FITS file fails its own verification (corrupt at the source, not sent): "
                             + "; ".join(corrupt[:3]) + f" (`edge-agent retry {rec.id}` after fixing it, "
                             "or fits_verify = false)")
    if corrupt:
        log.warning("FITS verification failed; sent anyway (fits_verify = false)", file_id=rec.id,
                    path=rec.relpath, problems=corrupt[:3])
    return {k.lower(): v for k, v in res.metadata(rule.fits_keywords).items()}


def _sidecar(rec: FileRecord, ctx: StepContext) -> dict[str, Any]:
    rule = ctx.rule(rec)
    if Completion.SIDECAR not in rule.completion:
        return {}
    try:
        with open(rec.fspath + rule.sidecar_suffix, "rb") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise FileChanged("the sidecar file vanished") from None
    except (OSError, ValueError) as exc:
        raise RetryableError(f"sidecar unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise PermanentError("the sidecar is JSON but not an object")
    return {str(k): v for k, v in data.items()}
