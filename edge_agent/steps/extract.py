"""The rule's metadata extractor (edge_agent/extractors), run in the hashing step.

    plug-in with stream()   fed the hashing read itself: no second read of the file
    plug-in with extract()  called after the read: it reads the file itself
    command                 run after the read with the path as argument: it reads the file itself

Run again whenever the step is (after a crash, a retry): an extractor's output is taken from the
bytes as they are, never remembered. A failure is held until the file is found unchanged after the
read (a file that changed or vanished explains a failure better); then it quarantines the file
(ExtractorFailed, a PermanentError: `edge-agent retry ID` once the extractor is fixed), or with
`on_failure = "skip"` the file goes on without the extractor's keys: a warning, the
`edge_agent_extractor_skipped_total` counter, and `extractor_skipped` in the `hashed` event.
"""

from __future__ import annotations

import os
from typing import Any

import structlog

from ..errors import ExtractorFailed
from ..extractors import StreamExtractor, command, output
from ..extractors.plugins import Plugin
from ..hashing import Consumer
from ..ledger import FileRecord
from ..settings import ExtractorSettings
from .context import StepContext

log = structlog.get_logger("edge_agent.steps")


class Extraction:
    """One file's extractor run: made before the hashing read (`also`: the consumers to feed it),
    `finish()`ed after it, and asked for its `metadata()` once the file is known unchanged.
    For a rule without an extractor it does nothing and gives nothing."""

    def __init__(self, rec: FileRecord, ctx: StepContext, size: int) -> None:
        self.rec, self.ctx = rec, ctx
        self.settings: ExtractorSettings | None = ctx.rule(rec).extractor
        plugin: Plugin | None = self.settings.plugin if self.settings is not None else None
        self._fed = _Fed(plugin, rec.fspath, size) if plugin is not None and plugin.takes_the_stream else None
        self._output: dict[str, Any] = {}
        self._failure: str | None = None
        self.skipped: str | None = None      # why the extractor's keys are missing (on_failure = "skip")

    @property
    def also(self) -> list[Consumer]:
        """What the hashing read feeds besides the hashes."""
        return [self._fed] if self._fed is not None else []

    def finish(self) -> None:
        """After the read: the plug-in's result, or the plug-in or command run on the file. A
        failure is kept for metadata(); ShuttingDown (a command stopped) is raised."""
        ex = self.settings
        if ex is None:
            return
        try:
            if self._fed is not None:
                data = self._fed.result()
            elif ex.plugin is not None:
                data = _extracted(ex.plugin, self.rec.fspath)
            else:
                assert ex.command is not None
                data = command.run(ex.command, self.rec.fspath, ex.timeout_seconds, ex.env, self.ctx.stopping)
            self._output = output.check(data)
        except ExtractorFailed as exc:
            self._failure = str(exc)

    def metadata(self) -> dict[str, Any]:
        """The extractor's keys. Its failure: ExtractorFailed with the reason an operator reads, or
        with on_failure = "skip" none of its keys (and `skipped` says why)."""
        ex = self.settings
        if ex is None or self._failure is None:
            return self._output
        what = f"extractor {_name(ex)} failed on {self.rec.relpath}: {self._failure}"
        if ex.on_failure == "quarantine":
            raise ExtractorFailed(f"{what} (fix the extractor, then `edge-agent retry {self.rec.id}`; "
                                  "or on_failure = \"skip\" sends such files without its keys)")
        log.warning("extractor failed: the file is sent without its keys (on_failure = skip)",
                    file_id=self.rec.id, rule=self.rec.rule, path=self.rec.relpath, reason=what)
        self.ctx.hooks.extractor_skipped(self.rec.rule)
        self.skipped = what
        return {}


class _Fed:
    """A streaming plug-in's consumer, fenced: what it raises is kept as its failure and it is fed
    no more, so a broken plug-in never breaks the read (which may be a first copy's upload)."""

    def __init__(self, plugin: Plugin, path: str, size: int) -> None:
        self.failure: str | None = None
        self._c: StreamExtractor | None = None
        try:
            assert plugin.stream is not None
            self._c = plugin.stream(path, size)
        except Exception as exc:  # noqa: BLE001 - the plug-in's fault, told as its failure
            self.failure = _said("stream()", exc)

    def update(self, chunk: bytes | memoryview) -> None:
        if self._c is None or self.failure is not None:
            return
        try:
            self._c.update(chunk)
        except Exception as exc:  # noqa: BLE001 - see the class
            self.failure = _said("update()", exc)

    def reset(self) -> None:
        if self._c is None:
            return
        try:
            self._c.reset()
            self.failure = None
        except Exception as exc:  # noqa: BLE001 - see the class
            self.failure = _said("reset()", exc)

    def result(self) -> Any:
        if self.failure is not None:
            raise ExtractorFailed(self.failure)
        assert self._c is not None
        try:
            return self._c.result()
        except Exception as exc:  # noqa: BLE001 - see the class
            raise ExtractorFailed(_said("result()", exc)) from None


def _extracted(plugin: Plugin, path: str) -> Any:
    assert plugin.extract is not None
    try:
        return plugin.extract(path)
    except Exception as exc:  # noqa: BLE001 - the plug-in's fault, told as its failure
        raise ExtractorFailed(_said("extract()", exc)) from None


def _said(where: str, exc: Exception) -> str:
    return f"{where} raised {type(exc).__name__}: {exc}"


def _name(ex: ExtractorSettings) -> str:
    if ex.entry_point is not None:
        return f"plug-in {ex.entry_point!r}"
    assert ex.command is not None
    return os.path.basename(ex.command[0])
