"""The file state machine: the table is checked against an independent spelling of the spec."""

from __future__ import annotations

import itertools

import pytest

from edge_agent.core.lifecycle import (
    ACTIVE,
    FINAL,
    NOTES,
    RESUME,
    RESUMABLE,
    STEPS,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    apply,
    next_state,
    states_of_pool,
)

S, E = State, Event

# The lifecycle as the module docstring describes it, written out edge by edge.
SPEC: dict[tuple[State, Event], State] = {
    (S.DISCOVERED, E.COMPLETED): S.COMPLETE,
    (S.COMPLETE, E.HASHED): S.HASHED,
    (S.HASHED, E.REGISTERED): S.REGISTERED,
    (S.REGISTERED, E.COPIED): S.COPIED,
    (S.COPIED, E.TRANSFERRED): S.TRANSFERRED,
    (S.TRANSFERRED, E.CONFIRMED): S.CONFIRMED,
    (S.CONFIRMED, E.DELETED): S.DELETED,
    # failures from every state the agent is working in
    **{(s, E.FAILED_RETRYABLE): S.RETRY_WAIT
       for s in (S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.CONFIRMED)},
    **{(s, E.FAILED_PERMANENT): S.QUARANTINED
       for s in (S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.CONFIRMED,
                 S.RETRY_WAIT, S.QUARANTINED)},
    **{(s, E.SUPERSEDED): S.SUPERSEDED
       for s in (S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.CONFIRMED,
                 S.RETRY_WAIT, S.QUARANTINED)},
    # a file that changes before its hash is taken goes back to waiting for completion
    (S.COMPLETE, E.CHANGED): S.DISCOVERED,
    (S.RETRY_WAIT, E.CHANGED): S.DISCOVERED,
    (S.QUARANTINED, E.CHANGED): S.DISCOVERED,
    # a copy found bad or gone after it was written: wait, then write it again
    (S.TRANSFERRED, E.REWRITE_COPIES): S.RETRY_WAIT,
    (S.CONFIRMED, E.REWRITE_COPIES): S.RETRY_WAIT,
}
RESUMING = (E.RETRY_DUE, E.OPERATOR_RETRY)
# resuming edges: back to the state recorded when the wait was entered
RESUMES = {(S.RETRY_WAIT, E.RETRY_DUE), (S.RETRY_WAIT, E.OPERATOR_RETRY), (S.QUARANTINED, E.OPERATOR_RETRY)}


def test_table_is_exactly_the_spec() -> None:
    assert TRANSITIONS == {**SPEC, **{k: RESUME for k in RESUMES}}


@pytest.mark.parametrize(("state", "event"), sorted(SPEC, key=str))
def test_every_edge(state: State, event: Event) -> None:
    assert next_state(state, event) is SPEC[(state, event)]


ILLEGAL = [(s, e) for s, e in itertools.product(State, Event) if (s, e) not in SPEC and e not in RESUMING]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_other_pair_is_illegal(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition, match=f"{event.value} in {state.value}"):
        next_state(state, event)


def test_some_illegal_transitions_by_name() -> None:
    # skipping steps, going backwards, hashing twice
    for s, e in [(S.DISCOVERED, E.HASHED), (S.HASHED, E.CONFIRMED), (S.TRANSFERRED, E.DELETED),
                 (S.HASHED, E.HASHED), (S.REGISTERED, E.COMPLETED), (S.HASHED, E.CHANGED),
                 (S.CONFIRMED, E.CHANGED)]:
        with pytest.raises(IllegalTransition):
            next_state(s, e)


def test_happy_path() -> None:
    s = S.DISCOVERED
    seen = [s]
    for e in (E.COMPLETED, E.HASHED, E.REGISTERED, E.COPIED, E.TRANSFERRED, E.CONFIRMED, E.DELETED):
        s = next_state(s, e)
        seen.append(s)
    assert seen == [S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.CONFIRMED,
                    S.DELETED]


@pytest.mark.parametrize("resume", [S.COMPLETE, S.HASHED, S.REGISTERED, S.TRANSFERRED, S.CONFIRMED])
def test_retry_due_resumes_the_given_state(resume: State) -> None:
    assert next_state(S.RETRY_WAIT, E.RETRY_DUE, resume) is resume


@pytest.mark.parametrize("state", [S.RETRY_WAIT, S.QUARANTINED])
@pytest.mark.parametrize("resume", [S.COMPLETE, S.HASHED, S.TRANSFERRED])
def test_operator_retry_resumes_the_given_state(state: State, resume: State) -> None:
    assert next_state(state, E.OPERATOR_RETRY, resume) is resume


def test_retry_due_does_not_release_a_quarantined_file() -> None:
    # only a human lets a quarantined file go again
    with pytest.raises(IllegalTransition):
        next_state(S.QUARANTINED, E.RETRY_DUE, S.HASHED)


