"""Shared fixtures: the real samples in ../shared and small synthetic inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("TERRAFM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REQUIRE_SHARED = os.environ.get("TERRAFM_REQUIRE_SHARED_DATA") == "1"


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips (or fails when CI requires it) if it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"real sample {path} absent (set TERRAFM_SHARED to the shared folder)"
        if REQUIRE_SHARED:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only 32-tile, 64 px synthetic store (all modalities, WorldCover), made once."""
    from tests.helpers import make_synthetic_store

    return make_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic.zarr")
