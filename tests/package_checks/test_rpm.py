"""The EL9 RPM (packaging/rpm/edge-agent.spec, built by scripts/package rpm): what it contains,
that its venv works from where it is installed and leaks no build path, and that installing,
upgrading and erasing it with its scriptlets does what an operator expects."""

from __future__ import annotations

import json
import marshal
import os
import platform
import re
import signal
import socket
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from .conftest import Build, project_version
from .pkgtools import CLEAN_ENV, CONFIG, PACKAGING, ROOT, SPEC, UNIT, run

pytestmark = pytest.mark.packaging

VENV = "/opt/edge-agent/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"
CONF = "/etc/edge-agent/edge-agent.toml"
# EL9's glibc: a wheel for a newer one would not load there.
EL9_GLIBC = (2, 34)


def query(package: Path, fmt: str) -> str:
    return run(["rpm", "-qp", "--qf", fmt, package]).stdout


def file_table(package: Path) -> dict[str, dict[str, str]]:
    fmt = "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t%{FILEGROUPNAME}\t%{FILEFLAGS:fflags}\t%{FILELINKTOS}\n]"
    table = {}
    for line in query(package, fmt).splitlines():
        name, perms, user, group, flags, link = line.split("\t")
        table[name] = {"perms": perms, "user": user, "group": group, "flags": flags, "link": link}
    return table


# ------------------------------------------------------------------ the package, as built

def test_build_took(rpm_build: Build) -> None:
    """scripts/package rpm works and says where the result is (timing in the -rA report)."""
    print(f"scripts/package rpm: {rpm_build.seconds:.1f} s, {rpm_build.rpm.stat().st_size / 1e6:.1f} MB")
    assert rpm_build.rpm.name == f"edge-agent-{rpm_build.version}-1.el9.{platform.machine()}.rpm"


def test_lists_unit_config_venv_and_command(rpm_build: Build) -> None:
    files = set(run(["rpm", "-qlp", rpm_build.rpm]).stdout.split())
    for expected in ("/usr/bin/edge-agent", "/usr/lib/systemd/system/edge-agent.service",
                     "/usr/lib/sysusers.d/edge-agent.conf", "/usr/lib/tmpfiles.d/edge-agent.conf",
                     CONF, "/etc/edge-agent", "/var/lib/edge-agent", "/opt/edge-agent",
                     f"{VENV}/bin/python", f"{VENV}/bin/python3.11", f"{VENV}/bin/edge-agent",
                     f"{VENV}/pyvenv.cfg", f"{SITE}/edge_agent/cli.py",
                     f"{SITE}/edge_agent/__pycache__/cli.cpython-311.pyc"):
        assert expected in files, f"{expected} is not in the RPM"
    # only the agent's own dependencies: pip ran from its wheel and is not in the venv
    assert not any(f.startswith(f"{SITE}/pip/") for f in files)


def test_config_is_noreplace_and_private(rpm_build: Build) -> None:
    assert run(["rpm", "-qcp", rpm_build.rpm]).stdout.split() == [CONF]
    t = file_table(rpm_build.rpm)
    # c = %config, n = noreplace: a local edit survives upgrades (the new one lands as .rpmnew)
    assert set(t[CONF]["flags"]) >= {"c", "n"}, t[CONF]
    assert (t[CONF]["perms"], t[CONF]["user"], t[CONF]["group"]) == ("-rw-r-----", "root", "edge-agent")
    d = t["/etc/edge-agent"]
    assert (d["perms"], d["user"], d["group"]) == ("drwxr-x---", "root", "edge-agent")
    s = t["/var/lib/edge-agent"]
    assert (s["perms"], s["user"], s["group"]) == ("drwxr-x---", "edge-agent", "edge-agent")
    # the packaged config is the reviewed file in packaging/config
    assert t["/usr/bin/edge-agent"]["link"] == f"{VENV}/bin/edge-agent"
    assert t[f"{VENV}/bin/python3.11"]["link"] == "/usr/bin/python3.11"


def test_nothing_else_is_writable_or_foreign(rpm_build: Build) -> None:
    for name, f in file_table(rpm_build.rpm).items():
        if f["perms"].startswith("l"):
            continue
        if name in ("/var/lib/edge-agent",):
            continue
        assert f["user"] == "root", f"{name} is owned by {f['user']}"
        assert f["perms"][5] != "w" and f["perms"][8] != "w", f"{name} is {f['perms']}"


