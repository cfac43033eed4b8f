"""``terrafm plan``'s argument parser: prints the plan of a pretraining config."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from terrafm_lightning.plan.devices import DEVICES
from terrafm_lightning.plan.estimate import make_plan


def main(argv: Sequence[str]) -> None:
    """``terrafm plan``: print the plan of a pretraining config."""
    parser = argparse.ArgumentParser(
        prog="terrafm plan",
        description="Memory per device, FLOPs and throughput of a pretraining config, computed "
        "on fake tensors (nothing is allocated; no GPU needed).",
    )
    parser.add_argument("--config", required=True, help="a terrafm fit config (YAML)")
    parser.add_argument(
        "--devices", type=int, help="devices of the whole run (default: trainer devices x nodes)"
    )
    parser.add_argument(
        "--gpu-memory", type=float, help="GiB per device (default: the --device's memory)"
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
    parser.add_argument("--device", default="h100", help=f"one of {', '.join(DEVICES)}")
    args = parser.parse_args(list(argv))
    plan = make_plan(args.config, args.devices, args.gpu_memory, args.mfu, args.device.lower())
    print(plan.render())
