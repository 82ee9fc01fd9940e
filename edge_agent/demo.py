"""`edge-agent demo`: a synthetic night on the embedded default lake, watched through /status.

Creates a buffer with three DAQ directories (one per completion style) and two lake
directories, starts the real agent on them, writes files the way DAQs do (a slow
writer, write-then-rename, data plus a marker or JSON sidecar), and shows each file
hashed, copied twice, confirmed and deleted, polling the status endpoint as it runs.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from . import logs
from .localfs import is_agent_temp
from .places import PLACE_NAME
from .settings import load_settings

CONFIG = """\
# edge-agent demo: written by `edge-agent demo`
state_dir = "{root}/state"
rescan_seconds = 10
confirm_interval_seconds = 2

[status]
host = "127.0.0.1"
port = {port}

[log]
level = "info"
format = "json"

[destinations.lake1]
path = "{root}/lake/site-a"

[destinations.lake2]
path = "{root}/lake/site-b"

[rules.slow]        # a writer that trickles data in: done when closed and quiet for 2 s
directory = "{root}/buffer/slow"
include = ["*.fits"]
completion = ["closed", "stable"]
stable_seconds = 2
scope = "demo"
name_template = "{{night}}/slow/{{relpath}}"
dataset_template = "slow.{{night}}"
destinations = ["lake1", "lake2"]
copies = 2

[rules.renamed]     # written as NAME.part, renamed when done
directory = "{root}/buffer/renamed"
completion = ["renamed"]
scope = "demo"
name_template = "{{night}}/renamed/{{relpath}}"
destinations = ["lake1", "lake2"]
copies = 2
priority = 5

[rules.marked]      # data first, then NAME.json whose content becomes the file's metadata
directory = "{root}/buffer/marked"
completion = ["sidecar"]
scope = "demo"
name_template = "{{night}}/marked/{{relpath}}"
destinations = ["lake1", "lake2"]
copies = 2
metadata = {{ instrument = "demo-cam" }}
"""


def write_night(root: Path, n: int, stop: threading.Event) -> list[Path]:
    rng = random.Random(42)
    made: list[Path] = []
    for i in range(n):
        if stop.is_set():
            break
        style = ("slow", "renamed", "marked")[i % 3]
        size = rng.randint(200_000, 4_000_000)
        final = root / "buffer" / style / f"run{i // 3:03d}" / f"frame{i:04d}.fits"
        final.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size)
        if style == "slow":
            with open(final, "wb") as fh:
                for k in range(0, size, size // 4 + 1):
                    fh.write(data[k:k + size // 4 + 1])
                    fh.flush()
                    time.sleep(0.25)
        elif style == "renamed":
            tmp = final.with_name(final.name + ".part")
            tmp.write_bytes(data)
            os.rename(tmp, final)
        else:
            final.write_bytes(data)
            time.sleep(0.2)
            final.with_name(final.name + ".json").write_text(json.dumps({"run": i // 3, "exposure_s": 30}))
        print(f"  DAQ wrote  {final.relative_to(root)} ({size / 1e6:.1f} MB, {style})", flush=True)
        made.append(final)
        time.sleep(0.3)
    return made


SHOW = {
    "hashed": lambda e: f"hashed     {e['did']}  adler32 {e['adler32']}  blake3 {e['blake3'][:16]}…",
    "transferred": lambda e: f"copied     {e['did']}  to both lake sites",
    "confirmed": lambda e: "confirmed  {}  {}".format(
        e["did"], ", ".join(f"{r['location']} {r['size']} B adler32 {r['adler32']}" for r in e["replicas"])),
    "deleted": lambda e: f"deleted    {e['path']}  from the buffer ({e['why']})",
    "failed_permanent": lambda e: f"QUARANTINED {e['path']}: {e.get('reason')}",
    "failed_retryable": lambda e: f"retrying   {e['path']}: {e.get('reason')}",
}


def show_log(fh) -> None:  # type: ignore[no-untyped-def]
    for line in fh.readlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        fmt = SHOW.get(e.get("event", ""))
        if fmt:
            try:
                print("  agent:     " + fmt(e), flush=True)
            except (KeyError, TypeError):
                pass


def fetch(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def run_demo(directory: str | None, nfiles: int, port: int) -> int:
    root = Path(directory or tempfile.mkdtemp(prefix="edge-agent-demo-")).absolute()
    for d in ("buffer/slow", "buffer/renamed", "buffer/marked", "lake/site-a", "lake/site-b"):
        (root / d).mkdir(parents=True, exist_ok=True)
    cfg = root / "edge-agent.toml"
    cfg.write_text(CONFIG.format(root=root, port=port))
    print(f"edge-agent demo in {root}\n  config: {cfg}\n  status: http://127.0.0.1:{port}/status\n", flush=True)
    settings = load_settings(cfg)
    log_path = root / "agent.log"
    log_fh = open(log_path, "a")
    logs.setup("info", "json", stream=log_fh)

    from .app import Agent
    agent = Agent(settings)
    t = threading.Thread(target=agent.run, name="agent", daemon=True)
    t.start()
    stop = threading.Event()
    made: list[Path] = []
    writer = threading.Thread(target=lambda: made.extend(write_night(root, nfiles, stop)), daemon=True)
    writer.start()
    base = f"http://127.0.0.1:{port}"
    ok = False
    log_reader = open(log_path)
    log_reader.seek(0, os.SEEK_END)
    deadline = time.time() + 60 + nfiles * 5
    try:
        while time.time() < deadline:
            time.sleep(1.5)
            show_log(log_reader)
            try:
                doc = fetch(base + "/status")
            except OSError as exc:
                print(f"  (status endpoint not answering yet: {exc})")
                continue
            totals: dict[str, int] = {}
            for r in doc["rules"].values():
                for state, v in r["states"].items():
                    totals[state] = totals.get(state, 0) + v["files"]
            line = ", ".join(f"{k} {v}" for k, v in totals.items() if v)
            print(f"  /status: {line or 'nothing yet'}; ready={doc['ready']}", flush=True)
            if not writer.is_alive() and totals.get("deleted", 0) >= len(made) and made:
                ok = totals.get("quarantined", 0) == 0
                break
    except KeyboardInterrupt:
        print("interrupted")
    finally:
        stop.set()
        agent.stop()
        t.join(timeout=35)
        log_fh.close()
        show_log(log_reader)
        log_reader.close()
    print()
    lake_files = sorted(p for p in (root / "lake").rglob("*") if p.is_file() and p.name != PLACE_NAME)
    left = sorted(p for p in (root / "buffer").rglob("*") if p.is_file() and not is_agent_temp(p.name))
    print(f"lake now holds {len(lake_files)} copies of {len(made)} files (2 each):")
    for p in lake_files[:8]:
        print(f"  {p.relative_to(root)}")
    if len(lake_files) > 8:
        print(f"  ... and {len(lake_files) - 8} more")
    print(f"buffer files left: {len(left)}")
    exe = Path(sys.executable).parent / "edge-agent"
    cmd = str(exe) if exe.exists() else "edge-agent"
    print(f"\nOne file's history:  {cmd} -c {cfg} files frame0000")
    print(f"Everything:          {cmd} -c {cfg} files")
    print(f"The buffer's status: {cmd} -c {cfg} status")
    print(f"Agent log (JSON):    {log_path}")
    if ok and len(lake_files) == 2 * len(made) and not left:
        print("\nDEMO OK: every file hashed, copied twice, confirmed and deleted from the buffer.")
        return 0
    print("\nDEMO INCOMPLETE: see the log above and `edge-agent files`.", file=sys.stderr)
    return 1
