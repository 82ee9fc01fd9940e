import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def lake():  # type: ignore[no-untyped-def]
    """The real Rucio + XRootD lake on loopback (started once per session)."""
    from lake import start_lake
    yield from start_lake()


@pytest.fixture(scope="session")
def s3_lake(lake):  # type: ignore[no-untyped-def]
    """The lake's S3 RSE: a one-node Ceph radosgw (scripts/lake/s3-start.sh), started when needed."""
    from lake import start_s3
    yield from start_s3(lake)
