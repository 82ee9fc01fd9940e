"""The embedded local lake: an idempotent catalogue, mount guards, and replicas read back from disk."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import zlib
from pathlib import Path

import blake3
import pytest

from edge_agent.app import local_transports
from edge_agent.core.policy import PATH_NAME_RE, Replica
from edge_agent.errors import PermanentError, RetryableError
from edge_agent.lake.base import LakeFile
from edge_agent.lake.local import LocalCatalogue
from edge_agent.settings import DestinationSettings
from edge_agent.transfer.base import Expected
from edge_agent.steps.verify import replicas

DATA = b"0123456789" * 1000


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data) & 0xFFFFFFFF:08x}"


def lake_file(name: str = "run42/f1.fits", data: bytes = DATA, dataset: str | None = "r.20240310",
              local: str = "/daq/run42/f1.fits") -> LakeFile:
    return LakeFile(rule="r", scope="test", name=name, dataset=dataset, size=len(data), adler32=adler(data),
                    md5=None, blake3="b" * 64, copies=2, destinations=("a", "b"), local_path=local,
                    metadata={"run": 42})


@pytest.fixture
def dests(tmp_path: Path) -> dict[str, DestinationSettings]:
    for n in ("a", "b"):
        (tmp_path / f"lake-{n}").mkdir()
    return {"a": DestinationSettings(path=tmp_path / "lake-a", fsync=False),
            "b": DestinationSettings(path=tmp_path / "lake-b", fsync=False, verify="recorded")}


@pytest.fixture
def lake(tmp_path: Path, dests: dict[str, DestinationSettings]) -> LocalCatalogue:
    lk = LocalCatalogue(tmp_path / "state" / "catalog.sqlite", dests, PATH_NAME_RE)
    yield lk
    lk.close()


def replicas_of(lake: LocalCatalogue, f: LakeFile) -> list[Replica]:
    """What the confirm step counts: the catalogue's places, each copy read back through its transport."""
    return replicas(lake.recorded(f), f, local_transports(lake.destinations))


def catalogue(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "state" / "catalog.sqlite")


def test_register_is_idempotent(lake: LocalCatalogue, tmp_path: Path) -> None:
    f = lake_file()
    lake.register(f)
    lake.register(f)
    db = catalogue(tmp_path)
    assert db.execute("SELECT scope, name, type, bytes, adler32, meta FROM dids ORDER BY type").fetchall() == [
        ("test", "r.20240310", "DATASET", None, None, None),
        ("test", "run42/f1.fits", "FILE", len(DATA), adler(DATA), '{"run": 42}')]
    assert db.execute("SELECT * FROM contents").fetchall() == [("test", "r.20240310", "test", "run42/f1.fits")]


def test_register_without_dataset(lake: LocalCatalogue, tmp_path: Path) -> None:
    lake.register(lake_file(dataset=None))
    assert catalogue(tmp_path).execute("SELECT COUNT(*) FROM dids").fetchone() == (1,)


def test_register_with_other_content_is_permanent(lake: LocalCatalogue, tmp_path: Path) -> None:
    lake.register(lake_file())
    with pytest.raises(PermanentError) as ei:
        lake.register(lake_file(data=DATA + b"x", dataset="r.other"))
    msg = str(ei.value)
    assert "test:run42/f1.fits" in msg and str(len(DATA)) in msg and str(len(DATA) + 1) in msg
    # the failed registration left nothing behind (its dataset was rolled back too)
    assert catalogue(tmp_path).execute("SELECT COUNT(*) FROM dids WHERE name='r.other'").fetchone() == (0,)
    lake.register(lake_file())   # and the lake is still usable


def test_targets_and_urls(lake: LocalCatalogue, tmp_path: Path) -> None:
    ts = lake.targets(lake_file())
    assert [(t.location, t.url) for t in ts] == [
        ("a", str(tmp_path / "lake-a" / "test" / "run42" / "f1.fits")),
        ("b", str(tmp_path / "lake-b" / "test" / "run42" / "f1.fits"))]


def test_replicas_are_read_from_the_copies(lake: LocalCatalogue, tmp_path: Path) -> None:
    f = lake_file()
    assert replicas_of(lake, f) == []
    src = tmp_path / "src.fits"
    src.write_bytes(DATA)
    for t in lake.targets(f):
        local_transports(lake.destinations).for_url(t.url).put(
            str(src), t.url, Expected(len(DATA), blake3.blake3(DATA).hexdigest(), adler(DATA)), lambda n: None)
        lake.add_replica(f, t.location, t.url)
    reps = replicas_of(lake, f)
    assert [(r.location, r.size, r.adler32, r.available) for r in reps] == [
        ("a", len(DATA), adler(DATA), True), ("b", len(DATA), adler(DATA), True)]
    # the catalogue is never trusted: a copy that rots shows up as what it now is
    Path(reps[0].url).write_bytes(b"rotten")
    assert replicas_of(lake, f)[0] == Replica("a", 6, adler(b"rotten"), True, reps[0].url)
    os.unlink(reps[1].url)
    assert [r.location for r in replicas_of(lake, f)] == ["a"]


def test_add_replica_is_idempotent(lake: LocalCatalogue, tmp_path: Path) -> None:
    f = lake_file()
    lake.add_replica(f, "a", "/x")
    lake.add_replica(f, "a", "/y")
    assert catalogue(tmp_path).execute("SELECT location, url FROM replicas").fetchall() == [("a", "/y")]


def test_unmounted_destination(tmp_path: Path, dests: dict[str, DestinationSettings]) -> None:
    os.rmdir(tmp_path / "lake-b")
    lk = LocalCatalogue(tmp_path / "state" / "catalog.sqlite", dests, PATH_NAME_RE)
    try:
        problem = lk.health()
        assert problem is not None and "destination b" in problem and "not a directory" in problem
        with pytest.raises(RetryableError, match="not mounted"):
            lk.targets(lake_file())
        assert not (tmp_path / "lake-b").exists()     # the agent never creates a destination root
    finally:
        lk.close()


def only_a(f: LakeFile) -> LakeFile:
    return dataclasses.replace(f, destinations=("a",), copies=1)


def test_require_file_guards_a_mount_point(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    dests = {"a": DestinationSettings(path=tmp_path / "mnt", require_file=".lake-mounted")}
    lk = LocalCatalogue(tmp_path / "state" / "catalog.sqlite", dests, PATH_NAME_RE)
    try:
        assert ".lake-mounted" in (lk.health() or "")
        with pytest.raises(RetryableError):
            lk.targets(only_a(lake_file()))
        (tmp_path / "mnt" / ".lake-mounted").touch()
        assert lk.health() is None
        assert len(lk.targets(only_a(lake_file()))) == 1
    finally:
        lk.close()


def test_healthy(lake: LocalCatalogue) -> None:
    assert lake.health() is None
