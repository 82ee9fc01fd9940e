"""The status page in a real browser: headless Chromium (Debian's) against a real agent.

`--virtual-time-budget` lets the page's timers and fetch() run before `--dump-dom` prints the
DOM (without it Chromium dumps the page before any poll). The script-drawn elements carry
data-k/data-rule/data-state attributes; the assertions read those, not the layout.
"""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from package_checks.pkgtools import apt_install
from support import Daemon

pytestmark = pytest.mark.integration

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        why = apt_install("chromium")
        found = shutil.which("chromium")
        if found is None:
            pytest.skip(f"Debian's chromium is missing and cannot be installed here: {why}")
    return found


class Dom(html.parser.HTMLParser):
    """What a dumped DOM shows: the text of every data-k element, and the element ids."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.values: dict[tuple[str, str | None, str | None], str] = {}
        self.ids: set[str] = set()
        self.attrs_of: dict[str, str] = {}
        self._open: list[tuple[str, tuple[str, str | None, str | None] | None]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.attrs_of = {k: v or "" for k, v in a.items()}
        if a.get("id"):
            self.ids.add(str(a["id"]))
        # the fleet's elements name their agent where the others name their rule
        where = a.get("data-rule") or a.get("data-agent")
        key = (str(a["data-k"]), where, a.get("data-state")) if a.get("data-k") else None
        if key:
            self.values[key] = ""
        if tag not in ("br", "meta", "img", "input", "link"):
            self._open.append((tag, key))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, key in self._open:
            if key:
                self.values[key] += data

    def get(self, k: str, rule: str | None = None, state: str | None = None) -> str:
        return self.values[(k, rule, state)].strip()


def dump(browser: str, url: str, tmp: Path, budget_ms: int = 3000) -> str:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    proc = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}",
                           f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "<html" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture
def replay() -> Iterator[dict[str, object]]:
    """A server that answers `/` with a page captured earlier (conf["pages"]) and passes /status on
    to the agent: whatever newer numbers that old page shows, its script must have fetched."""
    conf: dict[str, object] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            pages = conf["pages"]
            assert isinstance(pages, dict)
            if self.path in pages:
                body, ctype = pages[self.path], "text/html; charset=utf-8"
            else:
                try:
                    with urllib.request.urlopen(f"{conf['agent']}{self.path}", timeout=5) as r:
                        body, ctype = r.read(), r.headers["Content-Type"]
                except OSError:
                    self.send_error(502, "the agent does not answer")
                    return
            assert isinstance(body, bytes)
            self.send_response(200)
            self.send_header("Content-Type", str(ctype))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    conf["url"] = f"http://127.0.0.1:{srv.server_address[1]}/"
    yield conf
    srv.shutdown()
    srv.server_close()


def test_the_page_shows_what_the_agent_has_and_follows_it_without_reloading(
        agent, chromium: str, replay: dict[str, object], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = agent()
    d.start()
    url = f"http://127.0.0.1:{d.port}/"
    rd = d.rule_dir()
    (rd / "a.fits").write_bytes(b"a" * 5000)
    (rd / "b.fits").write_bytes(b"b" * 7000)
    (rd / "<img src=x onerror=alert(1)>.fits").write_bytes(b"")     # zero bytes: quarantined
    held = open(rd / "open.fits", "wb")       # a writer still holds it: stays in the backlog
    try:
        held.write(b"o" * 3000)
        held.flush()
        d.wait_for(lambda: d.counts() == {"deleted": 2, "quarantined": 1, "discovered": 1}, 30,
                   "two delivered, one quarantined, one waiting for its writer")

        dom_text = dump(chromium, url, tmp_path)
        dom = Dom(dom_text)
        assert "static" not in dom.ids, "the script did not run: the no-script table is still there"
        assert dom.get("ready") == "READY"
        assert dom.get("state-files", "daq", "deleted") == "2"
        assert dom.get("state-bytes", "daq", "deleted") == "12.0 kB"
        assert dom.get("state-files", "daq", "quarantined") == "1"
        assert dom.get("state-files", "daq", "discovered") == "1"
        assert dom.get("backlog-files", "daq") == "1" and dom.get("backlog-files") == "1"
        assert dom.get("quarantined-files") == "1"
        assert dom.get("lake") == "up"
        assert "zero-byte" in dom.get("quarantined") and "onerror=alert(1)>.fits" in dom.get("quarantined")
        # the hostile name is text, never markup
        assert "<img" not in dom_text and "&lt;img src=x onerror=alert(1)&gt;.fits" in dom_text
        assert re.fullmatch(r"\d+(\.\d+)?%", dom.get("disk-used-percent", "daq"))
        assert dom.get("disk-level", "daq") in ("ok", "warning", "critical")
        # the disk against the rule's own watermarks, as the agent reports them
        disk = d.status()["rules"]["daq"]["disk"]
        # (as JavaScript prints numbers: 80.0 is "80")
        assert f"watermarks {disk['warn_percent']:g}% / {disk['critical_percent']:g}%" in dom_text
        assert dom_text.count('title="warning watermark"') == 1 and 'title="critical watermark"' in dom_text
        # throughput over time: the minute in which a.fits and b.fits went out is a point above zero
        peak = re.search(r"sent per minute, last hour \(peak ([^)]*)\)", dom_text)
        assert peak and peak.group(1) != "0 B/s", peak and peak.group(1)
        assert "<polyline" in dom_text
        # recent errors: the zero-byte file's permanent failure, with its reason, as text
        errors = dom.get("recent-errors")
        assert "onerror=alert(1)>.fits" in errors and "zero-byte" in errors and "quarantined" in errors

        # the page as it was, before anything else happened
        code, stale = d.get("/")
        assert code == 200
        first_doc = json.loads(re.search(r'<script id=initial type=application/json>(.*?)</script>',
                                         stale.decode()).group(1))  # type: ignore[union-attr]
        assert first_doc["rules"]["daq"]["states"]["deleted"]["files"] == 2
    finally:
        held.close()
    (rd / "c.fits").write_bytes(b"c" * 1000)
    d.wait_for(lambda: d.counts() == {"deleted": 4, "quarantined": 1}, 30, "the held file and c.fits delivered")

    replay.update(pages={"/": stale}, agent=url.rstrip("/"))
    # one poll is due 5 s after load; 8 s of virtual time covers it
    dom_text = dump(chromium, str(replay["url"]), tmp_path, budget_ms=8000)
    dom = Dom(dom_text)
    assert dom.get("state-files", "daq", "deleted") == "4"
    assert dom.get("backlog-files", "daq") == "0" and dom.get("state-files", "daq", "discovered") == "0"
    assert float(dom.attrs_of["data-updated"]) > first_doc["generated_at"]
    assert dom.get("updated").startswith("updated ")


def test_the_page_fits_a_phone_and_says_when_the_agent_stops_answering(
        agent, chromium: str, replay: dict[str, object], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = agent()
    d.start()
    code, page = d.get("/")
    assert code == 200
    assert b"name=viewport" in page and b"<link" not in page and b" src=" not in page   # self-contained
    # measured by the page itself, in a frame 390 px wide (an ordinary phone; headless Chromium's
    # window is never narrower than 500 px), after the first draw, and handed to the frame's parent
    probe = (b"<script>setTimeout(() => parent.document.body.setAttribute('data-scroll-width',"
             b" document.documentElement.scrollWidth), 500)</script></body>")
    phone = b"<!doctype html><html><body><iframe src=/ width=390 height=844></iframe></body></html>"
    replay.update(pages={"/": page.replace(b"</body>", probe), "/phone": phone}, agent=f"http://127.0.0.1:{d.port}")
    dom = Dom(dump(chromium, f"{replay['url']}phone", tmp_path, budget_ms=2000))
    assert int(dom.attrs_of["data-scroll-width"]) <= 390, "the page scrolls sideways on a phone"

    # without script (Chromium's --dump-dom cannot run with script disabled: read the HTML itself)
    # the server-drawn table is the page, and it reloads itself
    assert b"<noscript><meta http-equiv=refresh" in page
    assert b"<div id=static>" in page and b"<th>daq</th>" in page and b"READY" in page

    assert d.stop() == 0
    # the agent is gone: the page keeps its last numbers and says it gets no answer
    dom_text = dump(chromium, str(replay["url"]), tmp_path, budget_ms=25000)
    dom = Dom(dom_text)
    assert dom.get("updated").startswith("NO ANSWER from the agent for ")
    assert dom.get("ready") == "READY"


def test_the_page_says_why_the_agent_is_not_ready(agent, chromium: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = agent()
    d.lakes["lake2"].rmdir()                  # an unmounted destination: the lake is not usable
    d.start()
    d.wait_for(lambda: d.get("/readyz")[0] == 503, 30, "the agent to report itself not ready")
    dom = Dom(dump(chromium, f"http://127.0.0.1:{d.port}/", tmp_path))
    assert dom.get("ready").startswith("NOT READY")
    assert "lake2" in dom.get("not-ready-because") and "not mounted" in dom.get("not-ready-because")
    assert dom.get("lake") == "DOWN" and "not mounted" in dom.get("lake-problem")


def test_the_page_shows_every_agent_of_a_shared_ledger_and_the_silent_ones(  # type: ignore[no-untyped-def]
        agent, chromium: str, tmp_path: Path) -> None:
    """The fleet view (issue 15): this agent alive, another one silent for 10 minutes with a file
    of its own rule still claimed under its name (its lease run out)."""
    import time

    from edge_agent.core.lifecycle import Event, State
    from edge_agent.ledger import Ledger
    d: Daemon = agent(ledger={"agent_id": "daq-1"}, rules={"daq": {"completion": ["renamed"]}})
    d.start()
    now = time.time()
    led = Ledger(d.state / "ledger.sqlite")       # the other agent, through the same ledger
    try:
        rec = led.discover("spectra", b"/elsewhere/run9.fits", "run9.fits", 1, 1, 4096, 0, 0)
        led.transition(rec.id, State.DISCOVERED, Event.COMPLETED)
        assert led.claim("daq-2", [State.COMPLETE], now - 600, 1, lease_s=60, rules=["spectra"])
        led.heartbeat("daq-2", "host-2", 2, "0.9", now - 600)
    finally:
        led.close()
    d.wait_for(lambda: len(d.status().get("fleet", {}).get("agents", [])) == 2, 30, "both agents in /status")
    dom_text = dump(chromium, f"http://127.0.0.1:{d.port}/", tmp_path)
    dom = Dom(dom_text)
    assert "static" not in dom.ids
    assert dom.get("fleet-alive", "daq-1") == "alive" and dom.get("fleet-claims", "daq-1") == "0"
    assert dom.get("fleet-alive", "daq-2") == "SILENT" and dom.get("fleet-claims", "daq-2") == "1 (1 expired)"
    assert dom.get("fleet-heartbeat-age", "daq-2") == "10 min ago"
    assert "spectra: run9.fits (complete, 4.1 kB, lease ran out" in dom.get("fleet-in-flight", "daq-2")
    assert re.search(r'<tr data-k="fleet-agent" data-agent="daq-2" class="bad">', dom_text)
