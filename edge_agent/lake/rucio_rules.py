"""One replication rule for a batch of files (rules.*.rule_per = "batch").

Why a dataset of the batch's own, closed, rather than a rule on the night's dataset: a rule on an
open dataset covers the files attached after it only once Rucio's judge-evaluator has run, so a
file could be confirmed by a rule that does not lock it yet; and a rule of length x copies >=
10,000 goes asynchronous (INJECT, judge-injector). The batch's dataset holds exactly the files it
was made for, all attached before the rule is asked, so every file is locked as the rule is made.

Why a rule per batch rather than per file: on the PostgreSQL lake, 200 per-file rules take 2.3 s
of the server's time to make and 200 more calls to read back; one rule on a dataset of 200 takes
0.22 s and two calls (the rule, its locks). Measured in docs/performance.md.

Custody does not rest on the batch's dataset: a file is confirmed by its own locks (one per copy,
OK) listed under the rule, never by the rule's state alone, so a file that is not in the dataset
(never attached, detached later) finds no lock and is asked a rule of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from .base import CopiesState
from .rucio_client import NotFound, RucioClient, RucioPermanent

# Rucio: a rule of length x copies >= 10,000 is injected asynchronously; the request schema
# takes at most 1,000 DIDs in a list
ASYNC_LOCKS = 10_000
MAX_FILES = 1_000
# Rucio's DID names: at most 250 characters (common/schema/generic.py, NAME_LENGTH)
MAX_NAME = 250
# A file's lake_ref while its rule is planned but not yet made: on a batch's dataset (its name
# follows), or on the file's own DID
PLANNED = "dataset:"
PLANNED_ALONE = "did:"


def files_per_rule(copies: int) -> int:
    """How many files one batch rule may cover and still be made at once (not INJECT)."""
    return max(1, min(MAX_FILES, (ASYNC_LOCKS - 1) // copies))


def dataset_name(base: str | None, dids: Iterable[tuple[str, str]]) -> str | None:
    """The name of the dataset a batch's rule is made on: the files' dataset (or `edge-agent`), then
    a digest of exactly these DIDs, so a batch asked again after a crash finds its own dataset and
    rule, and another set of files never shares them. None when the name would be too long."""
    digest = hashlib.blake2b("\n".join(sorted(f"{s}:{n}" for s, n in set(dids))).encode(), digest_size=8)
    name = f"{base or 'edge-agent'}.rule-{digest.hexdigest()}"
    return name if len(name) <= MAX_NAME else None


def rule_on_batch(client: RucioClient, scope: str, name: str, dids: Sequence[tuple[str, str]], copies: int,
                  expression: str, *, lifetime: int | None, activity: str | None,
                  grouping: str) -> tuple[str, list[tuple[str, str]]]:
    """(the rule's id, the DIDs of `dids` it does not lock) for the rule of `copies` on
    `expression` made on the dataset `scope:name`: the files attached, the rule made, the dataset
    closed. Each call is safe to repeat: the dataset exists already, the files are attached
    already, the rule exists already (its id is found), the dataset is closed already. A dataset
    closed by an earlier attempt holds the files that attempt had: the others of `dids` are not
    locked by its rule and are returned (they get rules of their own)."""
    client.add_did(scope, name, "DATASET")
    outside: list[tuple[str, str]] = []
    try:
        client.attach([(scope, name, list(dids))])
    except RucioPermanent as exc:
        # a closed dataset (an earlier attempt got past its rule) is fine; a file or a container
        # of that name is refused (UnsupportedOperation too, but not a closed dataset)
        if exc.rucio_class != "UnsupportedOperation" or client.get_did(scope, name).get("open") is not False:
            raise
        held = {(str(c.get("scope")), str(c.get("name"))) for c in client.list_content(scope, name)}
        outside = [d for d in dids if d not in held]
    rule_id = client.add_rule(scope, name, copies, expression, lifetime=lifetime, activity=activity,
                              grouping=grouping)
    client.close_did(scope, name)
    return rule_id, outside


def give_up(client: RucioClient, scope: str, name: str, dids: Sequence[tuple[str, str]]) -> None:
    """The rule on `scope:name` was refused: its files are detached from the (open) dataset, so
    that a rule made on it later for some of them (asked again with their plan) never locks the
    others, which get rules of their own now. A file not attached (any more) is fine."""
    try:
        client.detach(scope, name, dids)
    except NotFound:
        for d in dids:          # one of them was not there: the others, one by one
            try:
                client.detach(scope, name, [d])
            except NotFound:
                pass


def file_states(rule: dict[str, Any], locks: Sequence[dict[str, Any]],
                dids: Iterable[tuple[str, str]]) -> dict[tuple[str, str], CopiesState]:
    """Each file's copies under a rule on a collection, from the rule's own locks of that file:
    OK when `copies` of them are OK, STUCK when one is, SUSPENDED with the rule, MISSING when the
    rule holds no lock of the file (it is not covered: a rule of its own is asked), else
    REPLICATING. A rule not yet evaluated (INJECT, WAITING_APPROVAL) has no locks: REPLICATING."""
    state = str(rule.get("state") or "")
    copies = int(rule.get("copies") or 0)
    by_file: dict[tuple[str, str], list[str]] = {}
    for lock in locks:
        by_file.setdefault((str(lock.get("scope")), str(lock.get("name"))), []).append(str(lock.get("state")))
    out: dict[tuple[str, str], CopiesState] = {}
    for did in dids:
        held = by_file.get(did, [])
        if state == "SUSPENDED":
            out[did] = CopiesState.SUSPENDED
        elif state in ("INJECT", "WAITING_APPROVAL"):
            out[did] = CopiesState.REPLICATING
        elif not held:
            out[did] = CopiesState.MISSING
        elif "STUCK" in held:
            out[did] = CopiesState.STUCK
        elif copies >= 1 and held.count("OK") >= copies:
            out[did] = CopiesState.OK
        else:
            out[did] = CopiesState.REPLICATING
    return out