def test_metadata_and_dependencies(rpm_build: Build) -> None:
    name, version, release, arch = query(rpm_build.rpm, "%{NAME} %{VERSION} %{RELEASE} %{ARCH}").split()
    assert (name, version, arch) == ("edge-agent", project_version(), platform.machine())
    assert release.endswith(".el9")
    requires = run(["rpm", "-qp", "--requires", rpm_build.rpm]).stdout.splitlines()
    assert "python3.11" in requires and "tzdata" in requires
    for r in requires:
        assert "BUILDROOT" not in r and ".pyenv" not in r and str(ROOT) not in r, r
        assert "dist(" not in r, f"the venv's dist-info must not become Requires: {r}"
        if m := re.search(r"\(GLIBC_(\d+)\.(\d+)", r):
            assert (int(m[1]), int(m[2])) <= EL9_GLIBC, f"{r}: newer than EL9's glibc"
    provides = run(["rpm", "-qp", "--provides", rpm_build.rpm]).stdout.splitlines()
    assert all(p.split()[0] in ("edge-agent", f"edge-agent({arch.replace('_', '-')})", "config(edge-agent)")
               for p in provides), f"the venv's libraries must not be Provides: {provides}"


def test_no_library_the_venv_bundles_is_required(rpm_build: Build) -> None:
    """The wheels bring their own shared libraries (the XRootD client's libXrd*.so.6, what auditwheel
    copied in as libcrypto-3a0647ea.so.3...). The venv provides nothing to the system, so a Requires
    on one of them could never be met on EL9: dnf would refuse the package."""
    shipped = {f.rsplit("/", 1)[-1] for f in run(["rpm", "-qlp", rpm_build.rpm]).stdout.split()
               if f.startswith(VENV + "/")}
    requires = run(["rpm", "-qp", "--requires", rpm_build.rpm]).stdout.splitlines()
    sonames = {r.split("(", 1)[0] for r in requires if ".so" in r.split("(", 1)[0]}
    assert "libc.so.6" in sonames and "libXrdCl.so.6" in shipped       # the check sees both sides
    bundled = sorted(sonames & shipped)
    assert not bundled, f"Requires on libraries the venv itself carries: {bundled}"


def test_spec_default_version_is_the_projects() -> None:
    """A bare `rpmbuild` of the spec (no --define edge_agent_version) builds the right version."""
    pattern = r"^Version:\s*%\{\?edge_agent_version\}%\{!\?edge_agent_version:([^}]+)\}"
    m = re.search(pattern, SPEC.read_text(), re.MULTILINE)
    assert m and m.group(1) == project_version()


def test_scriptlets_are_plain_shell(rpm_build: Build) -> None:
    """Every systemd/sysusers macro is either expanded or replaced by its fallback; sh parses all."""
    scripts = {tag: query(rpm_build.rpm, f"%{{{tag}}}") for tag in ("PREIN", "POSTIN", "PREUN", "POSTUN")}
    for tag, body in scripts.items():
        assert body and body != "(none)", f"{tag} is missing"
        assert not re.search(r"%\{|%[A-Za-z_]+", body), f"unexpanded macro in {tag}:\n{body}"
        run(["sh", "-n"], input=body)
    assert "useradd" in scripts["PREIN"] or "sysusers" in scripts["PREIN"]
    assert "preset" in scripts["POSTIN"] and "tmpfiles" in scripts["POSTIN"]
    assert "disable" in scripts["PREUN"] and "try-restart" in scripts["POSTUN"]


def test_srpm_rebuilds_offline(rpm_build: Build) -> None:
    """The SRPM carries every wheel, so an EL9 builder (mock/koji, no network) can rebuild it."""
    files = run(["rpm", "-qlp", rpm_build.srpm]).stdout.split()
    assert f"edge-agent-{rpm_build.version}-wheels.tar.gz" in files and "edge-agent.spec" in files
    assert {"edge-agent.service", "edge-agent.toml", "edge-agent.sysusers", "edge-agent.tmpfiles"} <= set(files)


# ------------------------------------------------------------------ installed files only

def test_installed_agent_checks_its_config(files_root: Path) -> None:
    """The venv runs from where it was installed (run by path: its shebang names /opt/...)."""
    r = files_root
    proc = run([r / VENV.lstrip("/") / "bin/python", r / VENV.lstrip("/") / "bin/edge-agent",
                "check-config", r / CONF.lstrip("/")], env=CLEAN_ENV)
    doc = json.loads(proc.stdout.split("\n", 1)[1])
    assert doc["state_dir"] == "/var/lib/edge-agent"
    assert doc["dry_run"] is True, "a fresh host must not delete anything before someone configured it"
    installed = (r / CONF.lstrip("/")).read_bytes()
    assert installed == CONFIG.read_bytes()
    assert (r / "usr/lib/systemd/system/edge-agent.service").read_bytes() == UNIT.read_bytes()


