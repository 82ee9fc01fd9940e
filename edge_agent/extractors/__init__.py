"""Metadata extractors: a rule's program or plug-in that adds keys to each file's DID metadata.

A rule names one (`[rules.NAME.extractor]`, docs/configuration.md), run in the hashing step:

    command      a program the DAQ team provides (command.py): run after the hashing read with the
                 file's path as its last argument, it prints one JSON object on stdout. It reads
                 the file itself: a second read, by the DAQ's program.
    entry_point  a Python plug-in registered in the entry point group `edge_agent.extractors`
                 (plugins.py), loaded when the settings are. It takes one of two forms:

    class LineCount:                           # takes the stream: no second read
        @classmethod
        def stream(cls, path: str, size: int) -> "LineCount":
            return cls()                       # a fresh consumer per file
        def __init__(self) -> None:
            self.lines = 0
        def update(self, chunk: bytes | memoryview) -> None:
            self.lines += bytes(chunk).count(b"\\n")
        def reset(self) -> None:               # the pass starts over (a transport resent the file)
            self.lines = 0
        def result(self) -> dict[str, object]:
            return {"lines": self.lines}

    def extract(path: str) -> dict[str, object]:   # reads the file itself: a second read
        ...

What either gives is checked by output.check (a JSON object of scalars under lake-safe keys), then
merged into the DID's metadata after the rule's metadata and the FITS keywords, before a sidecar's
(steps/metadata.py). A failure is ExtractorFailed: the file is quarantined, or with
`on_failure = "skip"` sent without the extractor's keys (steps/extract.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

GROUP = "edge_agent.extractors"


@runtime_checkable
class StreamExtractor(Protocol):
    """What a streaming plug-in's `stream(path, size)` returns for one file: fed every chunk of the
    hashing read in order (the same consumer interface as a FITS scan, hashing.Consumer), then asked
    for its result once. `reset` forgets what was fed: the read starts over. Chunks are views into a
    reused buffer, valid only during the call: copy what is kept."""

    def update(self, chunk: bytes | memoryview) -> None:
        """Take the next chunk of the file."""

    def reset(self) -> None:
        """Forget every chunk fed so far: the file is read again from its start."""

    def result(self) -> Mapping[str, Any]:
        """The metadata of the whole file, once every chunk was fed: a JSON object of scalars."""
