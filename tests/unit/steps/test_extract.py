"""A rule's metadata extractor in the hashing step, with a real ledger and real files (test_steps.py's
Env): its keys in the DID's metadata, one read for a plug-in that takes the stream, a failure that
quarantines (with the program's stderr) or is skipped, a changed file told before a failure, and
the step repeated after a crash running the extractor again."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from plugins import install_extractor_plugins

from edge_agent import steps
from edge_agent.localfs import LocalFile
from edge_agent.transfer.mock import MockTransport

from .test_steps import DATA, DID, E, Killed, S, make_env  # noqa: F401 - make_env: a fixture, see `make`

LINES = DATA.count(b"\n")


@pytest.fixture
def make(request: pytest.FixtureRequest) -> Any:
    """test_steps.py's make_env: make(rule={...}) -> Env."""
    return request.getfixturevalue("make_env")


@pytest.fixture(autouse=True)
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(install_extractor_plugins(tmp_path / "site")))


def program(tmp_path: Path, body: str) -> list[str]:
    """A command extractor: a Python program whose file path is sys.argv[-1]; each run is counted
    in tmp_path/runs."""
    p = tmp_path / "daq-meta.py"
    p.write_text("import json, os, sys\n"
                 f"open({str(tmp_path / 'runs')!r}, 'a').write('run\\n')\n" + body)
    return [sys.executable, str(p)]


def runs(tmp_path: Path) -> int:
    f = tmp_path / "runs"
    return len(f.read_text().splitlines()) if f.exists() else 0


SAYS_RUN = "data = open(sys.argv[-1], 'rb').read()\nprint(json.dumps({'run': 42, 'frames': data.count(b'\\n'), " \
           "'telescope': 'LST-3', 'origin': 'program'}))\n"
FAILS = "print('reading', sys.argv[-1], file=sys.stderr)\nprint('no frame header', file=sys.stderr)\nsys.exit(3)\n"


def test_a_command_adds_its_keys_after_the_rules_and_before_the_sidecars(make: Any, tmp_path: Path) -> None:
    env = make(rule={"completion": ["sidecar"], "metadata": {"telescope": "LST-1", "site": "ORM"},
                         "extractor": {"command": program(tmp_path, SAYS_RUN)}})
    rec = env.add()
    Path(rec.fspath + ".json").write_text(json.dumps({"origin": "sidecar"}))
    rec = env.step(rec.id)
    assert rec.state is S.HASHED
    assert rec.meta == {"site": "ORM", "telescope": "LST-3", "run": 42, "frames": LINES, "origin": "sidecar"}
    assert env.drive(rec.id).state is S.DELETED
    assert env.lake.dids[DID].metadata == rec.meta          # what the lake is given
    assert runs(tmp_path) == 1


def test_a_failing_command_quarantines_with_its_stderr_and_leaves_no_copy(make: Any, tmp_path: Path) -> None:
    argv = program(tmp_path, FAILS)
    env = make(rule={"extractor": {"command": argv}})
    rec = env.drive(env.add().id)
    assert rec.state is S.QUARANTINED and rec.resume_state is S.COMPLETE
    assert rec.reason == (f"extractor {os.path.basename(argv[0])} failed on run42/f1.fits: exit status 3; stderr: "
                          f"reading {rec.fspath} | no frame header (fix the extractor, then `edge-agent retry "
                          f"{rec.id}`; or on_failure = \"skip\" sends such files without its keys)")
    # the first copy was written in the same read, and removed: nothing of the file is in the lake
    assert env.lake.asked("register") == []
    assert not any(p.is_file() for root in env.roots.values() for p in root.rglob("*"))
    assert Path(rec.fspath).exists()
    # fixed, then `edge-agent retry`: the step runs again, the extractor with it
    Path(argv[1]).write_text(Path(argv[1]).read_text().replace(FAILS, SAYS_RUN))
    rec = env.drive(env.ledger.transition(rec.id, S.QUARANTINED, E.OPERATOR_RETRY).id)
    assert rec.state is S.DELETED and rec.meta["run"] == 42


def test_a_failing_command_the_rule_skips_sends_the_file_without_its_keys(make: Any, tmp_path: Path) -> None:
    env = make(rule={"metadata": {"site": "ORM"},
                         "extractor": {"command": program(tmp_path, FAILS), "on_failure": "skip"}})
    skipped: list[str] = []
    env.ctx.hooks.extractor_skipped = skipped.append
    rec = env.step(env.add().id)
    assert rec.state is S.HASHED and rec.meta == {"site": "ORM"}
    hashed = env.ledger.history(rec.id)[-1]
    assert hashed["event"] == "hashed" and "exit status 3" in hashed["detail"]["extractor_skipped"]
    assert "no frame header" in hashed["detail"]["extractor_skipped"]
    assert skipped == ["r"]
    assert env.drive(rec.id).state is S.DELETED


