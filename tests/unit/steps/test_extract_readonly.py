from __future__ import annotations

"""Review of issue 16 (8): a streaming plug-in got a WRITABLE view of the hashing buffer, fed after the hash and before the
upload: a plug-in that works in place (numpy byteswap(inplace=True), a bytearray decode) changes the bytes
sent as the first copy, not the ones hashed."""
from pathlib import Path
from typing import Any
import pytest
from tests.unit.steps.test_steps import DATA, S, Env, make_env  # noqa: F401
from edge_agent.transfer.mock import MockTransport

MOD = '''
class Mutate:
    @classmethod
    def stream(cls, path, size):
        return cls()
    def update(self, chunk):
        # e.g. numpy.frombuffer(chunk, ">i2").byteswap(inplace=True) in a FITS plug-in
        if isinstance(chunk, memoryview) and not chunk.readonly:
            chunk[0:4] = b"XXXX"
    def reset(self):
        pass
    def result(self):
        return {"ok": 1}
'''

@pytest.fixture(autouse=True)
def plug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    dist = site / "rv_mut-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rv-mut\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[edge_agent.extractors]\nmutate = rv_mut:Mutate\n")
    (site / "rv_mut.py").write_text(MOD)
    monkeypatch.syspath_prepend(str(site))


def test_streaming_plugin_cannot_change_the_bytes_sent(make_env: Any) -> None:
    env: Env = make_env(rule={"extractor": {"entry_point": "mutate"}})
    storage = env.use(MockTransport())
    rec = env.step(env.add().id)
    assert rec.state is S.HASHED
    sent = storage.objects[env.url("a", rec)]
    # the first copy must be the file's bytes, as hashed
    assert sent == DATA, f"first copy differs from the file: starts {sent[:8]!r}, file starts {DATA[:8]!r}"
