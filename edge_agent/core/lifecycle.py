"""The life of one version of one file, as data.

    discovered -> complete -> hashed -> registered -> transferred -> confirmed -> deleted

plus retry_wait (a retryable failure; resumes the state it left), quarantined (a
permanent failure with its reason; `edge-agent retry` resumes it) and superseded
(the file changed or moved after hashing: this version ends, a new one begins).
Every transition is committed to the ledger before its side effect is acknowledged.
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    DISCOVERED = "discovered"    # seen, not yet complete by the rule's completion policy
    COMPLETE = "complete"        # the writer is done; ready to hash
    HASHED = "hashed"            # blake3/adler32(/md5) and the stat they belong to are recorded
    #                              (where the agent writes copies, the first one was written in that read)
    REGISTERED = "registered"    # the DID exists in the lake catalogue (dataset, metadata)
    TRANSFERRED = "transferred"  # copies written, replicas registered, copies requested
    CONFIRMED = "confirmed"      # the lake holds >= N verified replicas
    DELETED = "deleted"          # the local copy is gone; final
    RETRY_WAIT = "retry_wait"    # waiting out a backoff before resuming `resume_state`
    QUARANTINED = "quarantined"  # needs a human; `reason` says why; never deleted
    SUPERSEDED = "superseded"    # replaced by a newer version (rewritten, renamed, vanished); final

    def __str__(self) -> str:
        return self.value


class Event(str, enum.Enum):
    COMPLETED = "completed"
    HASHED = "hashed"
    REGISTERED = "registered"
    TRANSFERRED = "transferred"
    CONFIRMED = "confirmed"
    DELETED = "deleted"
    FAILED_RETRYABLE = "failed_retryable"
    FAILED_PERMANENT = "failed_permanent"
    RETRY_DUE = "retry_due"
    OPERATOR_RETRY = "operator_retry"
    CHANGED = "changed"      # content or stat moved under us before hashing finished: start over
    SUPERSEDED = "superseded"

    def __str__(self) -> str:
        return self.value


# The states in which the agent is still working on a file (it appears in backlogs).
ACTIVE = frozenset({State.DISCOVERED, State.COMPLETE, State.HASHED, State.REGISTERED,
                    State.TRANSFERRED, State.CONFIRMED, State.RETRY_WAIT})
# Not yet safely in the lake and still moving: what "backlog" means on the page and in the metrics.
# (Quarantined files wait for a human and are counted apart; confirmed ones only wait for deletion.)
BACKLOG = frozenset({State.DISCOVERED, State.COMPLETE, State.HASHED, State.REGISTERED,
                     State.TRANSFERRED, State.RETRY_WAIT})
FINAL = frozenset({State.DELETED, State.SUPERSEDED})
# States from which a failure can be retried: the step that failed is the one leading out of them.
WORKING = (State.COMPLETE, State.HASHED, State.REGISTERED, State.TRANSFERRED, State.CONFIRMED)

# The happy path: (state, event) -> next state.
_FORWARD: dict[tuple[State, Event], State] = {
    (State.DISCOVERED, Event.COMPLETED): State.COMPLETE,
    (State.COMPLETE, Event.HASHED): State.HASHED,
    (State.HASHED, Event.REGISTERED): State.REGISTERED,
    (State.REGISTERED, Event.TRANSFERRED): State.TRANSFERRED,
    (State.TRANSFERRED, Event.CONFIRMED): State.CONFIRMED,
    (State.CONFIRMED, Event.DELETED): State.DELETED,
}

TRANSITIONS: dict[tuple[State, Event], State] = dict(_FORWARD)
for _s in (State.DISCOVERED, *WORKING):
    TRANSITIONS[(_s, Event.FAILED_RETRYABLE)] = State.RETRY_WAIT
    TRANSITIONS[(_s, Event.FAILED_PERMANENT)] = State.QUARANTINED
    TRANSITIONS[(_s, Event.SUPERSEDED)] = State.SUPERSEDED
for _s in (State.RETRY_WAIT, State.QUARANTINED):
    TRANSITIONS[(_s, Event.SUPERSEDED)] = State.SUPERSEDED
    TRANSITIONS[(_s, Event.FAILED_PERMANENT)] = State.QUARANTINED
# Before the hash is taken a changing file simply goes back to waiting for completion.
TRANSITIONS[(State.COMPLETE, Event.CHANGED)] = State.DISCOVERED
TRANSITIONS[(State.RETRY_WAIT, Event.CHANGED)] = State.DISCOVERED
TRANSITIONS[(State.QUARANTINED, Event.CHANGED)] = State.DISCOVERED

# Resuming: retry_wait and quarantined go back to the state recorded when they were entered.
RESUMABLE = frozenset({State.RETRY_WAIT, State.QUARANTINED})


class IllegalTransition(Exception):
    pass


def next_state(state: State, event: Event, resume_state: State | None = None) -> State:
    """The state after `event` in `state`; resuming events return `resume_state`."""
    if event in (Event.RETRY_DUE, Event.OPERATOR_RETRY):
        if state not in RESUMABLE or resume_state is None:
            raise IllegalTransition(f"{event} in {state}")
        if event is Event.RETRY_DUE and state is not State.RETRY_WAIT:
            raise IllegalTransition(f"{event} in {state}")
        return resume_state
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event} in {state}") from None


def may_delete_local(state: State) -> bool:
    """Only a confirmed file may lose its local copy (the deletion policy decides when)."""
    return state is State.CONFIRMED
