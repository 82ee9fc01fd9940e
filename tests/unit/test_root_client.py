"""lake.rucio.root_client: the operator's choice of root:// client (the XRootD Python bindings or
the xrdcp/xrdfs commands), resolved on this host, refused at start where it cannot be honoured,
named with its version in the start-up log, and followed by reads as well as uploads."""

from __future__ import annotations

import stat
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from edge_agent.access import Reader
from edge_agent.app import Agent, check_root_client, root_backend, writes_root
from edge_agent.cli import main
from edge_agent.errors import ConfigError
from edge_agent.settings import Settings, load_settings
from edge_agent.transfer.xroot_choice import BindingsMissing, CommandsMissing, client_version, name_of, resolve

from .test_settings import config_error, rucio_toml

ROOT_URL = "root://xrd.example.org:1094//data/lake1/f"


@pytest.fixture(autouse=True)
def xrdcp_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with the xrdcp/xrdfs commands (a test that wants them gone says so)."""
    import edge_agent.transfer.xroot_choice as choice
    monkeypatch.setattr(choice.shutil, "which", lambda c: f"/usr/bin/{c}")


@pytest.fixture
def no_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host without the XRootD Python bindings: importing them fails."""
    monkeypatch.setitem(sys.modules, "XRootD", None)
    monkeypatch.setitem(sys.modules, "XRootD.client", None)


@pytest.fixture
def with_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with (stand-in) bindings of a known version."""
    client = types.ModuleType("XRootD.client")
    client.__version__ = "6.2.1"  # type: ignore[attr-defined]
    client.flags = types.ModuleType("XRootD.client.flags")  # type: ignore[attr-defined]
    client.flags.OpenFlags = types.SimpleNamespace()  # type: ignore[attr-defined]
    client.flags.QueryCode = types.SimpleNamespace()  # type: ignore[attr-defined]
    pkg = types.ModuleType("XRootD")
    pkg.client = client  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "XRootD", pkg)
    monkeypatch.setitem(sys.modules, "XRootD.client", client)
    monkeypatch.setitem(sys.modules, "XRootD.client.flags", client.flags)  # type: ignore[attr-defined]


def fake_xrdcp(tmp_path: Path, said: str = "v5.5.3", status: int = 0) -> Path:
    """An xrdcp that answers --version as XRootD 5's does: on stderr."""
    p = tmp_path / "xrdcp"
    p.write_text(f"#!/bin/sh\necho '{said}' >&2\nexit {status}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def rucio_settings(tmp_path: Path, root_client: str = "auto", scheme: str | None = "root",
                   schemes: list[str] | None = None) -> Settings:
    s = load_settings(rucio_toml(tmp_path, f'scheme = "{scheme}"' if scheme else ""))
    assert s.lake.rucio is not None
    rucio: Any = s.lake.rucio.model_copy(update={"root_client": root_client,
                                                 **({"schemes": schemes} if schemes else {})})
    return s.model_copy(update={"lake": s.lake.model_copy(update={"rucio": rucio})})


# ------------------------------------------------------------------ the choice, resolved
def test_auto_takes_the_bindings_where_they_import(with_bindings: None) -> None:
    assert [resolve(c) for c in ("auto", "bindings", "xrdcp")] == ["python", "python", "cli"]


def test_auto_falls_back_to_xrdcp_without_the_bindings(no_bindings: None) -> None:
    assert resolve("auto") == "cli" and resolve("xrdcp") == "cli"


def test_xrdcp_asked_for_by_name_without_the_commands_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_agent.transfer.xroot_choice as choice
    monkeypatch.setattr(choice.shutil, "which", lambda c: None if c == "xrdfs" else f"/usr/bin/{c}")
    with pytest.raises(CommandsMissing, match=r"xrdfs not found on PATH.*xrootd-client"):
        resolve("xrdcp")
    assert resolve("auto") in ("python", "cli")           # auto: whatever this host has, never refused


def test_the_bindings_asked_for_by_name_are_never_replaced_by_xrdcp(no_bindings: None) -> None:
    with pytest.raises(BindingsMissing, match=r"edge-agent\[xroot\]"):
        resolve("bindings")


def test_names_and_versions(with_bindings: None, tmp_path: Path) -> None:
    assert (name_of("python"), name_of("cli")) == ("bindings", "xrdcp")
    assert client_version("python") == "6.2.1"
    assert client_version("cli", str(fake_xrdcp(tmp_path))) == "v5.5.3"
    assert client_version("cli", str(fake_xrdcp(tmp_path, "", 1))) == \
        f"unknown ({tmp_path / 'xrdcp'} --version: exit status 1)"
    assert client_version("cli", str(tmp_path / "no-xrdcp")).startswith("unknown (")


