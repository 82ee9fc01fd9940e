"""Extractors on their own: what their output may be, a command run (exit status, stderr, timeout,
output limits, shutdown), plug-ins found by entry point, and the settings that name them."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from plugins import install_extractor_plugins

from edge_agent.errors import ConfigError, ExtractorFailed, ShuttingDown
from edge_agent.extractors import command, output
from edge_agent.extractors.examples import FirstLine, LineCount
from edge_agent.extractors.plugins import resolve
from edge_agent.settings import Settings, load_settings


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(install_extractor_plugins(tmp_path / "site")))


def script(tmp_path: Path, body: str, name: str = "extract.py") -> list[str]:
    """argv of a Python program; its file's path is sys.argv[1]."""
    p = tmp_path / name
    p.write_text("import json, sys, os, time\n" + body)
    return [sys.executable, str(p)]


@pytest.fixture
def data_file(tmp_path: Path) -> str:
    p = tmp_path / "run42.dat"
    p.write_bytes(b"header line\nframe 1\nframe 2\n")
    return str(p)


# ---------------------------------------------------------------- output

def test_a_json_object_of_scalars_is_taken_as_it_is() -> None:
    data = {"run": 42, "exptime": 30.5, "object": "Crab", "calibrated": False, "date-obs": "2026-12-07"}
    assert output.check(data) == data


@pytest.mark.parametrize("data, says", [
    ([1, 2], "an array, not a JSON object"),
    ("run 42", "a str, not a JSON object"),
    ({"Run": 1}, "key 'Run': use 1-64 lower-case"),
    ({"run number": 1}, "key 'run number'"),
    ({"1run": 1}, "key '1run'"),
    ({"x" * 65: 1}, "key 'xxx"),
    ({"bytes": 1}, "key 'bytes': a column of the DID itself"),
    ({"adler32": "00000001"}, "key 'adler32'"),
    ({"detector": {"id": 3}}, "detector: an object, not a string, number or boolean"),
    ({"frames": [1, 2]}, "frames: an array"),
    ({"gain": None}, "gain: null (leave the key out"),
    ({"gain": float("nan")}, "gain: nan is not a JSON number"),
    ({"big": 1 << 64}, "big: the integer does not fit 64 bits"),
    ({"note": "x" * 1025}, "note: a string of 1025 characters"),
])
def test_what_cannot_be_metadata_is_refused_saying_why(data: Any, says: str) -> None:
    with pytest.raises(ExtractorFailed, match="its output") as ei:
        output.check(data)
    assert says in str(ei.value)


def test_too_many_keys_or_too_much_output_is_refused() -> None:
    with pytest.raises(ExtractorFailed, match="101 keys"):
        output.check({f"k{i}": i for i in range(101)})
    with pytest.raises(ExtractorFailed, match="bytes as JSON"):
        output.check({f"k{i}": "x" * 1000 for i in range(70)})


def test_only_the_first_problems_are_told() -> None:
    with pytest.raises(ExtractorFailed) as ei:
        output.check({"A": 1, "B": 2, "C": 3, "D": 4, "E": 5})
    assert "(and 2 more)" in str(ei.value)


# ---------------------------------------------------------------- a command

def test_a_command_gets_the_path_as_last_argument_and_its_json_is_returned(tmp_path: Path, data_file: str) -> None:
    argv = script(tmp_path, "print(json.dumps({'path': sys.argv[-1], 'flag': sys.argv[1], 'cwd': os.getcwd()}))")
    got = command.run([*argv, "--json"], data_file, 10)     # the rule's own arguments come before the path
    assert got["path"] == data_file and got["cwd"] == "/"
    assert got["flag"] == "--json"


def test_a_command_sees_a_minimal_environment_and_what_the_rule_adds(tmp_path: Path, data_file: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_LAKE__RUCIO__AUTH__PASSWORD", "secret")
    argv = script(tmp_path, "print(json.dumps(dict(os.environ)))")
    env = command.run(argv, data_file, 10, {"DAQ_DB": "/srv/daq.db"})
    env.pop("LC_CTYPE", None)       # the interpreter may set it for itself
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "DAQ_DB": "/srv/daq.db"}


def test_a_non_zero_exit_fails_with_the_end_of_stderr(tmp_path: Path, data_file: str) -> None:
    argv = script(tmp_path, "print('reading', file=sys.stderr)\nprint('no frame header in', sys.argv[1],"
                            " file=sys.stderr)\nsys.exit(3)")
    with pytest.raises(ExtractorFailed) as ei:
        command.run(argv, data_file, 10)
    assert str(ei.value) == f"exit status 3; stderr: reading | no frame header in {data_file}"


