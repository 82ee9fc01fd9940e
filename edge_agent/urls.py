"""URLs as both sides see them: shown in messages without their secrets, kept without a signature.

Neutral ground: the catalogue side (lake/) and the storage side (transfer/) both import it, so
neither imports the other for it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def shown_url(url: str) -> str:
    """A URL fit for a message: no user:password@, no query string, no fragment."""
    p = urlsplit(url)
    netloc = p.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if p.port:
        netloc += f":{p.port}"
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


def unsigned_url(url: str) -> str:
    """A PFN without its query string: Rucio's list_replicas gives accounts allowed to sign a
    signed (credential-bearing) PFN of an S3 RSE; the agent signs afresh and never keeps one."""
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, p.path, "", "")) if p.query else url
