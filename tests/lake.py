"""The real lake for tests: Rucio + XRootD on loopback, started once per session by scripts/lake.

Set EDGE_LAKE_ENV=/path/to/lake.env to use a lake that is already running. Otherwise the
session starts one in /var/tmp (the xrootd user must reach its state directory) and stops it
at the end. This is the one place that starts these services.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "lake"


def read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip().strip('"')
    return env


def recorded_release(env: dict[str, str]) -> str:
    """The Rucio release a lake.env says its lake runs (one of an older start.sh names none: 41.5.1)."""
    return env.get("EDGE_LAKE_RUCIO_VERSION", "41.5.1")


class Lake:
    """A handle on the running lake: its settings, a small Rucio REST client, and the test's
    stand-ins for the lake's own machinery (FTS replication, the reaper)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.url = env["EDGE_LAKE_RUCIO_URL"]
        self.account = env["EDGE_LAKE_RUCIO_ACCOUNT"]
        self.scope = env["EDGE_LAKE_SCOPE"]
        self.buf_rse = env["EDGE_LAKE_BUF_RSE"]
        self.lake_rses = env["EDGE_LAKE_LAKE_RSES"].split()
        self.http_url = env["EDGE_LAKE_XROOTD_HTTP_URL"]
        self.root_url = env["EDGE_LAKE_XROOTD_ROOT_URL"]
        self.data_dir = Path(env["EDGE_LAKE_DATA_DIR"])
        self.state_dir = Path(env["EDGE_LAKE_STATE_DIR"])
        self._token: str | None = None

    def server(self) -> str:
        """Rucio's database and API workers, as lake.env says ('PostgreSQL, 2 workers'); a lake.env
        of an older start.sh names neither: that lake ran SQLite with one worker."""
        db = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}[self.env.get("EDGE_LAKE_RUCIO_DB", "sqlite")]
        workers = int(self.env.get("EDGE_LAKE_RUCIO_WORKERS", "1"))
        return f"{db}, {workers} worker{'s' if workers > 1 else ''}"

    # ------------------------------------------------------------ Rucio REST
    def token(self) -> str:
        if self._token is None:
            r = httpx.get(self.url + "/auth/userpass", timeout=60, headers={
                "X-Rucio-Account": self.account, "X-Rucio-Username": self.env["EDGE_LAKE_RUCIO_USERNAME"],
                "X-Rucio-Password": self.env["EDGE_LAKE_RUCIO_PASSWORD"]})
            r.raise_for_status()
            self._token = r.headers["X-Rucio-Auth-Token"]
        return self._token

    def call(self, method: str, path: str, json: Any = None, ok: tuple[int, ...] = (200, 201)) -> httpx.Response:
        for _ in range(2):
            r = httpx.request(method, self.url + path, json=json, timeout=120,
                              headers={"X-Rucio-Auth-Token": self.token()})
            if r.status_code == 401:
                self._token = None
                continue
            break
        if r.status_code not in ok:
            raise AssertionError(f"{method} {path} -> {r.status_code} {r.headers.get('ExceptionClass')}: "
                                 f"{r.text[:300]}")
        return r

    def lines(self, r: httpx.Response) -> list[dict[str, Any]]:
        import json as _json
        return [_json.loads(x) for x in r.text.splitlines() if x.strip()]

    def replicas(self, scope: str, name: str) -> dict[str, Any]:
        """{'bytes', 'adler32', 'states': {RSE: state}, 'pfns'} of one file, all states."""
        r = self.call("POST", "/replicas/list", {"dids": [{"scope": scope, "name": name}], "all_states": True,
                                                 "schemes": ["http"]})
        rows = self.lines(r)
        return rows[0] if rows else {}

    def rule(self, rule_id: str) -> dict[str, Any]:
        return self.call("GET", f"/rules/{rule_id}").json()

    def pfn(self, rse: str, scope: str, name: str, scheme: str = "http") -> str:
        r = self.call("GET", f"/rses/{rse}/lfns2pfns?lfn={scope}:{name}&scheme={scheme}&operation=write")
        return r.json()[f"{scope}:{name}"]

    def local_path(self, url: str) -> Path:
        """Where XRootD keeps the bytes of an http:// or root:// URL of this lake."""
        path = url.split("//", 2)[-1]
        path = "/" + path.split("/", 1)[1] if not url.startswith("root:") else path
        return self.data_dir / path.lstrip("/")

    # ------------------------------------------------------------ the lake's own machinery
    def play_fts(self, scope: str, name: str, dest_rse: str, source_rse: str | None = None) -> None:
        """Do what FTS would: copy the file to dest_rse from an AVAILABLE replica (on source_rse if
        given), verify its adler32 on the storage, and mark the destination replica AVAILABLE."""
        info = self.replicas(scope, name)
        src = next(p for p, meta in info["pfns"].items()
                   if info["states"].get(meta["rse"]) == "AVAILABLE" and p.startswith("http")
                   and source_rse in (None, meta["rse"]))
        data = httpx.get(src, timeout=120).content
        assert f"{zlib.adler32(data) & 0xFFFFFFFF:08x}" == info["adler32"], "source replica corrupt"
        dst = self.pfn(dest_rse, scope, name)
        r = httpx.put(dst, content=data, timeout=120, headers={"Content-Length": str(len(data))})
        assert r.status_code in (200, 201, 204), r.text
        with httpx.Client(timeout=60) as c:   # a fresh connection: see XRootD defect 4 in the notes
            h = c.head(dst, headers={"Want-Digest": "adler32"})
        assert h.headers.get("Digest", "").lower() == f"adler32={info['adler32']}", h.headers
        self.call("PUT", "/replicas", {"rse": dest_rse, "files": [{"scope": scope, "name": name, "state": "A"}]})

    def fail_transfer(self, scope: str, name: str, dest_rse: str) -> None:
        """What FTS reports for a failed copy: the lock and the rule go STUCK."""
        self.call("PUT", "/replicas", {"rse": dest_rse, "files": [{"scope": scope, "name": name, "state": "U"}]})

    def daemon(self, name: str, *args: str) -> None:
        venv = Path(self.env["EDGE_LAKE_VENV"])
        subprocess.run([str(venv / "bin" / name), "--run-once", *args], check=True, timeout=300,
                       env={**os.environ, "RUCIO_CONFIG": self.env["EDGE_LAKE_RUCIO_CONFIG"]},
                       capture_output=True)

    def rucio_down(self) -> None:
        subprocess.run([str(SCRIPTS / "rucio-down.sh"), str(self.state_dir)], check=True, timeout=120,
                       capture_output=True)

    def rucio_up(self) -> None:
        subprocess.run([str(SCRIPTS / "rucio-up.sh"), str(self.state_dir)], check=True, timeout=300,
                       capture_output=True)
        self._token = None

    def xrootd_answers(self, timeout: float = 5.0) -> bool:
        """Does XRootD's HTTP side answer a HEAD at all (any status)?"""
        try:
            httpx.head(self.http_url + "/", timeout=timeout)
            return True
        except httpx.HTTPError:
            return False

    def xrootd_restart(self) -> None:
        """What an operator does to an XRootD whose HTTP side wedged: restart it (start.sh starts
        what is not running). Its data directory, and so every stored copy, stays as it was."""
        pidfile = self.state_dir / "run" / "xrootd.pid"
        try:
            os.kill(int(pidfile.read_text().strip()), 9)
        except (OSError, ValueError):
            pass
        deadline = time.monotonic() + 30
        while self.xrootd_answers(1.0) and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run([str(SCRIPTS / "start.sh"), str(self.state_dir)], check=True, timeout=300,
                       capture_output=True)

    def unlimited(self, rse: str) -> None:
        """No account limit for the lake's account on `rse` (without one Rucio refuses every rule).
        Rucio 39 and later take it under /accounts; the 38 LTS series only under /accountlimits."""
        r = self.call("POST", f"/accounts/{self.account}/limits/local/{rse}", {"bytes": -1}, ok=(201, 405, 409))
        if r.status_code == 405:
            self.call("POST", f"/accountlimits/local/{self.account}/{rse}", {"bytes": -1}, ok=(201, 409))

    def agent_lake_config(self, **rucio: Any) -> dict[str, Any]:
        """The [lake] table of an agent config pointing at this lake."""
        return {"kind": "rucio", "rucio": {
            "url": self.url, "account": self.account,
            "auth": {"type": "userpass", "username": self.env["EDGE_LAKE_RUCIO_USERNAME"],
                     "password": self.env["EDGE_LAKE_RUCIO_PASSWORD"]}, **rucio}}