def test_a_long_stderr_is_cut_to_its_end(tmp_path: Path, data_file: str) -> None:
    argv = script(tmp_path, "sys.stderr.write('noise ' * 20000 + 'the real reason')\nsys.exit(1)")
    with pytest.raises(ExtractorFailed) as ei:
        command.run(argv, data_file, 10)
    reason = str(ei.value)
    assert reason.endswith("the real reason") and "stderr: ..." in reason
    assert len(reason) < command.REASON_CHARS + 100


def test_a_program_killed_by_a_signal(tmp_path: Path, data_file: str) -> None:
    argv = script(tmp_path, "import signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(ExtractorFailed, match="killed by signal 11"):
        command.run(argv, data_file, 10)


def test_a_timeout_kills_the_program_and_everything_it_started(tmp_path: Path, data_file: str) -> None:
    pidfile = tmp_path / "child.pid"
    # a shell that started a child of its own, both holding stdout: the whole session goes
    argv = ["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; echo started >&2; sleep 60", "sh"]
    t0 = time.monotonic()
    with pytest.raises(ExtractorFailed) as ei:
        command.run(argv, data_file, 1.0)
    assert time.monotonic() - t0 < 5
    assert str(ei.value) == "timed out after 1 s (killed); stderr: started"
    child = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # reaped by init only once it is gone; a zombie still answers kill(0)
        if Path(f"/proc/{child}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the extractor's child outlived the timeout")


def test_a_program_that_closes_its_output_but_goes_on_running_times_out(tmp_path: Path, data_file: str) -> None:
    argv = script(tmp_path, "print('{}')\nsys.stdout.close()\nos.close(1)\nos.close(2)\ntime.sleep(60)")
    with pytest.raises(ExtractorFailed, match="timed out after 0.5 s"):
        command.run(argv, data_file, 0.5)


@pytest.mark.parametrize("body, says", [
    ("print('run=42')", "its stdout is not JSON"),
    ("print('')", "its stdout is not JSON"),
    ("print('{\"gain\": NaN}')", "NaN is not JSON"),
])
def test_output_that_is_not_json_fails(tmp_path: Path, data_file: str, body: str, says: str) -> None:
    with pytest.raises(ExtractorFailed, match=says):
        command.run(script(tmp_path, body), data_file, 10)


def test_too_much_on_stdout_is_cut_off(tmp_path: Path, data_file: str) -> None:
    argv = script(tmp_path, "while True:\n    sys.stdout.write('x' * 65536)\n")
    with pytest.raises(ExtractorFailed, match=f"more than {output.MAX_OUTPUT_BYTES} bytes on stdout"):
        command.run(argv, data_file, 10)


def test_a_program_that_cannot_be_started(tmp_path: Path, data_file: str) -> None:
    p = tmp_path / "not-executable"
    p.write_text("#!/bin/sh\n")
    with pytest.raises(ExtractorFailed, match="could not be started: Permission denied"):
        command.run([str(p)], data_file, 10)


def test_a_shutdown_stops_the_program_at_once(tmp_path: Path, data_file: str) -> None:
    t0 = time.monotonic()
    calls = iter([False, False, True])
    with pytest.raises(ShuttingDown):
        command.run(["/bin/sh", "-c", "sleep 60", "sh"], data_file, 30, stopping=lambda: next(calls, True))
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------- plug-ins

def test_the_examples_follow_the_protocol(data_file: str) -> None:
    c = LineCount.stream(data_file, 29)
    c.update(b"a\nb")
    c.reset()
    for chunk in (b"header line\nfr", memoryview(b"ame 1\nframe 2\n")):
        c.update(chunk)
    assert c.result() == {"lines": 3, "bytes_counted": 28}
    assert FirstLine.extract(data_file) == {"first_line": "header line"}


def test_a_plug_in_is_found_by_its_entry_point(plugins: None) -> None:
    p = resolve("linecount")
    assert p.takes_the_stream and p.extract is None
    p = resolve("firstline")
    assert not p.takes_the_stream and p.extract is not None


@pytest.mark.parametrize("name, says", [
    ("nope", "no plug-in 'nope' in the entry point group 'edge_agent.extractors' (installed: broken, "),
    ("unloadable", ("plug-in 'unloadable' (edge_test_extractors_missing:Nothing) cannot be loaded: "
                    "ModuleNotFoundError")),
    ("shapeless", "has neither stream(path, size) nor extract(path)"),
])
def test_a_plug_in_that_cannot_be_used_is_refused_saying_why(plugins: None, name: str, says: str) -> None:
    with pytest.raises(ValueError) as ei:
        resolve(name)
    assert says in str(ei.value)


# ---------------------------------------------------------------- settings

def settings(tmp_path: Path, settings_data: Callable[..., dict[str, Any]], extractor: dict[str, Any]) -> Settings:
    return Settings(**settings_data(tmp_path, rule={"extractor": extractor}))


def refusal(tmp_path: Path, extractor: str) -> str:
    """What load_settings says of a config whose rule r has this [rules.r.extractor] table."""
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[destinations.a]\npath = "{tmp_path}/a"\n'
                   f'[rules.r]\ndirectory = "{tmp_path}/daq"\nscope = "test"\ncopies = 1\ndestinations = ["a"]\n'
                   f"[rules.r.extractor]\n{extractor}")
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg)
    return str(ei.value)


