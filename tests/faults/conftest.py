from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults.fault_proxy import FaultProxy, running
from tests.integration.conftest import agent, daemons  # noqa: F401 - the same fixtures


@pytest.fixture(scope="module")
def xrootd_proxy(lake: Any) -> Iterator[FaultProxy]:
    """A fault proxy in front of the lake's XRootD HTTP port, for a whole module (an RSE names its port)."""
    with running(lake.http_url) as p:
        yield p


@pytest.fixture
def storage_proxy(xrootd_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The module's XRootD proxy; the test's faults are gone after it."""
    yield xrootd_proxy
    xrootd_proxy.clear()


@pytest.fixture
def rucio_proxy(lake: Any) -> Iterator[FaultProxy]:
    """A fault proxy in front of the lake's Rucio server, for one test."""
    with running(lake.url) as p:
        yield p
