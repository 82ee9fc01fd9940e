"""docs/notebooks/access.ipynb, executed (nbclient) against the real Rucio + XRootD after the real
agent ingested a few FITS images; then with a corrupted replica, which must stop it loudly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from integration.test_audit_rucio import corrupt_on_storage
from integration.test_rucio_lake import FtsPlayer, rucio_agent, uid
from support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.lake, pytest.mark.rucio_server]
NOTEBOOK = ROOT / "docs" / "notebooks" / "access.ipynb"


def write_fits(directory: Path, name: str, seed: int) -> None:
    """A small image HDU (48 x 64) with a star on a noisy sky; written under a temporary name first."""
    import numpy as np
    from astropy.io import fits
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:48, :64]
    sky = rng.normal(100, 5, (48, 64)) + 2000 * np.exp(-((x - 20 - seed) ** 2 + (y - 24) ** 2) / 8)
    hdu = fits.PrimaryHDU(sky.astype(np.float32))
    hdu.header["OBJECT"] = f"field-{seed}"
    tmp = directory / f"{name}.part"
    hdu.writeto(tmp, checksum=True)
    os.rename(tmp, directory / name)


def run_notebook(workdir: Path):  # type: ignore[no-untyped-def]
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def outputs(nb) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    text, mimes = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            mimes.extend(out.get("data", {}))
            text.append(out.get("data", {}).get("text/plain", ""))
    return "".join(text), mimes


def test_the_notebook_lists_verifies_and_shows_an_image_then_stops_on_a_corrupt_copy(
        agent, lake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient.exceptions import CellExecutionError
    u = uid()
    d = rucio_agent(agent, lake, {"daq": {"copies": 2, "rse_expression": "lake=true",
                                          "name_template": f"{u}.{{filename}}", "dataset_template": f"{u}.night"}})
    d.start()
    names = [f"img{i}.fits" for i in range(3)]
    for i, n in enumerate(names):
        write_fits(d.rule_dir(), n, i)
    fts = FtsPlayer(lake, [f"{u}.{n}" for n in names], lake.lake_rses)
    fts.go.set()
    fts.start()
    d.wait_for(lambda: d.counts().get("deleted") == 3, 120, "3 images confirmed on 2 RSEs and deleted")
    fts.stop.set()
    assert fts.error is None, fts.error
    assert d.stop() == 0
    dataset = f"{lake.scope}:{u}.night"
    monkeypatch.setenv("EDGE_NOTEBOOK_CONFIG", str(d.config))
    monkeypatch.setenv("EDGE_NOTEBOOK_DATASET", dataset)

    nb = run_notebook(tmp_path)
    text, mimes = outputs(nb)
    assert f"listed 3 files in {dataset}" in text, text
    for n in names:
        assert f"ok  {lake.scope}:{u}.{n}" in text
    assert "verified 3 of 3 files" in text
    assert f"{lake.scope}:{u}.img0.fits: image shape (48, 64), OBJECT = 'field-0'" in text
    assert "image/png" in mimes                       # the image was drawn
    assert "rucio call" not in text and "token obtained" not in text   # no agent log chatter in the cells

    # a copy with other bytes: the notebook stops on it, and the audit names it
    corrupt_on_storage(lake, lake.lake_rses[0], f"{u}.img1.fits")
    with pytest.raises(CellExecutionError) as e:
        run_notebook(tmp_path)
    assert "ChecksumMismatch" in str(e.value) and f"{u}.img1.fits" in str(e.value)
    r = d.cli("audit", "--dataset", dataset)
    assert r.returncode == 1 and "CHECKSUM MISMATCH" in r.stdout and f"{u}.img1.fits" in r.stdout, r.stdout
