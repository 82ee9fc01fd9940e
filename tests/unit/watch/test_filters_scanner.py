"""Which names are a rule's data files (RuleFilter), and what a full walk reports (scanner)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from edge_agent.settings import RuleSettings
from edge_agent.watch import scanner
from edge_agent.watch.filters import RuleFilter, Skip


def rule(**kw: Any) -> RuleSettings:
    return RuleSettings(directory=Path("/daq"), scope="s", destinations=["a"], **kw)


# ================================================================ RuleFilter

class TestRuleFilter:
    def test_plain_data_file_is_a_candidate(self) -> None:
        f = RuleFilter(rule())
        assert f("run42/f1.fits") is None
        assert f("f1") is None

    @pytest.mark.parametrize("name", ["f1.fits.tmp", "f1.part", "run/f1.fits.writing", "f.partial", "f.filepart"])
    def test_default_temp_suffixes(self, name: str) -> None:
        s = RuleFilter(rule())(name)
        assert s is not None and "temporary name" in s.reason and not s.report

    def test_custom_temp_suffixes_replace_the_defaults(self) -> None:
        f = RuleFilter(rule(temp_suffixes=[".inprogress"]))
        assert f("f1.inprogress") is not None
        assert f("f1.tmp") is None

    def test_no_temp_suffixes(self) -> None:
        assert RuleFilter(rule(temp_suffixes=[]))("f1.tmp") is None

    @pytest.mark.parametrize("rel", [".f1.fits", "run42/.f1.fits", ".hidden"])
    def test_hidden_files(self, rel: str) -> None:
        s = RuleFilter(rule())(rel)
        assert s is not None and "hidden" in s.reason

    def test_files_in_hidden_directories_are_judged_by_their_name(self) -> None:
        assert RuleFilter(rule())(".snapshot/f1.fits") is None

    @pytest.mark.parametrize("rel", ["run/.f1.fits.edge-agent-deleting", "f1.fits.edge-agent-part",
                                     ".x.edge-agent-part"])
    def test_agent_temp_files(self, rel: str) -> None:
        s = RuleFilter(rule())(rel)
        assert s == Skip("the agent's own temporary file")

    def test_markers_only_with_the_marker_policy(self) -> None:
        assert RuleFilter(rule(completion=["closed"]))("f1.fits.done") is None
        s = RuleFilter(rule(completion=["closed", "marker"]))("f1.fits.done")
        assert s is not None and "marker/sidecar" in s.reason
        # the sidecar suffix is data unless the sidecar policy is on
        assert RuleFilter(rule(completion=["marker"]))("f1.fits.json") is None

    def test_sidecars_only_with_the_sidecar_policy(self) -> None:
        assert RuleFilter(rule(completion=["stable"]))("f1.fits.json") is None
        s = RuleFilter(rule(completion=["sidecar"]))("f1.fits.json")
        assert s is not None and "marker/sidecar" in s.reason
        assert RuleFilter(rule(completion=["sidecar"]))("f1.fits.done") is None

    def test_custom_companion_suffixes(self) -> None:
        f = RuleFilter(rule(completion=["marker", "sidecar"], marker_suffix=".ok", sidecar_suffix=".meta"))
        assert f("f1.ok") is not None and f("f1.meta") is not None
        assert f("f1.done") is None and f("f1.json") is None

    def test_include_glob_without_slash_matches_the_name(self) -> None:
        f = RuleFilter(rule(include=["*.fits", "*.fits.fz"]))
        assert f("run42/deep/f1.fits") is None
        assert f("f1.fits.fz") is None
        s = f("run42/log.txt")
        assert s is not None and "matches none of include" in s.reason and "*.fits" in s.reason

    def test_include_is_case_sensitive(self) -> None:
        assert RuleFilter(rule(include=["*.fits"]))("F1.FITS") is not None

    def test_include_glob_with_slash_matches_the_relpath(self) -> None:
        f = RuleFilter(rule(include=["raw/*.fits"]))
        assert f("raw/f1.fits") is None
        assert f("f1.fits") is not None
        assert f("cal/f1.fits") is not None
        # fnmatch's '*' crosses '/': deeper paths still match the glob
        assert f("raw/sub/f1.fits") is None

    def test_exclude_glob_without_slash(self) -> None:
        f = RuleFilter(rule(exclude=["*.log", "core"]))
        s = f("run42/daq.log")
        assert s is not None and s.reason == "matches exclude '*.log'"
        assert f("run42/core") is not None
        assert f("run42/core.fits") is None

    def test_exclude_glob_with_slash(self) -> None:
        f = RuleFilter(rule(exclude=["calib/*"]))
        assert f("calib/f1.fits") is not None
        assert f("run42/calib/f1.fits") is None   # anchored at the rule's directory
        assert f("f1.fits") is None

    def test_exclude_wins_over_include(self) -> None:
        f = RuleFilter(rule(include=["*.fits"], exclude=["test_*"]))
        assert f("test_f1.fits") is not None
        assert f("f1.fits") is None

    def test_quiet_skips_are_not_reported(self) -> None:
        f = RuleFilter(rule(include=["*.fits"], completion=["marker"]))
        for rel in ("a.tmp", ".a", "a.done", "a.txt", "a.fits.edge-agent-part"):
            s = f(rel)
            assert s is not None and s.report is False, rel


# ================================================================ scanner
# On the real filesystem: the scanner works on bytes paths, which pyfakefs 6 does not fully support
# (its os.scandir(bytes) raises TypeError and os.readlink(bytes) returns str).

def _tree(tmp: Path) -> bytes:
    """daq/ with nested and empty directories, and a file outside it."""
    daq = tmp / "daq"
    (daq / "run1" / "deep").mkdir(parents=True)
    (daq / "run2").mkdir()
    (daq / "empty").mkdir()
    (daq / "a.fits").write_bytes(b"aaaa")
    (daq / "run1" / "b.fits").write_bytes(b"bb")
    (daq / "run1" / "deep" / "c.fits").write_bytes(b"c")
    (daq / "run2" / ".hidden").write_bytes(b"")
    (tmp / "elsewhere.fits").write_bytes(b"s")
    return os.fsencode(daq)


@pytest.fixture
def tree(tmp_path: Path) -> bytes:
    return _tree(tmp_path)


def by_rel(entries: list[scanner.Entry]) -> dict[str, scanner.Entry]:
    return {e.relpath: e for e in entries}


class TestScannerTree:
    def test_recursive_walk(self, tree: bytes) -> None:
        entries = list(scanner.walk(tree, recursive=True))
        got = by_rel(entries)
        assert len(entries) == len(got)   # each file once
        # the scanner reports everything; filtering names is the RuleFilter's job
        assert set(got) == {"a.fits", "run1/b.fits", "run1/deep/c.fits", "run2/.hidden"}
        a = got["a.fits"]
        assert a.path == tree + b"/a.fits" and a.problem is None and a.st is not None and a.st.st_size == 4
        assert got["run1/deep/c.fits"].st.st_size == 1  # type: ignore[union-attr]
        assert all(isinstance(e.path, bytes) for e in entries)

    def test_non_recursive(self, tree: bytes) -> None:
        assert set(by_rel(list(scanner.walk(tree, recursive=False)))) == {"a.fits"}

    def test_walk_of_a_subtree_is_relative_to_the_root(self, tree: bytes) -> None:
        assert set(by_rel(list(scanner.walk(tree + b"/run1", recursive=True)))) == {"b.fits", "deep/c.fits"}

    def test_missing_root_is_empty(self, tmp_path: Path) -> None:
        assert list(scanner.walk(os.fsencode(tmp_path / "not-there"), recursive=True)) == []

    def test_classify(self, tree: bytes) -> None:
        assert scanner.classify(tree, tree + b"/nope") is None
        assert scanner.classify(tree, tree + b"/run1") is None           # directories are not entries
        e = scanner.classify(tree, tree + b"/run1/b.fits")
        assert e is not None and e.relpath == "run1/b.fits" and e.st is not None and e.problem is None


# ================================================================ scanner where the OS matters

def test_fifo_and_socket_are_reported(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "sock"))
        (tmp_path / "f.fits").write_bytes(b"x")
        got = by_rel(list(scanner.walk(os.fsencode(tmp_path), recursive=True)))
    finally:
        sock.close()
    assert set(got) == {"pipe", "sock", "f.fits"}
    for rel in ("pipe", "sock"):
        assert got[rel].st is None
        assert got[rel].problem == "not a regular file (fifo, socket or device)"
    assert got["f.fits"].problem is None


def test_walking_a_fifo_does_not_block(tmp_path: Path) -> None:
    # opening a fifo for reading would hang the scanner; it must only lstat it
    os.mkfifo(tmp_path / "pipe")
    assert scanner.classify(os.fsencode(tmp_path), os.fsencode(tmp_path / "pipe")) is not None


def test_non_utf8_names(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    os.mkdir(root + b"/run\xff")
    with open(root + b"/run\xff/f\xe9.fits", "wb") as fh:
        fh.write(b"12345")
    os.symlink(b"/target\xfe", root + b"/l\xfe")
    got = by_rel(list(scanner.walk(root, recursive=True)))
    assert set(got) == {"run\\xff/f\\xe9.fits", "l\\xfe"}
    e = got["run\\xff/f\\xe9.fits"]
    assert e.path == root + b"/run\xff/f\xe9.fits"   # the real bytes, usable to open the file
    assert e.st is not None and e.st.st_size == 5
    with open(e.path, "rb") as fh:
        assert fh.read() == b"12345"
    assert got["l\\xfe"].problem == "symlink to /target\\xfe: symlinks are never followed"
    assert scanner.undecodable(b"run\xff/f.fits") and not scanner.undecodable("ü.fits".encode())


def test_symlinks_are_reported_never_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.fits").write_bytes(b"secret")
    daq = tmp_path / "daq"
    daq.mkdir()
    (daq / "a.fits").write_bytes(b"a")
    os.symlink(tmp_path / "elsewhere" / "secret.fits", daq / "link.fits")
    os.symlink("/nowhere/at/all", daq / "dangling")
    got = by_rel(list(scanner.walk(os.fsencode(daq), recursive=True)))
    assert set(got) == {"a.fits", "link.fits", "dangling"}
    assert got["link.fits"].st is None
    assert got["link.fits"].problem == (f"symlink to {tmp_path}/elsewhere/secret.fits: "
                                        "symlinks are never followed")
    assert got["dangling"].problem == "symlink to /nowhere/at/all: symlinks are never followed"
    e = scanner.classify(os.fsencode(daq), os.fsencode(daq / "link.fits"))
    assert e is not None and e.st is None and e.relpath == "link.fits"


def test_real_symlink_into_a_directory_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.fits").write_bytes(b"o")
    (tmp_path / "daq").mkdir()
    (tmp_path / "daq" / "in.fits").write_bytes(b"i")
    os.symlink(tmp_path / "outside", tmp_path / "daq" / "out")
    os.symlink(tmp_path / "daq", tmp_path / "daq" / "loop")   # a loop must not hang the walk
    got = by_rel(list(scanner.walk(os.fsencode(tmp_path / "daq"), recursive=True)))
    assert set(got) == {"in.fits", "out", "loop"}
    assert got["out"].st is None and got["loop"].st is None


def test_relpath_of_cuts_the_root_and_agrees_with_os_path_relpath() -> None:
    import os

    from edge_agent.watch.scanner import relpath_of
    root = b"/buf/daq"
    for p in (b"/buf/daq/f.fits", b"/buf/daq/run1/f.fits", b"/buf/daq/a//b", b"/buf/daq/a/../b",
              b"/buf/daq/./c", b"/buf/daq/.hidden", b"/buf/daq/..x", b"/buf/daq/\xff.fits", b"/other/f"):
        assert relpath_of(root, p) == os.path.relpath(p, root).decode("utf-8", "backslashreplace"), p
    assert relpath_of(b"/buf/daq/", b"/buf/daq/f") == "f"
