"""Reading from a compute platform: the PFN of a replica on an S3 RSE is useless without a
signature, so it is turned into a URL that Rucio signs for reading (valid `lifetime` seconds).

Whether an RSE is S3 is Rucio's to say (RSE attribute sign_url = s3), so replicas on RSEs the
agent never writes to resolve too. Other RSEs' PFNs are returned unchanged.
"""

from __future__ import annotations

from ..urls import unsigned_url
from .rucio_client import RucioClient


class SignedReadResolver:
    """`resolver(rse, pfn) -> url` a plain HTTPS GET can read (the caller still verifies adler32)."""

    def __init__(self, client: RucioClient, lifetime: int = 600) -> None:
        self.client = client
        self.lifetime = lifetime

    def is_s3(self, rse: str) -> bool:
        return str(self.client.rse_attributes(rse).get("sign_url", "")).lower() == "s3"

    def __call__(self, rse: str, pfn: str) -> str:
        if not self.is_s3(rse):
            return pfn
        # list_replicas may already have handed out a signed PFN: sign the bare one afresh
        return self.client.signed_url(rse, "read", unsigned_url(pfn), self.lifetime)
