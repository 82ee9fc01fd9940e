"""A ledger knows the host and buffer it was written for, and refuses another until adopted."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest

from edge_agent import identity
from edge_agent.app import Agent, claim_ledger
from edge_agent.cli import main
from edge_agent.errors import ConfigError
from edge_agent.ledger import Ledger
from edge_agent.localfs import is_agent_temp
from edge_agent.settings import Settings

HERE = {"machine_id": "aaaa", "hostname": "daq1", "rule r directory": "/daq inode=2", "rule r device": "1"}


@pytest.fixture
def ledger(tmp_path: Path) -> Any:
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def test_machine_id_is_read_from_the_first_file_that_has_one(tmp_path: Path) -> None:
    empty, real = tmp_path / "empty", tmp_path / "real"
    empty.write_text("\n")
    real.write_text("0123abcd\n")
    assert identity.machine_id((str(tmp_path / "missing"), str(empty), str(real))) == "0123abcd"
    assert identity.machine_id((str(tmp_path / "missing"),)) == "unknown"


def test_current_identity_names_each_existing_rule_directory(tmp_path: Path,
                                                             settings_data: Callable[..., Any]) -> None:
    (tmp_path / "daq").mkdir()
    data = settings_data(tmp_path)
    data["rules"]["later"] = {**data["rules"]["r"], "directory": str(tmp_path / "not-yet")}
    ident = identity.current(Settings(**data))
    st = (tmp_path / "daq").stat()
    assert ident["rule r directory"] == f"{tmp_path / 'daq'} inode={st.st_ino}"
    assert ident["rule r device"] == str(st.st_dev)
    assert "rule later directory" not in ident           # compared once it exists
    assert ident["machine_id"] and ident["hostname"]


def test_only_keys_both_sides_know_are_compared() -> None:
    assert identity.differences(HERE, {**HERE, "rule new directory": "x"}) == []
    assert identity.differences({**HERE, "rule gone directory": "y"}, HERE) == []
    diffs = identity.differences(HERE, {**HERE, "hostname": "daq2", "machine_id": "bbbb"})
    assert diffs == ["hostname: ledger has 'daq1', here it is 'daq2'",
                     "machine_id: ledger has 'aaaa', here it is 'bbbb'"]


def test_a_new_ledger_records_its_identity_and_accepts_its_own_host(ledger: Ledger) -> None:
    assert claim_ledger(ledger, HERE) == []
    assert json.loads(ledger.meta("identity") or "") == HERE
    assert claim_ledger(ledger, HERE) == []


def test_a_ledger_from_another_host_is_refused_naming_what_differs(ledger: Ledger) -> None:
    claim_ledger(ledger, HERE)
    with pytest.raises(ConfigError) as err:
        claim_ledger(ledger, {**HERE, "machine_id": "bbbb"})
    msg = str(err.value)
    assert "machine_id: ledger has 'aaaa', here it is 'bbbb'" in msg and "edge-agent adopt-ledger" in msg
    assert json.loads(ledger.meta("identity") or "") == HERE       # refusing changes nothing


def test_adopting_records_the_new_identity(ledger: Ledger) -> None:
    claim_ledger(ledger, HERE)
    moved = {**HERE, "rule r directory": "/daq inode=7"}
    assert claim_ledger(ledger, moved, adopt=True) == ["rule r directory: ledger has '/daq inode=2', "
                                                       "here it is '/daq inode=7'"]
    assert claim_ledger(ledger, moved) == []


def test_a_new_device_number_alone_is_no_reason_to_refuse(ledger: Ledger) -> None:
    # disks found in another order at boot, or a tmpfs buffer mounted again
    claim_ledger(ledger, HERE)
    assert claim_ledger(ledger, {**HERE, "rule r device": "99"}) == []
    assert json.loads(ledger.meta("identity") or "")["rule r device"] == "99"


def test_a_rule_added_later_is_recorded_without_complaint(ledger: Ledger) -> None:
    claim_ledger(ledger, HERE)
    more = {**HERE, "rule b directory": "/b inode=3"}
    assert claim_ledger(ledger, more) == []
    assert json.loads(ledger.meta("identity") or "") == more


def test_a_ledger_written_before_identities_gains_one_on_first_start(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta WHERE key = 'identity'")
    db.commit()
    db.close()
    led = Ledger(path)
    assert led.meta("identity") is None
    assert claim_ledger(led, HERE) == []
    assert json.loads(led.meta("identity") or "") == HERE
    led.close()


def _close(agent: Agent) -> None:
    agent.ledger.close()
    agent.catalogue.close()
    agent.buffers.release()
    os.close(agent._lock_fd)


def _with_identity(settings: Settings, **changes: str) -> None:
    led = Ledger(settings.ledger_path)
    raw = json.loads(led.meta("identity") or "{}")
    led.set_meta("identity", json.dumps({**raw, **changes}))
    led.close()


def test_the_agent_refuses_a_foreign_ledger_until_adopt_ledger(tmp_path: Path,
                                                               settings_data: Callable[..., Any],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "daq").mkdir()
    data = settings_data(tmp_path, status={"enabled": False})
    settings = Settings(**data)
    for d in ("lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    _close(Agent(settings))                  # first start: identity recorded
    _with_identity(settings, hostname="elsewhere")
    with pytest.raises(ConfigError, match="hostname: ledger has 'elsewhere'"):
        Agent(settings)
    cfg = tmp_path / "agent.toml"
    from support import write_toml
    write_toml(cfg, data)
    assert main(["-c", str(cfg), "adopt-ledger"]) == 0
    out = capsys.readouterr().out
    assert "adopted" in out and "elsewhere" in out
    _close(Agent(settings))                  # accepted now
    assert main(["-c", str(cfg), "adopt-ledger"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_adopt_ledger_needs_a_ledger(tmp_path: Path, settings_data: Callable[..., Any],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.toml"
    from support import write_toml
    write_toml(cfg, settings_data(tmp_path))
    assert main(["-c", str(cfg), "adopt-ledger"]) == 2
    assert "nothing to adopt" in capsys.readouterr().err


def test_a_shared_ledger_belongs_to_its_buffer_not_to_a_host(ledger: Ledger, tmp_path: Path,
                                                               settings_data: Callable[..., Any]) -> None:
    """One ledger per buffer (issue 15): agents on several hosts share it; the buffer, mounted at
    one path everywhere, is what they must agree on."""
    (tmp_path / "daq").mkdir()
    shared = identity.current(Settings(**settings_data(tmp_path, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1"})), shared=True)
    assert "machine_id" not in shared and "hostname" not in shared and "rule r directory" in shared
    claim_ledger(ledger, shared)
    claim_ledger(ledger, dict(shared))                      # another host, the same buffer: accepted
    with pytest.raises(ConfigError, match="rule r directory"):
        claim_ledger(ledger, {**shared, "rule r directory": "/mnt/elsewhere inode=7"})


def test_two_buffers_mounted_at_one_path_are_told_apart(tmp_path: Path, ledger: Ledger,
                                                        settings_data: Callable[..., Any]) -> None:
    """Review of 2026-12-07 (fleet, 7): without the host, a shared ledger's identity was the buffer's
    path and inode, and two filesystems mounted at one path have the same root inode: another
    instrument's agents pointed at the same database were taken in. Each buffer has an id of its own."""
    (tmp_path / "daq").mkdir()
    settings = Settings(**settings_data(tmp_path, rule={"completion": ["renamed"]}, ledger={"agent_id": "a1"}))
    first = identity.current(settings, shared=True)
    assert identity.current(settings, shared=True) == first            # kept: the same buffer
    claim_ledger(ledger, first)
    (tmp_path / "daq" / identity.BUFFER_ID_NAME).unlink()            # "another filesystem" at the same path
    with pytest.raises(ConfigError, match="rule r buffer id"):
        claim_ledger(ledger, identity.current(settings, shared=True))
    assert is_agent_temp(identity.BUFFER_ID_NAME)                    # never taken for data


