"""The life of one version of one file, as data: states, events, every legal move, the step that
leads out of each state and the pool it runs in, the states of each copy and each lake name, and
`apply`, the rules every move follows. The ledger stores what `apply` returns and decides nothing.

    discovered -> complete -> hashed -> registered -> copied -> transferred -> confirmed -> deleted

plus retry_wait (a retryable failure; resumes the state it left), quarantined (a permanent failure
with its reason; `edge-agent retry` resumes it) and superseded (the file changed or moved after
hashing: this version ends, a new one begins). Every transition is committed to the ledger before
its side effect is acknowledged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol


class State(str, enum.Enum):
    """Where a file version is in its life (the ledger's `state` column)."""
    DISCOVERED = "discovered"    # seen, not yet complete by the rule's completion policy
    COMPLETE = "complete"        # the writer is done; ready to hash
    HASHED = "hashed"            # blake3/adler32(/md5) and the stat they belong to are recorded
    #                              (where the agent writes copies, the first one was written in that read)
    REGISTERED = "registered"    # the DID exists in the lake catalogue (dataset, metadata)
    COPIED = "copied"            # the copies the agent writes are written and verified (recorded 'sent')
    TRANSFERRED = "transferred"  # copies recorded in the catalogue, the lake's copies requested
    CONFIRMED = "confirmed"      # the lake holds >= N verified replicas
    DELETED = "deleted"          # the local copy is gone; final
    RETRY_WAIT = "retry_wait"    # waiting out a backoff before resuming `resume_state`
    QUARANTINED = "quarantined"  # needs a human; `reason` says why; never deleted
    SUPERSEDED = "superseded"    # replaced by a newer version (rewritten, renamed, vanished); final

    def __str__(self) -> str:
        return self.value


class Event(str, enum.Enum):
    """What happens to a file. The first group moves it (the table below); the notes are written to
    its history without moving it. The ledger's `events` table stores these values."""
    COMPLETED = "completed"
    HASHED = "hashed"
    REGISTERED = "registered"
    COPIED = "copied"
    TRANSFERRED = "transferred"
    CONFIRMED = "confirmed"
    DELETED = "deleted"
    FAILED_RETRYABLE = "failed_retryable"
    FAILED_PERMANENT = "failed_permanent"
    RETRY_DUE = "retry_due"
    OPERATOR_RETRY = "operator_retry"
    CHANGED = "changed"      # content or stat moved under us before hashing finished: start over
    SUPERSEDED = "superseded"
    # a copy the agent wrote is bad or gone while the buffer still holds the file: back to
    # REGISTERED (after a backoff) to write it again
    REWRITE_COPIES = "rewrite_copies"
    # notes: history only
    DISCOVERED = "discovered"            # the first event of a version (it has no state before)
    COPY_WRITTEN = "copy_written"        # a copy written and verified (detail: location, url, speed)
    REPLICA_LOST = "replica_lost"        # a replica does not verify (detail "rewrite": being rewritten)
    STUCK = "stuck"                      # the lake's copies are stuck, suspended or overdue
    RULE_RECREATED = "rule_recreated"    # the lake's request for copies was gone: asked again

    def __str__(self) -> str:
        return self.value


NOTES = frozenset({Event.DISCOVERED, Event.COPY_WRITTEN, Event.REPLICA_LOST, Event.STUCK, Event.RULE_RECREATED})
# the events the status page lists as recent errors (the ledger indexes exactly these)
PROBLEMS = (Event.FAILED_RETRYABLE, Event.FAILED_PERMANENT, Event.STUCK, Event.REPLICA_LOST, Event.SUPERSEDED,
            Event.REWRITE_COPIES)


class CopyState(str, enum.Enum):
    """A copy the agent writes itself, as the ledger records it per (version, location)."""
    WRITING = "writing"   # the URL was found empty and claimed before the bytes went (a crash mid-write
    #                       leaves a URL known to be this version's own)
    SENT = "sent"         # written and verified, not in the catalogue yet (the first copy in the hashing
    #                       pass, the others by the transfer step); the record step records them
    WRITTEN = "written"   # written, verified and recorded in the lake's catalogue
    BAD = "bad"           # the storage hands back other bytes: to be written again
    LOST = "lost"         # gone from the storage: to be written again
    REMOVED = "removed"   # an unregistered copy of an ended version, removed

    def __str__(self) -> str:
        return self.value


# copies this version wrote and may count, or recognise, as its own
COPIES_WRITTEN = (CopyState.SENT, CopyState.WRITTEN)


class NameState(str, enum.Enum):
    """Who may write under one lake name (scope:name), and what content it holds."""
    WRITING = "writing"     # reserved by its owner, who writes the first copy; content not known yet
    BOUND = "bound"         # holds one content (blake3): the same bytes share it
    REMOVING = "removing"   # its owner removes a copy nobody else counts

    def __str__(self) -> str:
        return self.value


# The states in which the agent is still working on a file (it appears in backlogs).
ACTIVE = frozenset({State.DISCOVERED, State.COMPLETE, State.HASHED, State.REGISTERED, State.COPIED,
                    State.TRANSFERRED, State.CONFIRMED, State.RETRY_WAIT})
# Not yet safely in the lake and still moving: what "backlog" means on the page and in the metrics.
# (Quarantined files wait for a human and are counted apart; confirmed ones only wait for deletion.)
BACKLOG = frozenset({State.DISCOVERED, State.COMPLETE, State.HASHED, State.REGISTERED, State.COPIED,
                     State.TRANSFERRED, State.RETRY_WAIT})
FINAL = frozenset({State.DELETED, State.SUPERSEDED})
# States from which a failure can be retried: the step that failed is the one leading out of them.
WORKING = (State.COMPLETE, State.HASHED, State.REGISTERED, State.COPIED, State.TRANSFERRED, State.CONFIRMED)
# Waiting states that go back to the state recorded when they were entered (`resume_state`).
RESUMABLE = frozenset({State.RETRY_WAIT, State.QUARANTINED})
# Not hashed yet: the evidence of a version begins with its hash.
UNHASHED = (State.DISCOVERED, State.COMPLETE, State.RETRY_WAIT, State.QUARANTINED)


@dataclass(frozen=True)
class Step:
    """The work that leads a file out of a state: its name (a module of edge_agent.steps), the
    worker pool it runs in, the event it ends with when it succeeds and the state that leads to.
    `batched`: the step takes many files of one rule and dataset at once (catalogue calls in bulk,
    its moves committed together); otherwise one file at a time (storage I/O)."""
    name: str
    pool: str
    done: Event
    to: State
    batched: bool = False


POOLS = ("hash", "transfer", "lake")
STEPS: dict[State, Step] = {
    State.COMPLETE: Step("hash", "hash", Event.HASHED, State.HASHED),
    State.HASHED: Step("register", "lake", Event.REGISTERED, State.REGISTERED, batched=True),
    State.REGISTERED: Step("transfer", "transfer", Event.COPIED, State.COPIED),
    State.COPIED: Step("record", "lake", Event.TRANSFERRED, State.TRANSFERRED, batched=True),
    State.TRANSFERRED: Step("confirm", "lake", Event.CONFIRMED, State.CONFIRMED, batched=True),
    State.CONFIRMED: Step("delete", "lake", Event.DELETED, State.DELETED, batched=True),
}

# The step entered by a success that hands its evidence to the next step at once, in the same
# worker: confirm passes the confirmation it just took to delete (the lake is not asked twice for
# one decision). Each of the two moves is its own commit.
AT_ONCE = frozenset({State.CONFIRMED})


def states_of_pool(pool: str) -> list[State]:
    """The states whose step runs in `pool`."""
    return [s for s, step in STEPS.items() if step.pool == pool]


# Every legal move: (state, event) -> next state. RESUME means "the state recorded on entering".
RESUME = None
TRANSITIONS: dict[tuple[State, Event], State | None] = {(s, step.done): step.to for s, step in STEPS.items()}
TRANSITIONS[(State.DISCOVERED, Event.COMPLETED)] = State.COMPLETE
for _s in (State.DISCOVERED, *WORKING):
    TRANSITIONS[(_s, Event.FAILED_RETRYABLE)] = State.RETRY_WAIT
    TRANSITIONS[(_s, Event.FAILED_PERMANENT)] = State.QUARANTINED
    TRANSITIONS[(_s, Event.SUPERSEDED)] = State.SUPERSEDED
for _s in RESUMABLE:
    TRANSITIONS[(_s, Event.SUPERSEDED)] = State.SUPERSEDED
    TRANSITIONS[(_s, Event.FAILED_PERMANENT)] = State.QUARANTINED
    TRANSITIONS[(_s, Event.OPERATOR_RETRY)] = RESUME
TRANSITIONS[(State.RETRY_WAIT, Event.RETRY_DUE)] = RESUME
# Before the hash is taken a changing file simply goes back to waiting for completion.
for _s in (State.COMPLETE, *RESUMABLE):
    TRANSITIONS[(_s, Event.CHANGED)] = State.DISCOVERED
# A copy bad or gone after it was written: wait out a backoff, then write it again.
for _s in (State.TRANSFERRED, State.CONFIRMED):
    TRANSITIONS[(_s, Event.REWRITE_COPIES)] = State.RETRY_WAIT

# Where a wait entered by an event resumes: by default the state it was entered from.
_RESUMES_AT = {Event.REWRITE_COPIES: State.REGISTERED}


class IllegalTransition(Exception):
    """An event that the transition table does not allow in the file's state."""


class Position(Protocol):
    """What `apply` needs of a file: where it is (a ledger row, a FileRecord)."""
    @property
    def state(self) -> State: ...

    @property
    def resume_state(self) -> State | None: ...


def next_state(state: State, event: Event, resume_state: State | None = None) -> State:
    """The state after `event` in `state`; a resuming move returns `resume_state`."""
    try:
        nxt = TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event} in {state}") from None
    if nxt is RESUME:
        if resume_state is None:
            raise IllegalTransition(f"{event} in {state} with nothing to resume")
        return resume_state
    return nxt


