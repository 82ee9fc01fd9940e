"""Transports mounted by URL prefix: the longest match wins, a posix root holds only what lies below it,
an endpoint found later (an S3 RSE's, Rucio's to say) is mounted when first needed."""

from __future__ import annotations

import pytest

from edge_agent.errors import PermanentError, RetryableError
from edge_agent.transfer.registry import Transports


class Named:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True




def test_the_longest_prefix_wins() -> None:
    https, s3, root, lake = Named("https"), Named("s3"), Named("root"), Named("lake")
    t = Transports()
    for prefix, tr in (("https://", https), ("https://s3.test:7443/bucket/", s3), ("root://", root),
                       ("/data/lake1", lake)):
        t.mount(prefix, tr)  # type: ignore[arg-type]
    assert t.for_url("https://s3.test:7443/bucket/test/f1") is s3
    assert t.for_url("https://s3.test:7443/other/test/f1") is https
    assert t.for_url("root://xrd:1094//data/f") is root
    assert t.for_url("/data/lake1/test/f1") is lake
    with pytest.raises(PermanentError, match="no transport for /data/lake10/test/f1"):
        t.for_url("/data/lake10/test/f1")       # a sibling directory is not below the root
    with pytest.raises(PermanentError) as exc:
        t.for_url("davs://user:secret@host/x?token=abc")
    assert "secret" not in str(exc.value) and "abc" not in str(exc.value)
    assert {x.name for x in t} == {"https", "s3", "root", "lake"}
    t.close()
    assert all(x.closed for x in (https, s3, root, lake))


def test_a_prefix_must_be_a_scheme_or_a_directory() -> None:
    with pytest.raises(ValueError):
        Transports().mount("data/lake", Named("x"))  # type: ignore[arg-type]


def test_an_endpoint_is_mounted_once_it_can_be_known() -> None:
    https, s3 = Named("https"), Named("s3")
    t = Transports()
    t.mount("https://", https)  # type: ignore[arg-type]
    asked: list[int] = []
    down = [True]

    def find() -> list[str]:
        asked.append(1)
        if down[0]:
            raise RetryableError("rucio unreachable")
        return ["https://s3.test:7443/bucket/"]
    t.mount_later("https://", find, s3)  # type: ignore[arg-type]
    assert s3 in t.transports()
    with pytest.raises(RetryableError):
        t.for_url("https://s3.test:7443/bucket/f")   # never the plain https transport for it meanwhile
    down[0] = False
    assert t.for_url("https://s3.test:7443/bucket/f") is s3
    assert t.for_url("https://other/f") is https
    assert len(asked) == 2                           # found once, then kept