def test_agents_making_the_buffer_id_at_once_agree_on_one(tmp_path: Path) -> None:
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: identity.buffer_id(tmp_path), range(16)))
    assert len(ids) == 1 and [p.name for p in tmp_path.iterdir()] == [identity.BUFFER_ID_NAME]



def test_one_agent_of_a_fleet_closes_a_rules_nights(tmp_path: Path, ledger: Ledger,
                                                    settings_data: Callable[..., Any]) -> None:
    """Review of issue 16 (2): two agents closing one night each wrote and delivered a manifest of
    their own (the lake's copy then differed from the registered checksum)."""
    import time
    from edge_agent.app import _one_closer
    rule = {"completion": ["renamed"], "close_nights": True, "night_grace_hours": 1}
    mine = Settings(**settings_data(tmp_path, rule=rule, ledger={"agent_id": "a2"}))
    ledger.heartbeat("a1", "daq-1", 1, "0", time.time(), {"close_nights": ["r"]})
    with pytest.raises(ConfigError, match="rules.r.close_nights: agent a1 of this ledger closes"):
        _one_closer(mine, ledger)
    ledger.heartbeat("a1", "daq-1", 1, "0", time.time(), {"close_nights": []})
    _one_closer(mine, ledger)                             # a1 no longer closes nights: a2 may
