"""GET /custody?path=...: what the ledger knows of a path's custody, every version, from the files the
real steps moved (the steps' in-memory catalogue), directly and through the status server."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote_from_bytes

import pytest

from edge_agent.core.lifecycle import State
from edge_agent.core.receipts import iso
from edge_agent.settings import Settings
from edge_agent.status import custody
from edge_agent.status.server import StatusServer

from ..steps.test_steps import DATA, DID, Env, adler

S = State


@pytest.fixture
def env(tmp_path: Path, clock: Any, settings_data: Callable[..., dict[str, Any]]) -> Iterator[Env]:
    e = Env(tmp_path, clock, Settings(**settings_data(tmp_path, rule={"receipts": "beside"})))
    yield e
    e.ledger.close()


def test_a_deleted_file_by_its_absolute_path(env: Env) -> None:
    rec = env.drive(env.add().id)
    code, doc = custody.answer(env.s, env.ledger, os.fsencode(rec.fspath))
    assert code == 200
    [f] = doc["files"]
    assert (f["rule"], f["path"], f["relpath"]) == ("r", rec.fspath, "run42/f1.fits")
    assert f["receipt"] == {"path": rec.fspath + ".receipt", "present": True}
    [v] = f["versions"]
    assert (v["file_id"], v["version"], v["state"], v["did"]) == (rec.id, 1, "deleted", DID)
    assert (v["size"], v["adler32"], v["blake3"], v["copies_required"]) == (len(DATA), adler(DATA), rec.blake3, 2)
    assert v["confirmed_at"] == iso(rec.confirmed_at) and v["deleted_at"] == iso(rec.deleted_at)
    assert v["evidence_from"] == "deleted" and v["receipt"] == rec.fspath + ".receipt"
    assert [(r["location"], r["url"], r["adler32"]) for r in v["replicas"]] == [
        (loc, str(env.copy(loc, rec)), adler(DATA)) for loc in ("a", "b")]
    assert [(c["location"], c["state"]) for c in v["copies_written"]] == [("a", "written"), ("b", "written")]
    # what the receipt says, /custody says
    receipt = json.loads(Path(rec.fspath + ".receipt").read_bytes())
    assert receipt["did"] == v["did"] and receipt["confirmed_at"] == v["confirmed_at"]
    assert [(r["location"], r["url"]) for r in receipt["replicas"]] == [(r["location"], r["url"])
                                                                       for r in v["replicas"]]


def test_a_path_relative_to_the_rule_directory(env: Env) -> None:
    rec = env.drive(env.add().id)
    code, doc = custody.answer(env.s, env.ledger, b"run42/f1.fits")
    assert code == 200 and doc["files"][0]["versions"][0]["file_id"] == rec.id
    assert custody.answer(env.s, env.ledger, b"./run42//f1.fits")[0] == 200


def test_every_version_with_why_it_ended(env: Env) -> None:
    rec = env.drive(env.add().id, max_steps=4)
    Path(rec.fspath).write_bytes(DATA + b"rewritten")      # changed after hashing: this version ends
    old = env.drive(rec.id)
    assert old.state is S.SUPERSEDED
    st = os.stat(rec.fspath)
    new = env.ledger.discover("r", rec.path, rec.relpath, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)
    doc = custody.answer(env.s, env.ledger, b"run42/f1.fits")[1]
    versions = doc["files"][0]["versions"]
    assert [(v["file_id"], v["state"]) for v in versions] == [(old.id, "superseded"), (new.id, "discovered")]
    # confirmed in the lake, then found changed before the deletion: its bytes are safe, the file is not them
    assert "changed" in versions[0]["reason"] and versions[0]["confirmed_at"] is not None
    assert versions[0]["evidence_from"] == "confirmed" and len(versions[0]["replicas"]) == 2
    assert versions[1]["did"] is None and versions[1]["replicas"] == []
    assert doc["files"][0]["receipt"]["present"] is False


def test_a_quarantined_file_says_why(env: Env) -> None:
    rec = env.drive(env.add("run42/empty.fits", b"").id)
    [v] = custody.answer(env.s, env.ledger, b"run42/empty.fits")[1]["files"][0]["versions"]
    assert v["state"] == "quarantined" and v["reason"] and v["waiting_to_resume"] == "complete"
    assert rec.state is S.QUARANTINED


def test_unknown_paths_and_no_path(env: Env) -> None:
    env.drive(env.add().id)
    code, doc = custody.answer(env.s, env.ledger, b"run42/nothing.fits")
    assert code == 404 and doc["error"] and doc["rules"] == {"r": str(env.daq)}
    assert custody.answer(env.s, env.ledger, b"/elsewhere/run42/f1.fits")[0] == 404
    assert custody.answer(env.s, env.ledger, b"../daq/run42/f1.fits")[0] == 404     # never out of a rule's tree
    assert custody.answer(env.s, env.ledger, b"")[0] == 400
    assert custody.answer(env.s, env.ledger, None)[0] == 400


def test_the_question_reads_an_index_not_the_table(env: Env) -> None:
    plan = env.ledger._db.execute("EXPLAIN QUERY PLAN SELECT * FROM files WHERE rule = ? AND path = ? "
                                  "ORDER BY version DESC, id DESC LIMIT ?", ("r", b"/x", 100)).fetchall()
    detail = " ".join(str(tuple(r)[-1]) for r in plan)
    assert "USING INDEX" in detail and "SCAN files" not in detail.replace("USING INDEX", ""), detail


# ---------------------------------------------------------------- through the status server

@pytest.fixture
def server(env: Env) -> Iterator[StatusServer]:
    runner = SimpleNamespace(last_tick=time.time(), agent_id=None, settings=env.s, ledger=env.ledger)
    srv = StatusServer(runner, "127.0.0.1", 0)  # type: ignore[arg-type]
    srv.start()
    yield srv
    srv.stop()


def get(srv: StatusServer, target: str, host: str = "127.0.0.1", method: str = "GET") -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*srv.address, timeout=10)
    try:
        conn.putrequest(method, target, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        assert resp.getheader("Content-Type", "").startswith("application/json") or not body
        return resp.status, json.loads(body) if body else None
    finally:
        conn.close()


def test_the_endpoint(env: Env, server: StatusServer) -> None:
    rec = env.drive(env.add("run 42/f1.fits").id)
    code, doc = get(server, "/custody?path=" + quote_from_bytes(rec.path, safe=""))
    assert code == 200 and doc["files"][0]["versions"][0]["state"] == "deleted"
    assert get(server, "/custody?path=" + quote_from_bytes(b"run 42/f1.fits"))[0] == 200
    assert get(server, "/custody?path=run+42/f1.fits")[0] == 200       # a form's '+' is a space
    code, doc = get(server, "/custody?path=nothing")
    assert code == 404 and doc["error"]
    assert get(server, "/custody")[0] == 400 and get(server, "/custody?path=")[0] == 400
    assert get(server, "/custody?path=x", method="POST")[0] == 405
    assert get(server, "/custody?path=x", host=f"evil.example.com:{server.address[1]}")[0] == 421
    assert get(server, "/custody?path=x", method="HEAD")[0] == 404


def test_a_name_that_is_not_utf8_is_asked_byte_by_byte(env: Env, server: StatusServer) -> None:
    raw = os.fsencode(env.daq) + b"/caf\xe9.fits"
    with open(raw, "wb") as fh:
        fh.write(DATA)
    st = os.stat(raw)
    env.ledger.discover("r", raw, "caf\\xe9.fits", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, 0)
    code, doc = get(server, "/custody?path=" + quote_from_bytes(raw, safe="/"))
    assert code == 200 and doc["files"][0]["relpath"] == "caf\\xe9.fits"
    assert doc["files"][0]["path"].endswith("caf\\xe9.fits")


# ---------------------------------------------------------------- the command line

def test_the_command_answers_the_same(env: Env, tmp_path: Path, settings_data: Any,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from support import write_toml

    from edge_agent.cli import main
    rec = env.drive(env.add().id)
    cfg = write_toml(tmp_path / "agent.toml", settings_data(tmp_path, rule={"receipts": "beside"}))
    capsys.readouterr()                          # the steps' own log lines
    assert main(["-c", str(cfg), "custody", "run42/f1.fits"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == custody.answer(env.s, env.ledger, b"run42/f1.fits")[1]
    monkeypatch.chdir(env.daq / "run42")         # typed inside the watched tree: from there
    assert main(["-c", str(cfg), "custody", "f1.fits"]) == 0
    assert json.loads(capsys.readouterr().out)["files"][0]["versions"][0]["file_id"] == rec.id
    assert main(["-c", str(cfg), "custody", "nothing.fits"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]