def test_no_extractor_by_default(tmp_path: Path, settings_data: Callable[..., dict[str, Any]]) -> None:
    assert Settings(**settings_data(tmp_path)).rules["r"].extractor is None


def test_a_command_extractor(tmp_path: Path, settings_data: Callable[..., dict[str, Any]]) -> None:
    ex = settings(tmp_path, settings_data, {"command": ["sh", "-c", "echo {}"], "timeout_seconds": 5,
                                            "env": {"DAQ_DB": "/srv/db"}}).rules["r"].extractor
    assert ex is not None
    # a bare name is found in the extractor's own PATH when the settings are read
    assert ex.command == ["/usr/bin/sh", "-c", "echo {}"] or ex.command == ["/bin/sh", "-c", "echo {}"]
    assert (ex.timeout_seconds, ex.on_failure, ex.plugin) == (5, "quarantine", None)


def test_an_entry_point_extractor_is_loaded_with_the_settings(tmp_path: Path, plugins: None,
                                                              settings_data: Callable[..., dict[str, Any]]) -> None:
    ex = settings(tmp_path, settings_data, {"entry_point": "linecount", "on_failure": "skip"}).rules["r"].extractor
    assert ex is not None and ex.plugin.stream.__self__ is LineCount and ex.on_failure == "skip"


def test_an_unknown_entry_point_refuses_to_start_naming_the_key(tmp_path: Path, plugins: None) -> None:
    said = refusal(tmp_path, 'entry_point = "linecuont"\n')
    assert "rules.r.extractor.entry_point = 'linecuont': no plug-in 'linecuont' in the entry point group " \
           "'edge_agent.extractors' (installed: broken, broken-extract, firstline, linecount" in said


@pytest.mark.parametrize("table, says", [
    ('on_failure = "skip"\n', "rules.r.extractor = {'on_failure': 'skip'}: give command or entry_point (one of them)"),
    ('command = ["/bin/true"]\nentry_point = "linecount"\n', "give command or entry_point (one of them)"),
    ('entry_point = "linecount"\ntimeout_seconds = 5\n',
     "timeout_seconds: only for a command (a plug-in runs inside the agent"),
    ('command = []\n', "rules.r.extractor.command = []: a program and its arguments"),
    ('command = ["no-such-extractor"]\n', "'no-such-extractor' is not in /usr/local/bin:/usr/bin:/bin"),
    ('command = ["./extract.sh"]\n', "rules.r.extractor.command = ['./extract.sh']: give the program's absolute path"),
    ('command = ["{tmp}/notes.txt"]\n', "/notes.txt is not an executable file"),
    ('command = ["/bin/true"]\nenv = { "DAQ DB" = "x" }\n', "'DAQ DB' is not an environment variable name"),
    ('command = ["/bin/true"]\ntimeout_seconds = 0\n', "rules.r.extractor.timeout_seconds = 0"),
    ('command = ["/bin/true"]\non_failure = "ignore"\n', "rules.r.extractor.on_failure = 'ignore'"),
    ('command = "/bin/true --json"\n', "rules.r.extractor.command = '/bin/true --json'"),
    ('entry_point = "unloadable"\n', "cannot be loaded: ModuleNotFoundError"),
])
def test_a_bad_extractor_table_is_refused_naming_the_key(tmp_path: Path, plugins: None, table: str, says: str) -> None:
    (tmp_path / "notes.txt").write_text("not a program\n")
    assert says in refusal(tmp_path, table.replace("{tmp}", str(tmp_path)))


def test_the_extractor_table_can_come_from_the_environment(tmp_path: Path, settings_data: Callable[..., dict[str, Any]],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_RULES__R__EXTRACTOR__COMMAND", json.dumps(["/bin/true", "--json"]))
    ex = Settings(**settings_data(tmp_path)).rules["r"].extractor
    assert ex is not None and ex.command == ["/bin/true", "--json"]


def test_an_executable_script_is_run_directly(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_text("#!/bin/sh\necho '{\"size\": '$(wc -c < \"$1\")'}'\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    assert command.run([str(p)], str(p), 5) == {"size": len(p.read_bytes())}