def test_installed_agent_has_the_schedule_extra(files_root: Path) -> None:
    """astral is in the venv: rules may name the civil, nautical or astronomical night at [site]."""
    py = files_root / VENV.lstrip("/") / "bin/python"
    proc = run([py, "-c", "import astral; print(astral.__version__)"], env=CLEAN_ENV)
    assert int(proc.stdout.strip().split(".")[0]) >= 3, proc.stdout


def test_installed_agent_speaks_root_through_the_xrootd_bindings(files_root: Path) -> None:
    """The xroot extra is in the venv: the XRootD Python bindings (6.x, a manylinux_2_28 wheel)
    load from where they were installed, and root_client = "bindings" passes check-config."""
    r = files_root
    py = r / VENV.lstrip("/") / "bin/python"
    proc = run([py, "-c", "import XRootD.client as c; print(c.__version__)"], env=CLEAN_ENV)
    assert int(proc.stdout.strip().split(".")[0]) >= 6, proc.stdout
    cfg = r / "tmp-root-client.toml"
    cfg.write_text(ROOT_CLIENT_CONFIG)
    proc = run([py, r / VENV.lstrip("/") / "bin/edge-agent", "check-config", cfg], env=CLEAN_ENV)
    assert json.loads(proc.stdout.split("\n", 1)[1])["lake"]["rucio"]["root_client"] == "bindings"


# a Rucio lake that asks for the XRootD bindings by name, with one root:// destination
ROOT_CLIENT_CONFIG = """
state_dir = "/var/lib/edge-agent"

[lake]
kind = "rucio"

[lake.rucio]
url = "https://rucio.example.org"
account = "edge"
root_client = "bindings"
auth = { type = "userpass", username = "edge", password = "not-used" }

[destinations.xrd]
kind = "rse"
rse = "XRD1"
scheme = "root"

[rules.daq]
directory = "/data/daq"
scope = "daq"
destinations = ["xrd"]
copies = 1
"""


def test_installed_agent_can_keep_its_ledger_on_postgresql(files_root: Path) -> None:
    """The postgres extra is in the venv: a config with [ledger] url is accepted (and psycopg's
    binary wheel loads from where it was installed)."""
    r = files_root
    py = r / VENV.lstrip("/") / "bin/python"
    proc = run([py, "-c", "import psycopg; print(psycopg.pq.__impl__)"], env=CLEAN_ENV)
    assert proc.stdout.strip() == "binary"
    cfg = r / "tmp-ledger.toml"
    # (a shared ledger: the completion policy chosen, never `closed`)
    text = CONFIG.read_text().replace('completion = ["closed", "stable"]', 'completion = ["renamed"]')
    assert 'completion = ["renamed"]' in text
    cfg.write_text(text + '\n[ledger]\nurl = "postgresql://edge@db.example.org/edge"\n')
    proc = run([py, r / VENV.lstrip("/") / "bin/edge-agent", "check-config", cfg], env=CLEAN_ENV)
    assert json.loads(proc.stdout.split("\n", 1)[1])["ledger"]["url"] == "postgresql://edge@db.example.org/edge"


def test_ships_alert_rules_and_observatory_examples_that_check(files_root: Path) -> None:
    """/usr/share/edge-agent holds the repo's alert rules and conf/ examples, and the installed
    agent accepts each example as it is."""
    r, repo = files_root, ROOT
    share = r / "usr/share/edge-agent"
    assert (share / "monitoring/edge-agent.rules.yml").read_bytes() == \
        (PACKAGING / "monitoring/edge-agent.rules.yml").read_bytes()
    for name in ("local.toml", "magic.toml", "lsst.toml"):
        shipped = share / "examples" / name
        assert shipped.read_bytes() == (repo / "conf" / name).read_bytes(), name
        run([r / VENV.lstrip("/") / "bin/python", r / VENV.lstrip("/") / "bin/edge-agent",
             "check-config", shipped], env=CLEAN_ENV)


