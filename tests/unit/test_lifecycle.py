"""The file state machine: the table is checked against an independent spelling of the spec."""

from __future__ import annotations

import itertools

import pytest

from edge_agent.core.lifecycle import (
    ACTIVE,
    FINAL,
    RESUMABLE,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    may_delete_local,
    next_state,
)

S, E = State, Event

# The lifecycle as the module docstring describes it, written out edge by edge.
SPEC: dict[tuple[State, Event], State] = {
    (S.DISCOVERED, E.COMPLETED): S.COMPLETE,
    (S.COMPLETE, E.HASHED): S.HASHED,
    (S.HASHED, E.REGISTERED): S.REGISTERED,
    (S.REGISTERED, E.TRANSFERRED): S.TRANSFERRED,
    (S.TRANSFERRED, E.CONFIRMED): S.CONFIRMED,
    (S.CONFIRMED, E.DELETED): S.DELETED,
    # failures from every state the agent is working in
    **{(s, E.FAILED_RETRYABLE): S.RETRY_WAIT
       for s in (S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.TRANSFERRED, S.CONFIRMED)},
    **{(s, E.FAILED_PERMANENT): S.QUARANTINED
       for s in (S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.TRANSFERRED, S.CONFIRMED,
                 S.RETRY_WAIT, S.QUARANTINED)},
    **{(s, E.SUPERSEDED): S.SUPERSEDED
       for s in (S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.TRANSFERRED, S.CONFIRMED,
                 S.RETRY_WAIT, S.QUARANTINED)},
    # a file that changes before its hash is taken goes back to waiting for completion
    (S.COMPLETE, E.CHANGED): S.DISCOVERED,
    (S.RETRY_WAIT, E.CHANGED): S.DISCOVERED,
    (S.QUARANTINED, E.CHANGED): S.DISCOVERED,
}
RESUMING = (E.RETRY_DUE, E.OPERATOR_RETRY)


def test_table_is_exactly_the_spec() -> None:
    assert TRANSITIONS == SPEC


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
    for e in (E.COMPLETED, E.HASHED, E.REGISTERED, E.TRANSFERRED, E.CONFIRMED, E.DELETED):
        s = next_state(s, e)
        seen.append(s)
    assert seen == [S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.TRANSFERRED, S.CONFIRMED,
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
    assert ACTIVE == {S.DISCOVERED, S.COMPLETE, S.HASHED, S.REGISTERED, S.TRANSFERRED, S.CONFIRMED,
                      S.RETRY_WAIT}
    assert not ACTIVE & FINAL
    assert S.QUARANTINED not in ACTIVE and S.QUARANTINED not in FINAL


def test_every_state_reachable_from_discovered() -> None:
    reach = {S.DISCOVERED}
    frontier = [S.DISCOVERED]
    while frontier:
        s = frontier.pop()
        for (a, _), b in TRANSITIONS.items():
            if a is s and b not in reach:
                reach.add(b)
                frontier.append(b)
    assert reach == set(State)


@pytest.mark.parametrize("state", list(State))
def test_only_confirmed_may_lose_its_local_copy(state: State) -> None:
    assert may_delete_local(state) is (state is S.CONFIRMED)


def test_str_is_the_value() -> None:
    assert str(S.RETRY_WAIT) == "retry_wait"
    assert str(E.OPERATOR_RETRY) == "operator_retry"
