"""One catalogue read side (lake/base.py Records) shared by the confirm step, `audit` and the access
API: the local lake's schema is queried only in lake/local.py, and a URL is chosen by scheme in one
place (urls.pick_url / scheme_rank)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import edge_agent
from edge_agent.lake.base import LakeFile, ListedFile, ListedReplica, NoCatalogue, UnknownDid
from edge_agent.lake.local import LocalCatalogue
from edge_agent.lake.memory import MemoryCatalogue
from edge_agent.settings import DestinationSettings
from edge_agent.urls import pick_url, scheme_rank

PACKAGE = Path(edge_agent.__file__).parent
# SQL on the local catalogue's tables: its schema belongs to lake/local.py alone
CATALOGUE_SQL = re.compile(r"\b(FROM|JOIN|INTO|UPDATE)\s+(dids|contents|replicas)\b", re.IGNORECASE)


def catalogue_sql(source: str) -> list[str]:
    """Every string constant in `source` that queries the local catalogue's tables."""
    return [node.value for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and CATALOGUE_SQL.search(node.value)]


@pytest.mark.parametrize("module", ["audit.py", "access.py"])
def test_audit_and_access_hold_no_sql_on_the_catalogue(module: str) -> None:
    assert catalogue_sql((PACKAGE / module).read_text()) == []


def test_the_sql_check_sees_sql_where_there_is_some() -> None:
    src = ('db.execute("SELECT bytes, adler32 FROM dids WHERE scope = ?")\n'
           'q = ("SELECT d.scope FROM contents c JOIN dids d "\n     "ON d.name = c.child_name")\n'
           'doc = "the replicas from the lake"\n')
    assert len(catalogue_sql(src)) == 2
    assert catalogue_sql((PACKAGE / "lake" / "local.py").read_text())     # where the schema lives


def lake_file(name: str, dataset: str | None = "night1", size: int = 10, adler32: str = "0000000a") -> LakeFile:
    return LakeFile(rule="r", scope="s", name=name, dataset=dataset, size=size, adler32=adler32, md5="m" * 32,
                    blake3="b", copies=1, destinations=("a",), local_path=f"/daq/{name}")