def test_venv_points_at_el9_python(files_root: Path) -> None:
    venv = files_root / VENV.lstrip("/")
    assert os.readlink(venv / "bin/python3.11") == "/usr/bin/python3.11"
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    assert cfg["home"] == "/usr/bin" and cfg["include-system-site-packages"] == "false"
    assert (venv / "bin/edge-agent").read_text().splitlines()[0] == f"#!{VENV}/bin/python"


def test_no_build_path_leaked(files_root: Path, rpm_build: Build) -> None:
    """No installed file, text or binary (.pyc), names the buildroot, the build tree or the source."""
    needles = [b"BUILDROOT", str(rpm_build.work).encode(), str(ROOT).encode(), b"/.pyenv/"]
    leaks = []
    for dirpath, _dirs, names in os.walk(files_root):
        for n in names:
            p = Path(dirpath, n)
            if p.is_symlink() or "var/lib/rpm" in str(p.relative_to(files_root)):
                continue
            data = p.read_bytes()
            leaks += [f"{p.relative_to(files_root)}: {needle.decode()}" for needle in needles if needle in data]
    assert not leaks, "\n".join(leaks[:20])


def test_bytecode_is_complete_and_names_installed_paths(files_root: Path) -> None:
    """Every module has its .pyc (the agent's user cannot write the venv), compiled for /opt/..."""
    site = files_root / SITE.lstrip("/")
    missing = []
    for py in site.rglob("*.py"):
        pyc = py.parent / "__pycache__" / f"{py.stem}.cpython-311.pyc"
        if not pyc.exists():
            missing.append(str(py.relative_to(site)))
    assert not missing, f"{len(missing)} modules without bytecode, e.g. {missing[:5]}"
    pyc = site / "edge_agent/__pycache__/cli.cpython-311.pyc"
    code = marshal.loads(pyc.read_bytes()[16:])
    assert code.co_filename == f"{SITE}/edge_agent/cli.py"


def test_wheels_fit_el9(files_root: Path) -> None:
    """Every bundled wheel is pure Python or CPython 3.11 for manylinux <= glibc 2.34."""
    site = files_root / SITE.lstrip("/")
    seen = 0
    for wheel in site.glob("*.dist-info/WHEEL"):
        tags = [line.split(":", 1)[1].strip() for line in wheel.read_text().splitlines() if line.startswith("Tag:")]
        assert tags, wheel
        seen += 1
        for tag in tags:
            py, _abi, plat = tag.split("-")
            assert py in ("py3", "cp311") or py.startswith("py2.py3"), f"{wheel.parent.name}: {tag}"
            if plat == "any":
                continue
            m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)|manylinux(2014|2010|1)_(\w+)", plat)
            assert m, f"{wheel.parent.name}: {tag} is not a manylinux wheel"
            if m[1]:
                assert (int(m[1]), int(m[2])) <= EL9_GLIBC, f"{wheel.parent.name}: {tag}"
            assert (m[3] or m[5]) == platform.machine()
    assert seen >= 10


# ------------------------------------------------------------------ installed with scriptlets

def passwd_entry(root: Path, name: str) -> list[str]:
    for line in (root / "etc/passwd").read_text().splitlines():
        if line.split(":")[0] == name:
            return line.split(":")
    raise AssertionError(f"no user {name} in {root}/etc/passwd")


