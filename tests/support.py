"""Shared test tooling: a real edge-agent daemon process on a real temporary tree."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


# lake.rucio.root_client's two clients: the root:// tests run on each, neither is ever skipped
ROOT_CLIENTS = ("bindings", "xrdcp")


def require_xrootd_bindings() -> None:
    """Fail, never skip, where the XRootD Python bindings do not import: the test setup installs
    them (the test extra), and without them half of the root:// tests would prove nothing."""
    import pytest

    from edge_agent.transfer.xroot import bindings_problem
    problem = bindings_problem()
    if problem:
        pytest.fail(f"the XRootD Python bindings do not import ({problem}): install the test extra "
                    "(pip install -e '.[test]', PyPI xrootd); the root:// tests run on both clients", pytrace=False)


def buffer_names(directory: Path) -> list[str]:
    """What a buffer directory holds, without the agent's own files (its lock and holder record)."""
    from edge_agent.localfs import is_agent_temp
    return sorted(n for n in os.listdir(directory) if not is_agent_temp(n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adler32_hex(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def write_toml(path: Path, doc: dict[str, Any]) -> Path:
    """A small TOML writer for test configs: top-level scalars, then tables of tables."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in doc.items():
        if isinstance(v, dict) and k in ("status", "log", "retry", "lake", "ledger"):
            tables.extend(_flatten(k, v))
        elif isinstance(v, dict):
            for name, sub in v.items():
                tables.append((f"{k}.{name}", sub))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    for name, t in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in t.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def _flatten(prefix: str, table: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[lake] with a nested [lake.rucio] and [lake.rucio.auth], as TOML tables."""
    own = {k: v for k, v in table.items() if not isinstance(v, dict) or k == "metadata"}
    out = [(prefix, own)]
    for k, v in table.items():
        if isinstance(v, dict) and k != "metadata":
            out.extend(_flatten(f"{prefix}.{k}", v))
    return out


class Daemon:
    """`edge-agent run` as a real process, and what a test needs to watch it."""

    def __init__(self, base: Path, rules: dict[str, dict[str, Any]] | None = None,
                 destinations: tuple[str, ...] | dict[str, dict[str, Any]] = ("lake1", "lake2"),
                 unprivileged: bool = False, lake: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, **top: Any) -> None:
        self.base = base
        self.buffer = base / "buffer"
        self.env = env or {}
        # a tuple names local-lake directories; a dict is the [destinations] table as it is (RSEs)
        self.lakes = {d: base / "lake" / d for d in destinations} if isinstance(destinations, tuple) else {}
        dest_table = ({d: {"path": str(p)} for d, p in self.lakes.items()} if isinstance(destinations, tuple)
                      else destinations)
        self.state = base / "state"
        self.port = free_port()
        # as root, the daemon can be run without the capabilities that let root read any file,
        # so that permissions mean for it what they mean for an ordinary service account
        self.prefix: list[str] = []
        if unprivileged and os.geteuid() == 0:
            self.prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        for p in (self.buffer, *self.lakes.values()):
            p.mkdir(parents=True, exist_ok=True)
        rules = rules or {"daq": {}}
        cfg_rules = {}
        for name, r in rules.items():
            d = {"directory": str(self.buffer / name), "scope": "test", "destinations": list(dest_table),
                 "copies": len(dest_table), "completion": ["closed", "stable"], "stable_seconds": 1}
            d.update(r)
            cfg_rules[name] = d
            Path(d["directory"]).mkdir(parents=True, exist_ok=True)
        self.doc: dict[str, Any] = {
            "state_dir": str(self.state), "rescan_seconds": 3, "tick_seconds": 0.2,
            "confirm_interval_seconds": 1,
            **top,
            "status": {"port": self.port},
            "log": {"level": "info", "format": "json"},
            "retry": {"base_seconds": 0.5, "max_seconds": 3, "jitter": 0.1},
            "destinations": dest_table,
            "rules": cfg_rules,
        }
        if lake is not None:
            self.doc["lake"] = lake
        self.config = base / "edge-agent.toml"
        write_toml(self.config, self.doc)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "agent.log"
        self.starts = 0

    def rule_dir(self, rule: str = "daq") -> Path:
        return Path(self.doc["rules"][rule]["directory"])

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_agent", "-c", str(self.config), *args],
                              capture_output=True, text=True, timeout=60, check=check, cwd=ROOT)

    def start(self, wait: bool = True) -> "Daemon":
        assert self.proc is None or self.proc.poll() is not None
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "edge_agent", "-c", str(self.config),
                                      "run"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **self.env})
        fh.close()
        self.starts += 1
        if wait:
            self.wait_for(lambda: self.get("/healthz")[0] == 200, 30, "the daemon to answer /healthz")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(45)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, (code, body[:300])
        return json.loads(body)

    def counts(self, rule: str = "daq") -> dict[str, int]:
        st = self.status()["rules"][rule]["states"]
        return {k: v["files"] for k, v in st.items() if v["files"]}

    def files(self) -> list[dict[str, Any]]:
        out = self.cli("files", "--json", "--limit", "100000", check=True).stdout
        return json.loads(out)

    def wait_for(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:\n"
                                     + self.log.read_text()[-3000:])
            try:
                last = cond()
            except (AssertionError, OSError, ValueError, KeyError) as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n"
                             + self.log.read_text()[-3000:])

    def lake_files(self) -> dict[str, dict[str, bytes]]:
        """{lake: {relative path: content}} of everything in the lake directories but the place token."""
        out: dict[str, dict[str, bytes]] = {}
        for name, root in self.lakes.items():
            out[name] = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
                         if p.is_file() and p != root / ".edge-agent-place"}
        return out

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out