class S3Lake:
    """The lake's S3 RSE (scripts/lake/s3-start.sh): a one-node Ceph radosgw behind TLS, whose URLs
    Rucio signs. Objects are reached here the way a user would: through URLs Rucio signs."""

    def __init__(self, lake: Lake, env: dict[str, str]) -> None:
        self.lake = lake
        self.rse = env["EDGE_LAKE_S3_RSE"]
        self.url = env["EDGE_LAKE_S3_URL"]
        self.bucket = env["EDGE_LAKE_S3_BUCKET"]
        self.ca = env["EDGE_LAKE_S3_CA"]
        self.tls = ssl.create_default_context(cafile=self.ca)   # the gateway's self-signed certificate

    def pfn(self, scope: str, name: str) -> str:
        return self.lake.pfn(self.rse, scope, name, scheme="https")

    def sign(self, op: str, pfn: str, lifetime: int = 600) -> str:
        r = self.lake.call("GET", "/credentials/signurl?" + urlencode(
            {"rse": self.rse, "svc": "s3", "op": op, "url": pfn, "lifetime": lifetime}))
        return r.text.strip()

    def get(self, pfn: str) -> httpx.Response:
        return httpx.get(self.sign("read", pfn), verify=self.tls, timeout=120)

    def put(self, pfn: str, data: bytes) -> None:
        r = httpx.put(self.sign("write", pfn), content=data, verify=self.tls, timeout=120,
                      headers={"Content-Length": str(len(data))})
        assert r.status_code == 200, (r.status_code, r.text[:300])

    def destination(self) -> dict[str, Any]:
        """A [destinations.*] table for the agent."""
        return {"kind": "rse", "rse": self.rse, "sign_url": "s3", "ca_cert": self.ca}