def test_scriptlets_create_user_dirs_and_enable(overlay_root: Path) -> None:
    m = overlay_root
    user = passwd_entry(m, "edge-agent")
    uid, gid = int(user[2]), int(user[3])
    assert user[5] == "/var/lib/edge-agent" and user[6].endswith("/nologin")
    assert uid < 1000, "a system user"
    st = (m / "var/lib/edge-agent").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (uid, gid, 0o750)
    st = (m / CONF.lstrip("/")).stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, gid, 0o640)
    # %post's preset (Debian has no preset files: enable) linked it into multi-user.target
    assert (m / "etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()


def test_unmodified_unit_verifies_in_installed_root(overlay_root: Path) -> None:
    """systemd-analyze verify with the real ExecStart (/usr/bin/edge-agent, installed there)."""
    proc = run(["systemd-analyze", "verify", f"--root={overlay_root}", "edge-agent.service"], check=False)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_config_readable_by_the_agent_user(overlay_root: Path) -> None:
    proc = run(["chroot", overlay_root, "runuser", "-u", "edge-agent", "--",
                "/usr/bin/edge-agent", "check-config", CONF], env=CLEAN_ENV)
    assert "valid" in proc.stdout.splitlines()[0]


def test_installed_command_reports_its_version(overlay_root: Path, rpm_build: Build) -> None:
    """/usr/bin/edge-agent, as installed (symlink, shebang, venv, EL9 python path), answers
    --version with the packaged version, as the agent's user."""
    proc = run(["chroot", overlay_root, "runuser", "-u", "edge-agent", "--", "/usr/bin/edge-agent", "--version"],
               env=CLEAN_ENV)
    assert proc.stdout.strip() == f"edge-agent {rpm_build.version}", proc.stdout + proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as resp:
        return json.load(resp)


def test_installed_agent_moves_a_file_as_its_user(overlay_root: Path) -> None:
    """The installed agent, as user edge-agent, with the packaged config (dry_run switched off
    through the environment, as /etc/sysconfig/edge-agent would): it copies a new DAQ file to
    both lake directories, deletes it from the buffer, and stops cleanly on SIGTERM."""
    m = overlay_root
    user = passwd_entry(m, "edge-agent")
    uid, gid = int(user[2]), int(user[3])
    cfg = tomllib.loads(CONFIG.read_text())
    buffer = m / cfg["rules"]["daq"]["directory"].lstrip("/")
    lakes = [m / d["path"].lstrip("/") for d in cfg["destinations"].values()]
    for d in [buffer, *lakes]:
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, uid, gid)
    for lake, d in zip(lakes, cfg["destinations"].values()):
        (lake / d["require_file"]).touch()
    port = free_port()
    env = {**CLEAN_ENV, "HOME": "/var/lib/edge-agent", "EDGE_AGENT_DRY_RUN": "false",
           "EDGE_AGENT_STATUS__PORT": str(port), "EDGE_AGENT_LOG__FORMAT": "json",
           "EDGE_AGENT_RULES__DAQ__STABLE_SECONDS": "0.5", "EDGE_AGENT_CONFIRM_INTERVAL_SECONDS": "1"}
    agent = subprocess.Popen(["chroot", f"--userspec={uid}:{gid}", f"--groups={gid}", str(m),
                              "/usr/bin/edge-agent", "-c", CONF, "run"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status(port)
                break
            except OSError:
                assert agent.poll() is None, f"the agent exited {agent.returncode}:\n{agent.stdout.read()}"
                assert time.monotonic() < deadline, "the status server never answered"
                time.sleep(0.2)
        data = os.urandom(256 * 1024)
        # written in place: the `closed` policy sees the close-after-write of this name (the
        # agent's user cannot read root's /proc/PID/fd, so it relies on that event)
        (buffer / "run0001.fits").write_bytes(data)
        deadline = time.monotonic() + 30
        while (buffer / "run0001.fits").exists():
            assert agent.poll() is None, f"the agent exited {agent.returncode}:\n{agent.stdout.read()}"
            assert time.monotonic() < deadline, f"not deleted in 30 s: {json.dumps(status(port)['rules'])[:2000]}"
            time.sleep(0.2)
        copies = [p for lake in lakes for p in lake.rglob("run0001.fits")]
        assert len(copies) == 2 and all(p.read_bytes() == data for p in copies), copies
        assert status(port)["rules"]["daq"]["states"]["deleted"]["files"] == 1
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(timeout=60)
        print(f"clean stop in {time.monotonic() - t0:.1f} s")
        assert rc == 0, agent.stdout.read()
        ledger = m / "var/lib/edge-agent/ledger.sqlite"
        assert ledger.stat().st_uid == uid
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_upgrade_keeps_local_edit_and_erase_cleans_up(overlay_root: Path, rpm_build: Build) -> None:
    m = overlay_root
    conf = m / CONF.lstrip("/")
    edited = conf.read_text() + "\n# site edit\n"
    conf.write_text(edited)
    run(["rpm", "--root", m, "--dbpath", "/var/lib/rpm", "-U", "--replacepkgs", "--nodeps", rpm_build.rpm])
    assert conf.read_text() == edited, "an upgrade must not replace an edited config"
    ledger = m / "var/lib/edge-agent/ledger.sqlite"
    had_ledger = ledger.exists()
    run(["rpm", "--root", m, "--dbpath", "/var/lib/rpm", "-e", "edge-agent"])
    assert not (m / "opt/edge-agent").exists() and not (m / "usr/bin/edge-agent").is_symlink()
    assert (m / (CONF.lstrip("/") + ".rpmsave")).read_text() == edited
    assert not (m / "etc/systemd/system/multi-user.target.wants/edge-agent.service").exists()
    # the ledger is data, not the package's: erasing the package keeps it
    assert ledger.exists() == had_ledger