@pytest.mark.parametrize("event", RESUMING)
@pytest.mark.parametrize("state", [S.RETRY_WAIT, S.QUARANTINED])
def test_resuming_without_a_resume_state_is_illegal(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        next_state(state, event, None)


@pytest.mark.parametrize("event", RESUMING)
@pytest.mark.parametrize("state", [s for s in State if s not in RESUMABLE])
def test_resuming_from_a_non_waiting_state_is_illegal(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        next_state(state, event, S.HASHED)


@pytest.mark.parametrize("final", [S.DELETED, S.SUPERSEDED])
@pytest.mark.parametrize("event", list(Event))
def test_final_states_have_no_way_out(final: State, event: Event) -> None:
    with pytest.raises(IllegalTransition):
        next_state(final, event, S.COMPLETE)


def test_final_states_have_no_outgoing_edge_in_the_table() -> None:
    assert not [k for k in TRANSITIONS if k[0] in (S.DELETED, S.SUPERSEDED)]


def test_state_sets() -> None:
    assert FINAL == {S.DELETED, S.SUPERSEDED}
    assert ACTIVE == {S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.CONFIRMED,
                      S.RETRY_WAIT}
    assert not ACTIVE & FINAL
    assert S.QUARANTINED not in ACTIVE and S.QUARANTINED not in FINAL


def test_every_state_reachable_from_discovered() -> None:
    reach = {S.DISCOVERED}
    frontier = [S.DISCOVERED]
    while frontier:
        s = frontier.pop()
        for (a, _), b in TRANSITIONS.items():
            if a is s and b is not RESUME and b not in reach:
                reach.add(b)
                frontier.append(b)
    assert reach == set(State)


def test_every_working_state_has_one_step_and_each_pool_has_work() -> None:
    assert set(STEPS) == {S.COMPLETE, S.HASHED, S.REGISTERED, S.COPIED, S.TRANSFERRED, S.CONFIRMED}
    for state, step in STEPS.items():
        assert TRANSITIONS[(state, step.done)] is step.to
    assert states_of_pool("hash") == [S.COMPLETE]
    assert states_of_pool("transfer") == [S.REGISTERED]
    assert states_of_pool("lake") == [S.HASHED, S.COPIED, S.TRANSFERRED, S.CONFIRMED]


def test_notes_never_move_a_file() -> None:
    assert not [k for k in TRANSITIONS if k[1] in NOTES]


class Row:
    def __init__(self, state: State, resume_state: State | None = None) -> None:
        self.state, self.resume_state = state, resume_state


def test_apply_entering_a_wait_remembers_where_to_resume() -> None:
    new, upd = apply(Row(S.REGISTERED), E.FAILED_RETRYABLE, 10.0)
    assert new is S.RETRY_WAIT and upd["resume_state"] is S.REGISTERED and "reason" not in upd
    # quarantined after waiting: still resumes where the failure happened
    new, upd = apply(Row(S.RETRY_WAIT, S.REGISTERED), E.FAILED_PERMANENT, 11.0)
    assert new is S.QUARANTINED and upd["resume_state"] is S.REGISTERED


def test_apply_a_rewrite_resumes_at_registered() -> None:
    for state in (S.TRANSFERRED, S.CONFIRMED):
        new, upd = apply(Row(state), E.REWRITE_COPIES, 1.0)
        assert new is S.RETRY_WAIT and upd["resume_state"] is S.REGISTERED
    new, upd = apply(Row(S.RETRY_WAIT, S.REGISTERED), E.RETRY_DUE, 2.0)
    assert new is S.REGISTERED and upd["resume_state"] is None and upd["reason"] is None


def test_apply_operator_retry_resets_attempts_and_is_due_now() -> None:
    new, upd = apply(Row(S.QUARANTINED, S.TRANSFERRED), E.OPERATOR_RETRY, 5.0)
    assert new is S.TRANSFERRED
    assert upd == {"state": S.TRANSFERRED, "updated_at": 5.0, "resume_state": None, "attempts": 0,
                   "next_at": 0, "reason": None}


def test_apply_stamps_confirmation_and_deletion_and_ends_keep_their_reason() -> None:
    assert apply(Row(S.TRANSFERRED), E.CONFIRMED, 7.0)[1]["confirmed_at"] == 7.0
    assert apply(Row(S.CONFIRMED), E.DELETED, 8.0)[1]["deleted_at"] == 8.0
    new, upd = apply(Row(S.HASHED), E.SUPERSEDED, 9.0)
    assert new is S.SUPERSEDED and "reason" not in upd and upd["resume_state"] is None


def test_apply_refuses_a_move_not_in_the_table() -> None:
    with pytest.raises(IllegalTransition):
        apply(Row(S.HASHED), E.DELETED, 1.0)


def test_str_is_the_value() -> None:
    assert str(S.RETRY_WAIT) == "retry_wait"
    assert str(E.OPERATOR_RETRY) == "operator_retry"
