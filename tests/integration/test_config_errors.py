"""An invalid config refuses to start and names the key, the value and why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT


def edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, **(env or {})})


GOOD = """
state_dir = "{tmp}/state"
[destinations.lake1]
path = "{tmp}/lake1"
[rules.daq]
directory = "{tmp}/buf"
scope = "test"
destinations = ["lake1"]
copies = 1
"""


@pytest.mark.parametrize("change, key, why", [
    (("copies = 1", "copies = 0"), "rules.daq.copies = 0", "greater than or equal to 1"),
    (("copies = 1", "copies = 2"), "rules.daq.copies = 2", "one copy per destination"),
    (("copies = 1", "copeis = 1"), "rules.daq.copeis", "unknown key"),
    (('destinations = ["lake1"]', 'destinations = ["lake9"]'), "rules.daq.destinations", "'lake9'"),
    (('scope = "test"', 'scope = "test"\nname_template = "{{nite}}/{{filename}}"'),
     "rules.daq.name_template", "unknown placeholder"),
    (('scope = "test"', 'scope = "test"\ntimezone = "Mars/Olympus"'), "rules.daq.timezone", "unknown time zone"),
    (('path = "{tmp}/lake1"', 'path = "{tmp}/buf/lake"'), "destinations.lake1.path", "overlaps"),
    (('directory = "{tmp}/buf"', 'directory = "buf"'), "rules.daq.directory = 'buf'", "absolute"),
    (("[rules.daq]", "[rules.daq]\ncompletion = [\"closed\", \"psychic\"]"), "rules.daq.completion.1",
     "'psychic'"),
    (("[rules.daq]", "[rules.daq"), "not valid TOML", "line"),
])
def test_invalid_config_names_key_value_and_why(tmp_path: Path, change: tuple[str, str], key: str,
                                                why: str) -> None:
    text = GOOD.replace(*change).format(tmp=tmp_path)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    for cmd in (["check-config", str(cfg)], ["-c", str(cfg), "run"]):
        r = edge(*cmd)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert key in r.stderr and why in r.stderr, r.stderr
    assert not (tmp_path / "state").exists()   # refused before touching anything


def test_check_config_prints_the_effective_config_with_env_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text(GOOD.format(tmp=tmp_path))
    r = edge("check-config", str(cfg), env={"EDGE_AGENT_STATUS__PORT": "9999",
                                           "EDGE_AGENT_RULES__DAQ__PRIORITY": "7"})
    assert r.returncode == 0, r.stderr
    assert '"port": 9999' in r.stdout and '"priority": 7' in r.stdout
    r = edge("check-config", str(cfg), env={"EDGE_AGENT_RULES__DAQ__COPIES": "-3"})
    assert r.returncode == 2 and "rules.daq.copies = '-3'" in r.stderr


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    r = edge("check-config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "nope.toml" in r.stderr and "not found" in r.stderr


def test_example_config_in_conf_is_valid(tmp_path: Path) -> None:
    r = edge("check-config", str(ROOT / "conf" / "edge-agent.example.toml"))
    assert r.returncode == 0, r.stderr
