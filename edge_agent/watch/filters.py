"""Which names in a watched tree are data files of a rule, and why the others are not.

A `RuleFilter` is a small callable: `(relpath) -> None` for a candidate, or a `Skip`
saying why not. Quiet skips (temporary names, markers, excluded globs) are expected
and only shown by `scan --dry-run`; loud ones (symlinks, special files) are reported.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from ..core.receipts import is_receipt_name
from ..localfs import is_agent_temp
from ..settings import Completion, RuleSettings


@dataclass(frozen=True)
class Skip:
    """Why a path is not taken as a data file, and whether an operator should hear of it."""
    reason: str
    report: bool = False   # True: an operator should hear about it (a notice in the ledger)
    writing: bool = False  # a name being written: reported if it stays unchanged too long (stale_temp_seconds)
    receipt: bool = False  # a receipt's name: reported if the file is not one of the agent's receipts


class RuleFilter:
    """Which paths under a rule's directory are its data files (include, exclude, temporary names,
    companions)."""
    def __init__(self, rule: RuleSettings) -> None:
        self.include = list(rule.include)
        self.exclude = list(rule.exclude)
        self.temp_suffixes = tuple(rule.temp_suffixes)
        # markers and sidecars are companions of data files, never data themselves
        self.companions: tuple[str, ...] = ()
        if Completion.MARKER in rule.completion:
            self.companions += (rule.marker_suffix,)
        if Completion.SIDECAR in rule.completion:
            self.companions += (rule.sidecar_suffix,)
        # receipts written beside the files (the agent's, named for the DAQ to find): never data
        self.receipts = rule.receipts == "beside"

    def __call__(self, relpath: str) -> Skip | None:
        name = os.path.basename(relpath)
        if is_agent_temp(name):
            # its own temporary names and the buffer lock: never data, never a writer's leftover
            return Skip("the agent's own temporary file")
        if name.startswith("."):
            return Skip("hidden file (being written?)", writing=True)
        if self.temp_suffixes and name.endswith(self.temp_suffixes):
            return Skip("temporary name: waiting for the rename", writing=True)
        if self.companions and name.endswith(self.companions):
            return Skip("marker/sidecar of a data file")
        if self.receipts and is_receipt_name(name):
            return Skip("custody receipt of a data file", receipt=True)
        if not any(_match(relpath, name, g) for g in self.include):
            return Skip(f"matches none of include {self.include}")
        for g in self.exclude:
            if _match(relpath, name, g):
                return Skip(f"matches exclude {g!r}")
        return None


def _match(relpath: str, name: str, glob: str) -> bool:
    # a glob with a '/' is matched against the relative path, otherwise against the name
    return fnmatch.fnmatchcase(relpath if "/" in glob else name, glob)
