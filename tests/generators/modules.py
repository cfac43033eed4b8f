"""Small pretraining-module arguments for tests (a depth-2 TerraFM-Ti with a small DINO head)."""

from __future__ import annotations

from typing import Any

TINY_NETWORKS: dict[str, Any] = {
    "backbone": "terrafm_tiny",
    "backbone_kwargs": {"depth": 2},
    "num_prototypes": 128,
    "head_hidden_dim": 64,
    "head_bottleneck_dim": 32,
}
"""``TerraFMPretrainModule`` network arguments of the unit tests: seconds per step on a CPU."""
