"""Every (state, event) pair the code uses is an edge of the lifecycle's table, read from the source:
a move written anywhere in edge_agent/ that the table does not hold fails here, not at 3 a.m."""

from __future__ import annotations

import ast
from pathlib import Path

from edge_agent.core.lifecycle import NOTES, STEPS, TRANSITIONS, Event, State

PACKAGE = Path(__file__).resolve().parents[3] / "edge_agent"
EVENTS_IN_TABLE = {e for _, e in TRANSITIONS}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def _member(node: ast.AST, enum_name: str) -> str | None:
    """`State.X` / `Event.Y` as written: the member's name."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == enum_name:
        return node.attr
    return None


def test_every_literal_state_and_event_passed_together_is_an_edge() -> None:
    seen = []
    for path, tree in _modules():
        if path.name == "lifecycle.py":
            continue      # the table itself: Step(name, pool, done, to) names the state it leads to
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            states = [m for a in call.args if (m := _member(a, "State"))]
            events = [m for a in call.args if (m := _member(a, "Event"))]
            if len(states) == 1 and len(events) == 1 and Event[events[0]] not in NOTES:
                pair = (State[states[0]], Event[events[0]])
                seen.append(pair)
                assert pair in TRANSITIONS, f"{path.relative_to(PACKAGE)}:{call.lineno}: {pair} is not an edge"
    # the shell's own moves (completion, retries) are among them: the scan does find calls
    assert (State.DISCOVERED, Event.COMPLETED) in seen and (State.RETRY_WAIT, Event.RETRY_DUE) in seen


def test_every_event_the_code_names_is_an_edge_or_a_note() -> None:
    for path, tree in _modules():
        if path.name == "lifecycle.py":
            continue
        for node in ast.walk(tree):
            name = _member(node, "Event")
            if name is not None:
                event = Event[name]
                assert event in EVENTS_IN_TABLE or event in NOTES, f"{path.relative_to(PACKAGE)}: {event}"


def test_each_step_module_moves_only_along_its_own_edges() -> None:
    """A step module's moves (ctx.move(rec, Event.X), or (rec, Event.X, ...) for ctx.move_many) leave
    the state the table gives that step."""
    for state, step in STEPS.items():
        tree = ast.parse((PACKAGE / "steps" / f"{step.name}.py").read_text())
        events: list[tuple[int, str | None]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "move":
                events.append((node.lineno, _member(node.args[1], "Event") if len(node.args) > 1 else None))
            elif isinstance(node, ast.Tuple) and len(node.elts) >= 2 and _member(node.elts[1], "Event") \
                    and Event[_member(node.elts[1], "Event") or ""] not in NOTES:
                events.append((node.lineno, _member(node.elts[1], "Event")))
        assert events, step.name
        for line, name in events:
            assert name is not None, f"steps/{step.name}.py:{line}: the event is not written out"
            assert (state, Event[name]) in TRANSITIONS, f"steps/{step.name}.py:{line}: {Event[name]} in {state}"


def test_history_notes_are_notes() -> None:
    for path, tree in _modules():
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            if isinstance(call.func, ast.Attribute) and call.func.attr == "note" and len(call.args) >= 3:
                name = _member(call.args[2], "Event")
                assert name is not None and Event[name] in NOTES, f"{path.relative_to(PACKAGE)}:{call.lineno}"
