"""Copies are counted per physical place (issue 12): destinations that are one place on disk are
refused, by path (symlinks resolved) in the settings and by device and inode at start; the local
lake counts one physical file once whatever destinations reach it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_agent import places
from edge_agent.app import local_transports
from edge_agent.core.policy import Replica
from edge_agent.errors import ConfigError
from edge_agent.lake.base import LakeFile
from edge_agent.lake.local import LocalCatalogue
from edge_agent.settings import DestinationSettings, Settings, load_settings
from edge_agent.steps.verify import replicas


def replicas_of(lake: LocalCatalogue, f: LakeFile) -> list[Replica]:
    """What the confirm step counts: the catalogue's places, each copy read back through its transport."""
    return replicas(lake.recorded(f), f, local_transports(lake.destinations))

def _refused(data: dict[str, Any], *words: str) -> str:
    with pytest.raises(ValueError) as exc:
        Settings(**data)
    msg = str(exc.value)
    for w in words:
        assert w in msg, msg
    return msg


def test_the_same_path_twice_is_refused(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    data = settings_data(tmp_path)
    data["destinations"]["b"]["path"] = str(tmp_path / "lake-a")
    _refused(data, "destinations.b.path", "destinations.a.path", "two copies")


def test_a_trailing_slash_or_dot_is_the_same_path(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    for alias in (str(tmp_path / "lake-a") + "/", str(tmp_path / "lake-a") + "/.",
                  str(tmp_path / "x" / ".." / "lake-a")):
        data = settings_data(tmp_path)
        data["destinations"]["b"]["path"] = alias
        _refused(data, "destinations.b.path", "two copies")


def test_a_symlink_to_another_destination_is_refused(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    (tmp_path / "lake-a").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "lake-a")
    data = settings_data(tmp_path)
    data["destinations"]["b"]["path"] = str(tmp_path / "alias")
    _refused(data, "destinations.b.path", "two copies")


def test_a_destination_inside_another_is_refused(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    data = settings_data(tmp_path)
    data["destinations"]["b"]["path"] = str(tmp_path / "lake-a" / "sub")
    _refused(data, "destinations.b.path", "destinations.a.path")


def test_a_destination_reaching_into_the_watched_tree_through_a_symlink_is_refused(
        tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    (tmp_path / "daq" / "copies").mkdir(parents=True)
    (tmp_path / "innocent").symlink_to(tmp_path / "daq" / "copies")
    data = settings_data(tmp_path)
    data["destinations"]["b"]["path"] = str(tmp_path / "innocent")
    _refused(data, "destinations.b.path", "rules.r.directory", "its own copies")


def test_the_state_dir_inside_a_destination_is_refused(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    data = settings_data(tmp_path, state_dir=str(tmp_path / "lake-b" / "state"))
    _refused(data, "destinations.b.path", "state_dir")
    data = settings_data(tmp_path, state_dir=str(tmp_path / "st"))
    data["destinations"]["b"]["path"] = str(tmp_path / "st" / "lake")
    _refused(data, "destinations.b.path", "state_dir")


def test_two_destinations_naming_one_rse_are_refused(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    data = settings_data(tmp_path, lake={"kind": "rucio", "rucio": {
        "url": "https://rucio.example.org", "account": "daq",
        "auth": {"type": "userpass", "username": "u", "password": "p"}}})
    data["destinations"] = {"a": {"kind": "rse", "rse": "LAKE_DISK"},
                            "b": {"kind": "rse", "rse": "LAKE_DISK", "scheme": "root"}}
    _refused(data, "destinations.b.rse", "destinations.a.rse", "two copies")
    data["destinations"]["b"]["rse"] = "OTHER_DISK"
    Settings(**data)


def test_distinct_places_pass(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    s = Settings(**settings_data(tmp_path))
    assert places.problems(s) == []


def _aliasing(monkeypatch: pytest.MonkeyPatch, alias: Path, target: Path) -> None:
    """Make `alias` the same directory as `target` by device and inode, as a bind mount does."""
    real = places._identity

    def identity(path: str) -> tuple[int, int] | None:
        return real(str(target) + path[len(str(alias)):]) if path.startswith(str(alias)) else real(path)
    monkeypatch.setattr(places, "_identity", identity)


def test_a_bind_mount_of_another_destination_is_refused_at_start(
        tmp_path: Path, settings_data: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    s = Settings(**settings_data(tmp_path))
    _aliasing(monkeypatch, tmp_path / "lake-b", tmp_path / "lake-a")
    [problem] = places.problems(s)
    assert "destinations.b.path" in problem and "destinations.a.path" in problem and "same device" in problem
    with pytest.raises(ConfigError, match="destinations.b.path"):
        places.check(s)


def test_a_bind_mount_of_the_watched_tree_or_state_dir_is_refused_at_start(
        tmp_path: Path, settings_data: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for d in ("daq", "lake-a", "lake-b/state", "mnt/state"):
        (tmp_path / d).mkdir(parents=True)
    s = Settings(**settings_data(tmp_path, state_dir=str(tmp_path / "mnt" / "state")))
    _aliasing(monkeypatch, tmp_path / "lake-b", tmp_path / "daq")           # lake-b shows the buffer
    [problem] = places.problems(s)
    assert "rules.r.directory" in problem and "destinations.b.path" in problem and "same device" in problem
    monkeypatch.undo()
    _aliasing(monkeypatch, tmp_path / "mnt", tmp_path / "lake-b")           # state_dir inside lake-b
    [problem] = places.problems(s)
    assert "state_dir" in problem and "destinations.b.path" in problem and "overlaps" in problem


def _mountinfo(tmp_path: Path, *mounts: tuple[str, str, str]) -> str:
    """A mountinfo file: the root filesystem on 8:1, then (major:minor, root, mount point) each."""
    esc = str.maketrans({" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"})
    lines = ["21 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"]
    lines += [f"{30 + i} 21 {dev} {root.translate(esc)} {point.translate(esc)} rw,relatime - ext4 /dev/x rw"
              for i, (dev, root, point) in enumerate(mounts)]
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_bind_mount_of_a_directory_inside_the_watched_tree_is_refused(
        tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    """Device and inode see only a path's own directories; mountinfo says what a bind mount shows."""
    for d in ("daq/night 1", "lake-a", "lake-b"):
        (tmp_path / d).mkdir(parents=True)
    s = Settings(**settings_data(tmp_path))
    info = _mountinfo(tmp_path, ("8:1", str(tmp_path / "daq" / "night 1"), str(tmp_path / "lake-b")))
    [problem] = places.problems(s, mountinfo=info)
    assert problem.startswith("destinations.b.path") and "rules.r.directory" in problem, problem
    assert str(tmp_path / "daq" / "night 1") in problem and "bind mount" in problem
    # the same directory name on another filesystem is another place
    assert places.problems(s, mountinfo=_mountinfo(
        tmp_path, ("8:2", str(tmp_path / "daq" / "night 1"), str(tmp_path / "lake-b")))) == []
    # a mount stacked on top hides the one below
    assert places.problems(s, mountinfo=_mountinfo(
        tmp_path, ("8:1", str(tmp_path / "daq" / "night 1"), str(tmp_path / "lake-b")),
        ("0:40", "/", str(tmp_path / "lake-b")))) == []


def test_a_bind_mount_of_a_directory_inside_another_destination_or_the_state_dir_is_refused(
        tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    for d in ("daq", "lake-a/inner", "lake-b", "state/sub"):
        (tmp_path / d).mkdir(parents=True)
    s = Settings(**settings_data(tmp_path, state_dir=str(tmp_path / "state")))
    [problem] = places.problems(s, mountinfo=_mountinfo(
        tmp_path, ("8:1", str(tmp_path / "lake-a" / "inner"), str(tmp_path / "lake-b"))))
    assert "destinations.b.path" in problem and "destinations.a.path" in problem, problem
    [problem] = places.problems(s, mountinfo=_mountinfo(
        tmp_path, ("8:1", str(tmp_path / "state" / "sub"), str(tmp_path / "lake-b"))))
    assert problem.startswith("destinations.b.path") and "state_dir" in problem, problem
    # the other way round: the destination's filesystem root mounted, the watched tree inside it
    # (a destination that contains the buffer through another mount of its filesystem)
    [problem] = places.problems(s, mountinfo=_mountinfo(
        tmp_path, ("0:50", "/export", str(tmp_path / "lake-b")),
        ("0:50", "/export/lake/daq", str(tmp_path / "daq"))))
    assert problem.startswith("destinations.b.path") and "rules.r.directory" in problem, problem


def test_without_mountinfo_the_other_checks_still_run(tmp_path: Path, settings_data: Callable[..., Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    s = Settings(**settings_data(tmp_path))
    assert places.problems(s, mountinfo=str(tmp_path / "no-such-file")) == []
    _aliasing(monkeypatch, tmp_path / "lake-b", tmp_path / "lake-a")
    [problem] = places.problems(s, mountinfo=str(tmp_path / "no-such-file"))
    assert "same device" in problem


def test_a_real_bind_mount_of_a_subdirectory_of_the_watched_tree_is_refused(
        tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    """The reviewer's reproduction, in a private mount namespace where one can be made."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True,
                                         check=False).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm)")
    for d in ("daq/sub", "lake-a", "lake-b"):
        (tmp_path / d).mkdir(parents=True)
    data = settings_data(tmp_path)
    code = ("import json, sys; from edge_agent import places; from edge_agent.settings import Settings; "
            "print(json.dumps(places.problems(Settings(**json.loads(sys.argv[1])))))")
    script = (f"mount --bind {tmp_path / 'daq' / 'sub'} {tmp_path / 'lake-b'} && "
              f'exec {sys.executable} -c "$0" "$1"')
    r = subprocess.run([unshare, "-rm", "sh", "-c", script, code, json.dumps(data, default=str)],
                       capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(Path(places.__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    [problem] = json.loads(r.stdout.splitlines()[-1])
    assert problem.startswith("destinations.b.path") and "rules.r.directory" in problem, problem


def test_a_destination_not_mounted_yet_does_not_prevent_the_start(
        tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    (tmp_path / "daq").mkdir()
    (tmp_path / "lake-a").mkdir()
    s = Settings(**settings_data(tmp_path))      # lake-b does not exist
    places.check(s)


def test_check_config_runs_the_start_up_check(tmp_path: Path, settings_data: Callable[..., Any],
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from support import write_toml

    from edge_agent.cli import main
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    cfg = write_toml(tmp_path / "agent.toml", settings_data(tmp_path))
    load_settings(cfg)
    assert main(["check-config", str(cfg)]) == 0
    _aliasing(monkeypatch, tmp_path / "lake-b", tmp_path / "lake-a")
    assert main(["check-config", str(cfg)]) == 2
    assert "destinations.b.path" in capsys.readouterr().err


def test_the_local_lake_counts_one_physical_file_once(tmp_path: Path) -> None:
    """A safety net for an alias that appeared after start (a mount, a symlink swapped in)."""
    (tmp_path / "lake-a").mkdir()
    (tmp_path / "lake-c").mkdir()
    (tmp_path / "lake-b").symlink_to(tmp_path / "lake-a")
    dests = {n: DestinationSettings(path=tmp_path / f"lake-{n}", fsync=False) for n in "abc"}
    lake = LocalCatalogue(tmp_path / "catalog.sqlite", dests, r".*")
    try:
        f = LakeFile(rule="r", scope="test", name="n1/f.fits", dataset=None, size=3, adler32="024d0127",
                     md5=None, blake3="x", copies=2, destinations=("a", "b"), local_path="/daq/f.fits")
        (tmp_path / "lake-a" / "test" / "n1").mkdir(parents=True)
        (tmp_path / "lake-a" / "test" / "n1" / "f.fits").write_bytes(b"abc")
        assert [r.location for r in replicas_of(lake, f)] == ["a"]
        os.link(tmp_path / "lake-a" / "test" / "n1" / "f.fits", tmp_path / "f-hardlink")
        (tmp_path / "lake-c" / "test" / "n1").mkdir(parents=True)
        os.link(tmp_path / "f-hardlink", tmp_path / "lake-c" / "test" / "n1" / "f.fits")
        f2 = dataclasses.replace(f, destinations=("a", "c"))
        assert [r.location for r in replicas_of(lake, f2)] == ["a"]    # a hard link is one file too
        (tmp_path / "lake-c" / "test" / "n1" / "f.fits").unlink()
        (tmp_path / "lake-c" / "test" / "n1" / "f.fits").write_bytes(b"abc")
        assert [r.location for r in replicas_of(lake, f2)] == ["a", "c"]
    finally:
        lake.close()


# ------------------------------------------------------------ place tokens: one filesystem, two devices

def _same_token(tmp_path: Path, how: str) -> None:
    """Make lake-b show lake-a's place token, as two mounts of one filesystem do."""
    assert places.token(tmp_path / "lake-a") is not None
    (tmp_path / "lake-b" / places.PLACE_NAME).unlink(missing_ok=True)
    if how == "link":
        os.link(tmp_path / "lake-a" / places.PLACE_NAME, tmp_path / "lake-b" / places.PLACE_NAME)
    else:
        shutil.copyfile(tmp_path / "lake-a" / places.PLACE_NAME, tmp_path / "lake-b" / places.PLACE_NAME)


@pytest.mark.parametrize("how", ["link", "copy"])
def test_two_destinations_showing_one_place_token_are_refused_at_start(
        tmp_path: Path, settings_data: Callable[..., Any], how: str) -> None:
    for d in ("daq", "lake-a", "lake-b"):
        (tmp_path / d).mkdir()
    s = Settings(**settings_data(tmp_path))
    assert places.problems(s) == []                     # each root now has a token of its own
    first = (tmp_path / "lake-a" / places.PLACE_NAME).read_bytes()
    assert places.problems(s) == [] and (tmp_path / "lake-a" / places.PLACE_NAME).read_bytes() == first
    _same_token(tmp_path, how)
    [problem] = places.problems(s)
    assert "destinations.b.path" in problem and "destinations.a.path" in problem and places.PLACE_NAME in problem
    with pytest.raises(ConfigError, match="destinations.b.path"):
        places.check(s)


def test_the_local_lake_counts_copies_in_one_place_once(tmp_path: Path) -> None:
    for n in "abc":
        (tmp_path / f"lake-{n}" / "test" / "n1").mkdir(parents=True)
        (tmp_path / f"lake-{n}" / "test" / "n1" / "f.fits").write_bytes(b"abc")   # each its own inode
    dests = {n: DestinationSettings(path=tmp_path / f"lake-{n}", fsync=False) for n in "abc"}
    lake = LocalCatalogue(tmp_path / "catalog.sqlite", dests, r".*")
    try:
        f = LakeFile(rule="r", scope="test", name="n1/f.fits", dataset=None, size=3, adler32="024d0127",
                     md5=None, blake3="x", copies=2, destinations=("a", "b"), local_path="/daq/f.fits")
        assert [r.location for r in replicas_of(lake, f)] == ["a", "b"]
        _same_token(tmp_path, "copy")                    # read afresh at each count: seen at once
        assert [r.location for r in replicas_of(lake, f)] == ["a"]
        # a root whose token cannot be read: its copy does not count
        (tmp_path / "lake-c" / places.PLACE_NAME).mkdir()
        f3 = dataclasses.replace(f, destinations=("a", "c"))
        assert [r.location for r in replicas_of(lake, f3)] == ["a"]
    finally:
        lake.close()


def test_an_overlay_and_its_upper_directory_are_one_place(tmp_path: Path, settings_data: Callable[..., Any]) -> None:
    """The reviewer's reproduction: one inode number, two devices; both checks see the one token."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True,
                                         check=False).returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm)")
    for d in ("l", "u/lake", "w", "m", "daq"):
        (tmp_path / d).mkdir(parents=True)
    data = settings_data(tmp_path)
    data["destinations"]["a"]["path"] = str(tmp_path / "m" / "lake")
    data["destinations"]["b"]["path"] = str(tmp_path / "u" / "lake")
    code = ("import json, os, sys; from edge_agent import places; from edge_agent.settings import Settings; "
            "from edge_agent.lake.local import LocalCatalogue; from edge_agent.app import local_transports; from edge_agent.steps.verify import replicas; from edge_agent.lake.base import LakeFile; "
            "s = Settings(**json.loads(sys.argv[1])); p = places.problems(s); "
            "os.makedirs(sys.argv[2] + '/m/lake/test'); open(sys.argv[2] + '/m/lake/test/f', 'wb').write(b'abc'); "
            "lk = LocalCatalogue(s.state_dir / 'c.sqlite', s.destinations, '.*'); "
            "f = LakeFile(rule='r', scope='test', name='f', dataset=None, size=3, adler32='024d0127', md5=None, "
            "blake3='x', copies=2, destinations=('a', 'b'), local_path='/daq/f'); "
            "print(json.dumps([p, [r.location for r in replicas(lk.recorded(f), f, local_transports(s.destinations))]]))")
    script = (f"mount -t overlay overlay -o lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u'},"
              f"workdir={tmp_path / 'w'} {tmp_path / 'm'} || exit 77; "
              f'exec {sys.executable} -c "$0" "$1" "$2"')
    r = subprocess.run([unshare, "-rm", "sh", "-c", script, code, json.dumps(data, default=str), str(tmp_path)],
                       capture_output=True, text=True, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(Path(places.__file__).parents[1])})
    if r.returncode == 77:
        pytest.skip(f"no overlayfs in a private mount namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    problems, counted = json.loads(r.stdout.splitlines()[-1])
    assert len(problems) == 1 and "destinations.b.path" in problems[0] and "destinations.a.path" in problems[0]
    assert counted == ["a"]