def test_the_local_lake_is_read_read_only(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    dests = {"a": DestinationSettings(path=tmp_path / "a")}
    path = tmp_path / "state" / "catalog.sqlite"
    with pytest.raises(NoCatalogue, match="no local lake catalogue"):
        LocalCatalogue.read_only(path, dests)
    assert not path.parent.exists()                      # nothing created by a reader
    writer = LocalCatalogue(path, dests, ".+")
    for name in ("f2", "f1"):
        f = lake_file(name)
        writer.register(f)
        writer.add_replica(f, "a", str(tmp_path / "a" / "s" / name))
    writer.register(lake_file("bare", dataset=None))
    writer.close()
    before = path.read_bytes()
    reader = LocalCatalogue.read_only(path, dests)
    try:
        assert reader.dataset_files("s", "night1") == [ListedFile("s", "f1", 10, "0000000a", "m" * 32),
                                                        ListedFile("s", "f2", 10, "0000000a", "m" * 32)]
        assert reader.dataset_files("s", "nothing") == []
        found = reader.lookup([("s", "f1"), ("s", "bare"), ("s", "night1"), ("s", "nope")])
        assert found == {
            ("s", "f1"): ListedFile("s", "f1", 10, "0000000a", "m" * 32,
                                    (ListedReplica("a", "AVAILABLE", (str(tmp_path / "a" / "s" / "f1"),)),)),
            ("s", "bare"): ListedFile("s", "bare", 10, "0000000a", "m" * 32)}   # a dataset is no file
        assert reader.lookup([("s", "f1")], schemes=["https"])[("s", "f1")].replicas == (
            ListedReplica("a", "AVAILABLE", ()),)
    finally:
        reader.close()
    assert path.read_bytes() == before                   # the catalogue is never written


def test_the_memory_catalogue_reads_as_the_real_ones() -> None:
    cat = MemoryCatalogue({"a": "root://xrd//lake-a"})
    f = lake_file("f1")
    cat.register(f)
    cat.register(lake_file("f0"))
    cat.register(dataclasses_replace(lake_file("f9", dataset="night2"), container="run"))
    cat.add_replica(f, "a", "root://xrd//lake-a/s/f1")
    cat.list_replica("s:f1", "b", "https://b/s/f1", "root://b//s/f1", state="COPYING")
    assert [x.name for x in cat.dataset_files("s", "night1")] == ["f0", "f1"]
    assert [x.name for x in cat.dataset_files("s", "run")] == ["f9"]       # a container: its datasets' files
    with pytest.raises(UnknownDid):
        cat.dataset_files("s", "nothing")
    found = cat.lookup([("s", "f1"), ("s", "nope")], schemes=["https", "root"])
    assert found == {("s", "f1"): ListedFile("s", "f1", 10, "0000000a", "m" * 32, (
        ListedReplica("a", "AVAILABLE", ("root://xrd//lake-a/s/f1",)),
        ListedReplica("b", "COPYING", ("https://b/s/f1", "root://b//s/f1"))))}
    assert cat.lookup([("s", "f1")], schemes=["https"])[("s", "f1")].replicas[0].urls == ()
    assert cat.looked_up == [("s", "f1"), ("s", "nope"), ("s", "f1")]
    assert [(r.location, r.available) for r in cat.recorded(f)] == [("a", True), ("b", False)]


def dataclasses_replace(f: LakeFile, **changes: object) -> LakeFile:
    import dataclasses
    return dataclasses.replace(f, **changes)  # type: ignore[arg-type]


def test_a_url_is_chosen_by_scheme_in_one_place() -> None:
    pfns = ["root://x//f", "davs://x/f", "https://x/f"]
    assert pick_url(pfns, ["https", "davs"]) == "https://x/f"
    assert pick_url(pfns, ["davs", "https"]) == "davs://x/f"
    assert pick_url(pfns, ["gsiftp"]) == "root://x//f"           # none in the schemes: the first listed
    assert pick_url([], ["https"]) == ""
    assert scheme_rank("/data/f", ["https", "file"]) == 1         # a bare path is a file
    assert scheme_rank("s3://b/k", ["https", "file"]) == 2


def test_the_audit_reads_the_local_lake_through_its_catalogue_and_the_transports(tmp_path: Path) -> None:
    from edge_agent.audit import build
    from edge_agent.settings import load_settings
    (tmp_path / "buf").mkdir()
    (tmp_path / "l1").mkdir()
    s = load_settings(None, state_dir=tmp_path / "state", destinations={"l1": {"path": str(tmp_path / "l1")}},
                      rules={"daq": {"directory": str(tmp_path / "buf"), "scope": "s", "destinations": ["l1"], "copies": 1}})
    with pytest.raises(NoCatalogue):
        build(s)
    writer = LocalCatalogue(s.lake_catalog_path, s.destinations, ".+")
    f = lake_file("f1")
    writer.register(f)
    writer.add_replica(f, "l1", str(tmp_path / "l1" / "s" / "f1"))
    writer.close()
    (tmp_path / "l1" / "s").mkdir()
    (tmp_path / "l1" / "s" / "f1").write_bytes(b"0123456789")
    (tmp_path / "elsewhere").write_bytes(b"01234")
    lake = build(s)
    try:
        assert lake.schemes == ()
        assert [x.name for x in lake.records.dataset_files("s", "night1")] == ["f1"]
        assert lake.probe("l1", str(tmp_path / "l1" / "s" / "f1"), False).size == 10    # type: ignore[union-attr]
        # a copy recorded outside every destination named today is still asked
        assert lake.probe("old", str(tmp_path / "elsewhere"), True).size == 5           # type: ignore[union-attr]
        assert lake.probe("l1", str(tmp_path / "l1" / "s" / "gone"), False) is None
    finally:
        lake.close()


def test_the_audit_asks_rucio_storage_in_http_first(tmp_path: Path) -> None:
    from edge_agent.audit import build
    from edge_agent.lake.rucio import RucioRecords
    from edge_agent.settings import load_settings
    (tmp_path / "buf").mkdir()
    s = load_settings(None, state_dir=tmp_path / "state",
                      lake={"kind": "rucio", "rucio": {"url": "http://rucio.invalid", "account": "a",
                                                       "schemes": ["root", "davs"],
                                                       "auth": {"type": "userpass", "username": "u", "password": "p"}}},
                      destinations={"l1": {"kind": "rse", "rse": "L1"}},
                      rules={"daq": {"directory": str(tmp_path / "buf"), "scope": "s", "destinations": ["l1"], "copies": 1}})
    lake = build(s)                       # nothing is asked of Rucio until the audit runs
    try:
        assert isinstance(lake.records, RucioRecords)
        assert lake.schemes == ("davs", "http", "https", "root")
    finally:
        lake.close()
