"""A destination that goes away (an unmounted lake filesystem): nothing deleted, /readyz says why."""

from __future__ import annotations

import json
import os
import time

import pytest

from support import Daemon, buffer_names, write_toml

pytestmark = pytest.mark.integration


def test_unmounted_destination_holds_everything_back_until_it_returns(agent) -> None:
    d: Daemon = agent(rules={"daq": {"completion": ["renamed"]}})
    for lk in d.lakes.values():
        (lk / ".lake-mounted").touch()
    for dest in d.doc["destinations"].values():
        dest["require_file"] = ".lake-mounted"
    write_toml(d.config, d.doc)
    d.start()
    (d.rule_dir() / "before.fits").write_bytes(b"b" * 3000)
    d.wait_for(lambda: d.counts().get("deleted") == 1, 20, "normal delivery")
    os.unlink(d.lakes["lake2"] / ".lake-mounted")          # lake2 "unmounted"
    d.wait_for(lambda: d.get("/readyz")[0] == 503, 45, "/readyz to report the outage")
    why = json.loads(d.get("/readyz")[1])["not_ready_because"]
    assert any("lake2" in w and "not mounted" in w for w in why)
    for i in range(5):
        (d.rule_dir() / f"during{i}.fits").write_bytes(os.urandom(5000))
    time.sleep(4)
    assert d.counts().get("deleted") == 1                    # nothing more deleted
    assert buffer_names(d.rule_dir()) == [f"during{i}.fits" for i in range(5)]
    assert not (d.lakes["lake2"] / "test" / "during0.fits").exists()   # nothing written to the mount point
    assert any("not mounted" in (e["reason"] or "") for e in d.status()["recent_errors"])
    (d.lakes["lake2"] / ".lake-mounted").touch()            # back
    d.wait_for(lambda: d.counts().get("deleted") == 6, 60, "everything delivered after the outage")
    d.wait_for(lambda: d.get("/readyz")[0] == 200, 45, "/readyz green again")
