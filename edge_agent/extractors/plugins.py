"""Python extractor plug-ins: found by name in the entry point group `edge_agent.extractors`.

A package registers one in its pyproject.toml:

    [project.entry-points."edge_agent.extractors"]
    linecount = "my_daq.extract:LineCount"

The object it names (a class, a module or an instance) has `stream(path, size)`, returning a
StreamExtractor fed the hashing read, or `extract(path)`, returning the metadata after reading the
file itself (a second read). Both are called from several hashing workers at once, one call per file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from . import GROUP, StreamExtractor


@dataclass(frozen=True)
class Plugin:
    """A loaded plug-in: `stream` when it takes the hashing read, else `extract`."""
    name: str
    stream: Callable[[str, int], StreamExtractor] | None
    extract: Callable[[str], Mapping[str, Any]] | None

    @property
    def takes_the_stream(self) -> bool:
        """True when it is fed the hashing read (no second read of the file)."""
        return self.stream is not None


def resolve(name: str) -> Plugin:
    """The plug-in registered under `name`; ValueError saying why not (for the settings' message)."""
    found = [ep for ep in metadata.entry_points(group=GROUP) if ep.name == name]
    if not found:
        known = sorted({ep.name for ep in metadata.entry_points(group=GROUP)})
        raise ValueError(f"no plug-in {name!r} in the entry point group {GROUP!r} (installed: "
                         f"{', '.join(known) if known else 'none'})")
    if len({ep.value for ep in found}) > 1:
        raise ValueError(f"{name!r} is registered more than once in {GROUP!r}: "
                         + ", ".join(sorted({ep.value for ep in found})))
    try:
        obj = found[0].load()
    except Exception as exc:  # noqa: BLE001 - whatever importing someone's package raises
        raise ValueError(f"plug-in {name!r} ({found[0].value}) cannot be loaded: "
                         f"{type(exc).__name__}: {exc}") from None
    stream, extract = getattr(obj, "stream", None), getattr(obj, "extract", None)
    if not callable(stream) and not callable(extract):
        # a ValueError, not a TypeError: pydantic makes it the message of the key that named the plug-in
        raise ValueError(f"plug-in {name!r} ({found[0].value}) has neither stream(path, size) nor "  # noqa: TRY004
                         "extract(path)")
    return Plugin(name, stream if callable(stream) else None,
                  None if callable(stream) else extract)
