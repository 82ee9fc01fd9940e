"""URLs as both sides see them: shown in messages without their secrets, kept without a signature.

Neutral ground: the catalogue side (lake/) and the storage side (transfer/) both import it, so
neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Sequence
import re
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


def scheme_of(url: str) -> str:
    """The URL's scheme; a bare path is a file."""
    return urlsplit(url).scheme or "file"


def scheme_rank(url: str, schemes: Sequence[str]) -> int:
    """Where `url`'s scheme stands in `schemes` (the preferred first); len(schemes) when not there."""
    scheme = scheme_of(url)
    return schemes.index(scheme) if scheme in schemes else len(schemes)


def pick_url(urls: Sequence[str], schemes: Sequence[str]) -> str:
    """The one URL a copy is reached at, of the URLs (PFNs) a catalogue lists for it: the first in
    the first of `schemes` that any has, else the first listed; "" when none is listed. The one
    place a URL is chosen by scheme (the confirm step's Rucio replicas, `audit`; the access API
    orders its candidates by scheme_rank)."""
    return min(urls, key=lambda u: scheme_rank(u, schemes), default="")


def place_of(url: str) -> str:
    """The physical place a storage URL names, whatever the protocol it is reached by: host and
    path, '//' collapsed (root://h:1094//data/x and https://h:8443/data/x are one file). Two RSEs
    that list one file there hold one copy, not two."""
    p = urlsplit(url)
    return f"{(p.hostname or '').lower()}{re.sub('/+', '/', p.path)}"
