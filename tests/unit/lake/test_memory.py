"""The shipped in-memory catalogue keeps the interface's promises: idempotent effects, conflicts
refused, what it records given back as recorded (never asked of storage), copies asked for once."""

from __future__ import annotations

import pytest

from edge_agent.errors import PermanentError, RetryableError
from edge_agent.lake.base import CopiesState, LakeFile, RecordedReplica, Target
from edge_agent.lake.memory import Call, MemoryCatalogue


def lake_file(size: int = 3, adler32: str = "024d0127", name: str = "n1/f.fits") -> LakeFile:
    return LakeFile(rule="r", scope="test", name=name, dataset="ds", size=size, adler32=adler32, md5=None,
                    blake3="b" * 64, copies=2, destinations=("a", "b"), local_path="/daq/f.fits")


def test_register_is_idempotent_and_refuses_other_content() -> None:
    lake = MemoryCatalogue({"a": "/lake-a", "b": "root://xrd//lake-b/"})
    f = lake_file()
    assert lake.name_free("test", "n1/f.fits")
    lake.register(f)
    lake.register(f)
    assert not lake.name_free("test", "n1/f.fits")
    with pytest.raises(PermanentError, match="other content"):
        lake.register(lake_file(size=4))
    assert lake.dids[f.did] == f


def test_targets_say_where_copies_go_and_recorded_what_was_added() -> None:
    lake = MemoryCatalogue({"a": "/lake-a", "b": "root://xrd//lake-b/"})
    f = lake_file()
    assert lake.targets(f) == [Target("a", "/lake-a/test/n1/f.fits"), Target("b", "root://xrd//lake-b/test/n1/f.fits")]
    assert lake.recorded(f) == [] and lake.recorded_locations("test", "n1/f.fits") == set()
    lake.register(f)
    lake.add_replica(f, "b", "root://xrd//lake-b/test/n1/f.fits")
    lake.add_replica(f, "b", "root://xrd//lake-b/test/n1/f.fits")
    assert lake.recorded(f) == [RecordedReplica("b", "root://xrd//lake-b/test/n1/f.fits", 3, "024d0127")]
    assert lake.recorded_locations("test", "n1/f.fits") == {"b"}
    assert MemoryCatalogue({"a": "/x"}, writes_copies=False).targets(f) == []


def test_copies_are_requested_once_and_a_lost_request_is_missing() -> None:
    f = lake_file()
    assert MemoryCatalogue({}).request_copies(f) is None
    lake = MemoryCatalogue({}, rule_state=CopiesState.REPLICATING)
    ref = lake.request_copies(f)
    assert ref is not None and lake.request_copies(f) == ref
    assert lake.copies_state(f, ref) is CopiesState.REPLICATING
    lake.rule_state = CopiesState.OK
    assert lake.copies_state(f, ref) is CopiesState.OK
    del lake.rules[ref]
    assert lake.copies_state(f, ref) is CopiesState.MISSING
    assert lake.copies_state(f, None) is None


def test_release_and_health() -> None:
    lake = MemoryCatalogue({})
    f = lake_file()
    lake.release(f)
    lake.release(f)
    assert lake.released == [f.did]
    assert lake.health() is None
    lake.problem = "down"
    assert lake.health() == "down"


def test_calls_keep_the_effects_asked_in_order_and_queries_are_not_kept() -> None:
    lake = MemoryCatalogue({"a": "/lake-a"}, rule_state=CopiesState.OK)
    f = lake_file()
    lake.name_free("test", "n1/f.fits")
    lake.targets(f)
    lake.register(f)
    lake.add_replica(f, "a", "/lake-a/test/n1/f.fits")
    ref = lake.request_copies(f)
    lake.copies_state(f, ref)
    lake.recorded(f)
    lake.release(f)
    lake.release(f)
    assert lake.calls == [Call("register", f.did), Call("add_replica", f.did, "a"), Call("request_copies", f.did),
                          Call("release", f.did), Call("release", f.did)]
    assert lake.asked("release") == [Call("release", f.did)] * 2 and lake.released == [f.did]


def test_fail_raises_before_the_effect_and_heal_ends_it() -> None:
    lake = MemoryCatalogue({})
    f = lake_file()
    lake.fail("register", times=2)
    for _ in range(2):
        with pytest.raises(RetryableError):
            lake.register(f)
    assert lake.dids == {}                                    # nothing was done
    lake.register(f)
    assert f.did in lake.dids and len(lake.asked("register")) == 3   # failed calls are recorded
    lake.fail("recorded", times=None, error=PermanentError("gone for good"))
    for _ in range(3):
        with pytest.raises(PermanentError, match="gone for good"):
            lake.recorded(f)
    lake.heal()
    assert lake.recorded(f) == []


def test_free_names_false_makes_every_name_unsure() -> None:
    lake = MemoryCatalogue({})
    lake.free_names = False
    assert not lake.name_free("test", "never/seen.fits")


def test_a_destination_without_a_root_is_the_lakes_to_copy() -> None:
    lake = MemoryCatalogue({"a": "/lake-a"})
    assert lake.targets(lake_file()) == [Target("a", "/lake-a/test/n1/f.fits")]


def test_unlisted_copies_are_only_where_they_lie_and_unavailable_ones_are_said_so() -> None:
    f = lake_file()
    local = MemoryCatalogue({"a": "/lake-a"}, listed=False)
    local.register(f)
    local.add_replica(f, "a", "/lake-a/test/n1/f.fits")
    assert local.recorded(f) == [RecordedReplica("a", "/lake-a/test/n1/f.fits", listed=False)]
    lake = MemoryCatalogue({"a": "/lake-a", "b": "/lake-b"})
    lake.register(f)
    lake.add_replica(f, "a", "/lake-a/test/n1/f.fits")
    lake.add_replica(f, "b", "/lake-b/test/n1/f.fits")
    lake.unavailable = {"a"}
    assert lake.recorded(f) == [RecordedReplica("a", "/lake-a/test/n1/f.fits", 3, "024d0127", available=False),
                                RecordedReplica("b", "/lake-b/test/n1/f.fits", 3, "024d0127")]
