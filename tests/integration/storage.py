"""What the tests against the lake's real XRootD share: a directory of their own on it, and the
Expected a transport is given for some bytes."""

from __future__ import annotations

import uuid
import zlib
from pathlib import Path

import blake3

from edge_agent.transfer.base import Expected


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def expected_for(data: bytes, may_replace: bool = True) -> Expected:
    # may_replace: the pipeline's word that what lies at the URL is this version's own (a bad copy)
    return Expected(len(data), blake3.blake3(data).hexdigest(), adler(data), may_replace=may_replace)


def no_pace(n: int) -> None:
    pass


class Area:
    """A directory of its own on lake1, reached over HTTP and root://, removed at the end."""

    def __init__(self, lake) -> None:  # type: ignore[no-untyped-def]
        self.lake = lake
        self.rel = f"data/lake1/edge-transport-tests/{uuid.uuid4().hex[:12]}"
        self.dir = lake.data_dir / self.rel

    def http(self, name: str) -> str:
        return f"{self.lake.http_url}/{self.rel}/{name}"

    def root(self, name: str) -> str:
        return f"{self.lake.root_url}//{self.rel}/{name}"

    def local(self, name: str) -> Path:
        return self.dir / name