# ------------------------------------------------------------------ the setting
def test_the_setting_takes_three_names_and_refuses_others(tmp_path: Path) -> None:
    assert load_settings(rucio_toml(tmp_path)).lake.rucio.root_client == "auto"  # type: ignore[union-attr]
    p = rucio_toml(tmp_path)
    p.write_text(p.read_text().replace('account = "magic"', 'account = "magic"\nroot_client = "pyxrootd"'))
    msg = config_error(p)
    assert "lake.rucio.root_client = 'pyxrootd'" in msg and "'bindings'" in msg, msg


def test_bindings_without_the_bindings_are_refused_naming_the_key(tmp_path: Path, no_bindings: None) -> None:
    with pytest.raises(ConfigError, match=r"lake.rucio.root_client = 'bindings': the XRootD Python bindings"):
        root_backend(rucio_settings(tmp_path, "bindings"))
    assert root_backend(rucio_settings(tmp_path, "auto")) == "cli"


def test_the_agent_refuses_to_start_before_touching_its_state(tmp_path: Path, no_bindings: None) -> None:
    s = rucio_settings(tmp_path, "bindings")
    with pytest.raises(ConfigError, match="lake.rucio.root_client"):
        Agent(s)
    assert not s.state_dir.exists()


def test_check_config_names_the_key(tmp_path: Path, no_bindings: None, capsys: pytest.CaptureFixture[str]) -> None:
    p = rucio_toml(tmp_path)
    assert main(["check-config", str(p)]) == 0
    assert '"root_client": "auto"' in capsys.readouterr().out
    p.write_text(p.read_text().replace('account = "magic"', 'account = "magic"\nroot_client = "bindings"'))
    assert main(["check-config", str(p)]) == 2
    assert "lake.rucio.root_client = 'bindings'" in capsys.readouterr().err


# ------------------------------------------------------------------ the start-up line
@pytest.mark.parametrize(("scheme", "schemes", "writes"), [
    ("root", None, True), ("http", None, False), (None, None, True), (None, ["davs", "https"], False)])
def test_a_root_destination_is_one_that_may_upload_over_root(tmp_path: Path, scheme: str | None,
                                                            schemes: list[str] | None, writes: bool) -> None:
    assert writes_root(rucio_settings(tmp_path, scheme=scheme, schemes=schemes)) is writes


def test_the_client_and_its_version_are_logged_once_at_start(tmp_path: Path, with_bindings: None) -> None:
    with capture_logs() as logs:
        check_root_client(rucio_settings(tmp_path, "auto"))
    assert [(e["root_client"], e["version"], e["chosen"]) for e in logs if e["event"] == "root:// client"] == \
        [("bindings", "6.2.1", "auto")]


def test_xrdcp_is_logged_with_what_it_says_its_version_is(tmp_path: Path, with_bindings: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake_xrdcp(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with capture_logs() as logs:
        check_root_client(rucio_settings(tmp_path, "xrdcp"))
    assert [(e["root_client"], e["version"]) for e in logs if e["event"] == "root:// client"] == \
        [("xrdcp", "v5.5.3")]


def test_nothing_is_logged_without_a_root_destination(tmp_path: Path, with_bindings: None) -> None:
    with capture_logs() as logs:
        check_root_client(rucio_settings(tmp_path, "bindings", scheme="http"))
    assert not [e for e in logs if e["event"] == "root:// client"]


# ------------------------------------------------------------------ reads follow the choice
@pytest.mark.parametrize(("choice", "backend"), [("bindings", "python"), ("xrdcp", "cli"), ("auto", "python")])
def test_reads_speak_root_through_the_chosen_client(with_bindings: None, choice: str, backend: str) -> None:
    with httpx.Client() as http:
        assert Reader(http, root_client=choice)._made_for(ROOT_URL).backend == backend  # type: ignore[attr-defined]


def test_reads_fall_back_to_xrdcp_under_auto_without_the_bindings(no_bindings: None) -> None:
    with httpx.Client() as http:
        assert Reader(http)._made_for(ROOT_URL).backend == "cli"  # type: ignore[attr-defined]
        with pytest.raises(BindingsMissing):
            Reader(http, root_client="bindings")._made_for(ROOT_URL)
