"""The fleet view's pure part: a heartbeat's figures, and how agents are shown (alive or silent)."""

from __future__ import annotations

from edge_agent.core import fleet
from edge_agent.core.fleet import Totals


def test_a_heartbeat_reports_rates_over_its_own_interval_and_the_totals() -> None:
    prev = Totals(1000.0, sent_bytes=1_000, hashed_bytes=0, files_transferred=4, files_deleted=1)
    cur = Totals(1030.0, sent_bytes=31_000, hashed_bytes=60_000, files_transferred=10, files_deleted=1)
    assert fleet.throughput(prev, cur, in_flight=3) == {
        "interval_s": 30.0, "sent_bytes_per_s": 1000.0, "hashed_bytes_per_s": 2000.0,
        "transferred_files_per_s": 0.2, "deleted_files_per_s": 0.0,
        "sent_bytes": 31_000, "files_transferred": 10, "files_deleted": 1, "in_flight": 3}


def test_no_rate_is_made_up_when_the_interval_is_empty_or_the_clock_stepped_back() -> None:
    cur = Totals(1000.0, sent_bytes=500)
    for prev in (Totals(1000.0), Totals(1010.0)):
        got = fleet.throughput(prev, cur, 0)
        assert got["sent_bytes_per_s"] == 0.0 and got["interval_s"] == 0.0 and got["sent_bytes"] == 500


def test_stored_figures_that_cannot_be_read_are_none_rather_than_an_error() -> None:
    assert fleet.decode_stats('{"sent_bytes_per_s": 5}') == {"sent_bytes_per_s": 5}
    for bad in (None, "", "not json", "[1, 2]", "3"):
        assert fleet.decode_stats(bad) == {}


def test_an_agent_is_silent_after_three_missed_heartbeats_not_one() -> None:
    assert fleet.SILENT_AFTER_S == 3 * fleet.HEARTBEAT_S
    assert not fleet.is_silent(0.0)
    assert not fleet.is_silent(fleet.HEARTBEAT_S * 2)          # one late heartbeat
    assert not fleet.is_silent(fleet.SILENT_AFTER_S)
    assert fleet.is_silent(fleet.SILENT_AFTER_S + 0.1)
    assert fleet.is_silent(None)                               # never heard of


def _agent(agent_id: str, beat: float, **kw: object) -> dict[str, object]:
    return {"agent_id": agent_id, "host": f"host-{agent_id}", "pid": 1, "version": "1.0", "started_at": 0.0,
            "heartbeat_at": beat, "stats": {"sent_bytes_per_s": 7.0}, **kw}


def test_the_view_joins_heartbeats_and_claims_and_marks_the_silent_ones() -> None:
    now = 10_000.0
    held = {
        "a1": {"claims": 12, "expired": 0, "by_state": {"hashed": 10, "transferred": 2},
               "files": [{"file_id": 5, "rule": "r", "path": "x.fits", "state": "hashed", "size": 10,
                          "claim_until": now + 250}]},
        "a2": {"claims": 3, "expired": 3, "by_state": {"complete": 3},
               "files": [{"file_id": 9, "rule": "r", "path": "y.fits", "state": "complete", "size": None,
                          "claim_until": now - 40}]},
        # claims under a name that never heartbeated (or whose row is gone): shown all the same
        "ghost": {"claims": 1, "expired": 1, "by_state": {"hashed": 1}, "files": []},
    }
    view = fleet.view([_agent("a2", now - 600), _agent("a1", now - 10), _agent("idle", now - 5)], held, now,
                      me="a1")
    assert view["silent_after_s"] == fleet.SILENT_AFTER_S
    by_id = {a["agent_id"]: a for a in view["agents"]}
    assert [a["agent_id"] for a in view["agents"]] == ["a1", "a2", "ghost", "idle"]
    a1, a2, ghost, idle = (by_id[k] for k in ("a1", "a2", "ghost", "idle"))
    assert (a1["this"], a1["silent"], a1["heartbeat_age_s"], a1["claims"], a1["host"]) == (True, False, 10.0, 12, "host-a1")
    assert a1["in_flight"]["by_state"] == {"hashed": 10, "transferred": 2} and a1["in_flight"]["more"] == 11
    assert a1["in_flight"]["files"][0]["lease_left_s"] == 250.0 and a1["throughput"] == {"sent_bytes_per_s": 7.0}
    assert (a2["this"], a2["silent"], a2["claims"], a2["expired_claims"]) == (False, True, 3, 3)
    assert a2["in_flight"]["files"][0]["lease_left_s"] == -40.0
    assert (ghost["silent"], ghost["heartbeat_age_s"], ghost["host"], ghost["claims"]) == (True, None, None, 1)
    assert (idle["silent"], idle["claims"], idle["in_flight"]) == (False, 0, {"by_state": {}, "files": [], "more": 0})
    # what the alert is about: silent and holding claims (an idle silent agent is not stranding anything)
    assert fleet.stranded(view) == ["a2", "ghost"]


def test_a_heartbeat_from_a_clock_ahead_is_not_a_negative_age() -> None:
    view = fleet.view([_agent("a1", 1030.0)], {}, 1000.0)
    assert view["agents"][0]["heartbeat_age_s"] == 0.0 and not view["agents"][0]["silent"]
