"""``terrafm predict`` into an embeddings store: provenance recorded, another source refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from terrafm_lightning.cli import run_cli
from terrafm_lightning.ssl.prediction import weights_sha256
from terrafm_lightning.store.format import open_store
from tests.generators.configs import one_line_error, tiny_config
from tests.generators.stores import make_synthetic_store


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stores")
    return make_synthetic_store(root / "a.zarr", 8, 32), make_synthetic_store(
        root / "b.zarr", 8, 32, seed=1
    )


def writer(output: Path, **options: object) -> dict:
    return {"class_path": "EmbeddingWriter", "init_args": {"output": str(output), **options}}


def test_predict_records_provenance_and_refuses_another_checkpoint_or_store(
    stores: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a, b = stores
    output = tmp_path / "emb.zarr"
    config = str(tiny_config(a, tmp_path / "run", callbacks=[writer(output, chunk=4)]))
    cli = run_cli(["predict", "--config", config])
    attrs = zarr.open_group(str(output), mode="r").attrs.asdict()
    digest = weights_sha256(cli.model)
    assert attrs["checkpoint"] == "" and attrs["checkpoint_sha256"] == digest
    assert attrs["source"] == str(a)
    assert attrs["source_digest"] == open_store(str(a)).attrs["source_digest"]
    cls = zarr.open_group(str(output), mode="r")["cls"][:]
    assert np.isfinite(cls).all()
    # Other weights (another seed's initialisation) into the same output: refused, both named.
    line = one_line_error(["predict", "--config", config, "--seed_everything", "1"], capsys)
    assert (
        f"{output} holds embeddings of weights without a checkpoint file (sha256 {digest[:12]})"
        in line
    )
    assert f"of store {a} (source_digest {attrs['source_digest'][:12]})" in line
    assert "--trainer.callbacks.overwrite=true" in line
    other = line.split("this run uses weights without a checkpoint file (sha256 ")[1][:12]
    assert other != digest[:12]
    # Another source store: refused, naming it.
    line = one_line_error(["predict", "--config", config, "--data.init_args.path", str(b)], capsys)
    assert (
        f"this run uses weights without a checkpoint file (sha256 {digest[:12]}) of store {b}"
        in line
    )
    np.testing.assert_array_equal(zarr.open_group(str(output), mode="r")["cls"][:], cls)
    # The explicit writer option replaces the output.
    replace = tiny_config(a, tmp_path / "run2", callbacks=[writer(output, chunk=4, overwrite=True)])
    cli = run_cli(["predict", "--config", str(replace), "--seed_everything", "1"])
    attrs = zarr.open_group(str(output), mode="r").attrs.asdict()
    assert attrs["checkpoint_sha256"] == weights_sha256(cli.model) != digest
    assert not np.array_equal(zarr.open_group(str(output), mode="r")["cls"][:], cls)


def test_predict_without_a_writer_is_refused_naming_the_flag(
    stores: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = str(tiny_config(stores[0], tmp_path / "run"))
    line = one_line_error(["predict", "--config", config], capsys)
    assert "--trainer.callbacks+=EmbeddingWriter --trainer.callbacks.output=" in line