def apply(record: Position, event: Event, now: float) -> tuple[State, dict[str, Any]]:
    """The state after `event` and the columns the move sets: the rules every move follows.

    - entering a wait (retry_wait, quarantined) remembers where to resume (kept across waits);
    - resuming, starting over (changed) or ending clears it; an operator's retry also resets the
      attempts and makes the file due now;
    - confirmed and deleted are time-stamped; the warning (`reason`) is cleared by every move
      except into a wait or an end by supersession, which carry it.
    Raises IllegalTransition for a move not in the table.
    """
    state, resume = record.state, record.resume_state
    new = next_state(state, event, resume)
    updates: dict[str, Any] = {"state": new, "updated_at": now}
    if new in RESUMABLE:
        updates["resume_state"] = _RESUMES_AT.get(event) or (resume if state in RESUMABLE else state)
    elif event in (Event.RETRY_DUE, Event.OPERATOR_RETRY, Event.CHANGED) or new in FINAL:
        updates["resume_state"] = None
    if event is Event.OPERATOR_RETRY:
        updates["attempts"] = 0
        updates["next_at"] = 0
    if new is State.CONFIRMED:
        updates["confirmed_at"] = now
    if new is State.DELETED:
        updates["deleted_at"] = now
    if new not in RESUMABLE and new is not State.SUPERSEDED:
        updates["reason"] = None
    return new, updates


# The move in whose commit a version's lake name is bound to its content.
BINDS_NAME = State.HASHED