def _answers(url: str) -> bool:
    """Does something accept connections at url's host and port? (lake.env outlives a stopped store)"""
    import socket
    from urllib.parse import urlsplit
    p = urlsplit(url)
    try:
        with socket.create_connection((p.hostname or "127.0.0.1", p.port or 443), timeout=3):
            return True
    except OSError:
        return False


def start_s3(lake: Lake) -> Iterator[S3Lake]:
    """The S3 RSE in the session's lake: reused when lake.env names one, else started by
    s3-start.sh in the lake's state directory (and stopped at the end)."""
    env_file = lake.state_dir / "lake.env"
    env = read_env(env_file)
    if "EDGE_LAKE_S3_URL" in env and _answers(env["EDGE_LAKE_S3_URL"]):
        yield S3Lake(lake, env)
        return
    t0 = time.monotonic()
    r = subprocess.run([str(SCRIPTS / "s3-start.sh"), str(lake.state_dir)], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/lake/s3-start.sh failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    print(f"\n[S3 store started in {time.monotonic() - t0:.1f}s in {lake.state_dir}/ceph]")
    try:
        yield S3Lake(lake, read_env(env_file))
    finally:
        subprocess.run([str(SCRIPTS / "s3-stop.sh"), str(lake.state_dir)], capture_output=True, timeout=120)


# The session's lake once a test asked for it (the daemons fixture looks after its XRootD).
ACTIVE: Lake | None = None


def start_lake() -> Iterator[Lake]:
    global ACTIVE
    given = os.environ.get("EDGE_LAKE_ENV")
    if given:
        env = read_env(Path(given))
        asked = os.environ.get("EDGE_LAKE_RUCIO_VERSION")
        if asked and asked != recorded_release(env):
            raise RuntimeError(f"EDGE_LAKE_ENV={given} is a lake of Rucio {recorded_release(env)}, not {asked} "
                               "(EDGE_LAKE_RUCIO_VERSION): the tests would say they ran against another release")
        ACTIVE = Lake(env)
        yield ACTIVE
        return
    state = Path(os.environ.get("EDGE_LAKE_TEST_STATE", "/var/tmp/edge-lake-tests"))
    # the Rucio release is EDGE_LAKE_RUCIO_VERSION's (scripts/test-rucio), else the newest; each
    # release's venv is kept outside the state directory, for the next run
    env = {**os.environ, "EDGE_LAKE_VENV_ROOT": os.environ.get("EDGE_LAKE_VENV_ROOT", "/var/tmp/edge-lake-venvs")}
    t0 = time.monotonic()
    r = subprocess.run([str(SCRIPTS / "start.sh"), str(state)], env=env, capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"scripts/lake/start.sh failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    print(f"\n[lake started in {time.monotonic() - t0:.1f}s in {state}]")
    try:
        ACTIVE = Lake(read_env(state / "lake.env"))
        yield ACTIVE
    finally:
        ACTIVE = None
        subprocess.run([str(SCRIPTS / "stop.sh"), str(state)], env=env, capture_output=True, timeout=120)
