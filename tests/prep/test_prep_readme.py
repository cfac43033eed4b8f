"""The README's data sequence on the real samples, run exactly as written, ends in a valid store."""

import re
import shlex
from pathlib import Path

import numpy as np
import xarray as xr

from terrafm_lightning.prep.cli import main
from terrafm_lightning.store.validate import validate_store
from tests.conftest import shared_path

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "On the real samples in `../shared/data`"


def readme_sequence() -> list[str]:
    """The ``terrafm-data`` lines of the first bash block after :data:`MARKER`."""
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER) :], re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("terrafm-data ")]


def test_readme_data_sequence_on_shared_samples_ends_valid(tmp_path, monkeypatch, capsys):
    shared = shared_path("data").parent
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "shared").symlink_to(shared)
    monkeypatch.chdir(repo)
    sequence = readme_sequence()
    assert [shlex.split(c)[1] for c in sequence] == ["geotiff", "worldcover", "stats", "validate"]
    outputs = []
    for command in sequence:
        assert main(shlex.split(command)[1:]) == 0, command
        outputs.append(capsys.readouterr().out)
    store = str(repo / "data" / "terramind.zarr")
    assert outputs[-1].strip().endswith("valid") and validate_store(store, deep_samples=5) == []
    # No shared map covers the five locations: nothing dropped, all listed, each map counted.
    assert "tiles dropped" not in outputs[1]
    assert "5 tiles with no WorldCover map" in outputs[1]
    assert outputs[1].count("covers 0 tiles") == 3
    ds = xr.open_zarr(store)
    assert ds["written"].values.all() and not ds["dropped"].values.any()
    assert (ds["worldcover_coverage"].values == 0).all() and ds.attrs["class_frequencies"] == {}
    assert set(ds.attrs["stats"]) == {"s1", "s2_l1c", "s2_l2a"}
    assert np.isfinite(ds.attrs["stats"]["s2_l2a"]["mean"]).all()