@pytest.mark.parametrize("body, says", [
    ("import time\ntime.sleep(30)\n", "timed out after 0.5 s (killed)"),
    ("print('run=42')\n", "its stdout is not JSON"),
    ("print(json.dumps([1, 2]))\n", "its output is an array, not a JSON object"),
    ("print(json.dumps({'Run': 1}))\n", "key 'Run'"),
])
def test_every_kind_of_failure_quarantines(make: Any, tmp_path: Path, body: str, says: str) -> None:
    env = make(rule={"extractor": {"command": program(tmp_path, body), "timeout_seconds": 0.5}})
    rec = env.step(env.add().id)
    assert rec.state is S.QUARANTINED and says in (rec.reason or "")


def test_a_file_changed_by_the_time_the_command_ran_is_superseded_not_quarantined(make: Any,
                                                                                  tmp_path: Path) -> None:
    # the program finds other bytes than were hashed (the DAQ rewrote the file): that, not the
    # program's failure, is what happened
    grow = "open(sys.argv[-1], 'ab').write(b'more')\nsys.exit(1)\n"
    env = make(rule={"extractor": {"command": program(tmp_path, grow)}})
    rec = env.step(env.add().id)
    assert rec.state is S.DISCOVERED and env.events(rec.id)[-1] == "changed"
    assert "changed while it was being read" in env.ledger.history(rec.id)[-1]["detail"]["reason"]


def test_a_plug_in_that_takes_the_stream_adds_its_keys_without_a_second_read(
        make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    env = make(rule={"extractor": {"entry_point": "linecount"}})
    storage = env.use(MockTransport())
    opened: list[str] = []
    real_open = LocalFile.open

    def counting(self: LocalFile) -> Any:
        opened.append(str(self))
        return real_open(self)
    monkeypatch.setattr(LocalFile, "open", counting)
    rec = env.step(env.add().id)
    assert rec.state is S.HASHED
    assert rec.meta == {"lines": LINES, "bytes_counted": len(DATA)}
    # one read: it was hashed, sent as the first copy and counted by the plug-in in the same pass
    assert len(opened) == 1
    assert sum(env.hashed) == len(DATA) and env.sent == {"a": len(DATA)}
    assert storage.objects == {env.url("a", rec): DATA}


def test_a_plug_in_that_takes_the_stream_sees_one_pass_when_the_file_is_read_alone(make: Any) -> None:
    env = make(rule={"extractor": {"entry_point": "linecount"}})
    env.lake.free_names = False          # the name is decided after hashing: no first copy in the read
    rec = env.step(env.add().id)
    assert rec.state is S.HASHED and rec.meta == {"lines": LINES, "bytes_counted": len(DATA)}


def test_a_plug_in_that_fails_in_the_stream_never_breaks_the_upload_and_quarantines(make: Any) -> None:
    env = make(rule={"extractor": {"entry_point": "broken"}})
    rec = env.step(env.add().id)
    assert rec.state is S.QUARANTINED
    assert rec.reason and rec.reason.startswith("extractor plug-in 'broken' failed on run42/f1.fits: update() "
                                                "raised ValueError: no frame header at byte 0")
    assert not any(p.is_file() for root in env.roots.values() for p in root.rglob("*"))


def test_a_plug_in_that_reads_the_file_itself(make: Any) -> None:
    env = make(rule={"extractor": {"entry_point": "firstline"}})
    rec = env.step(env.add(data=b"RUN 42 CAMERA 1\nframes...\n").id)
    assert rec.state is S.HASHED and rec.meta == {"first_line": "RUN 42 CAMERA 1"}


@pytest.mark.parametrize("plugin, on_failure, says", [
    ("broken-extract", "quarantine", "extract() raised OSError: the DAQ database does not answer"),
    ("nested", "quarantine", "detector: an object, not a string, number or boolean"),
    ("broken", "skip", "update() raised ValueError"),
])
def test_a_plug_in_failure_quarantines_or_is_skipped(make: Any, plugin: str, on_failure: str, says: str) -> None:
    env = make(rule={"extractor": {"entry_point": plugin, "on_failure": on_failure}})
    rec = env.step(env.add().id)
    if on_failure == "quarantine":
        assert rec.state is S.QUARANTINED and says in (rec.reason or "")
    else:
        assert rec.state is S.HASHED and rec.meta == {}
        assert says in env.ledger.history(rec.id)[-1]["detail"]["extractor_skipped"]


def test_after_a_crash_the_step_and_its_extractor_run_again(make: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    env = make(rule={"extractor": {"command": program(tmp_path, SAYS_RUN)}})
    rec = env.add()
    real = env.ledger.transition

    def killed(*a: Any, **kw: Any) -> Any:
        raise Killed()
    monkeypatch.setattr(env.ledger, "transition", killed)   # kill -9 before the hashed commit
    with pytest.raises(Killed):
        steps.run([rec], env.ctx)
    monkeypatch.setattr(env.ledger, "transition", real)
    assert env.ledger.get(rec.id).state is S.COMPLETE and runs(tmp_path) == 1
    end = env.drive(rec.id)
    assert end.state is S.DELETED and end.meta["run"] == 42 and runs(tmp_path) == 2
