"""Backbone forward+backward speed and peak memory: ours vs a plain reference, in one run.

CPU (default): ``terrafm_base``, batch 8, 224 px, S2-L2A, next to :class:`ReferenceTerraFM`
(explicit softmax attention) with the same weights, in float32 and under bf16 autocast. Timings
alternate between the two so machine load affects both alike; memory is what autograd keeps
for backward (the part of the peak that differs between the two; weights and gradients are
equal).

GPU (``--device cuda``): bf16 autocast images/s and MFU of forward+backward for ours.

    python benchmarks/backbone.py [--batch 8] [--iters 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from terrafm_lightning.models import export_released_weights, terrafm_base

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test-only reference network
from tests.models.reference import ReferenceTerraFM  # noqa: E402

# Forward GFLOPs of TerraFM-B on one 224 px image (terrafm.md section 8); backward ~ 2x forward.
FWD_GFLOPS_224 = 42.5


def build(which: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ours = terrafm_base()
    if which == "ours":
        return ours
    reference = ReferenceTerraFM()
    reference.load_state_dict(export_released_weights(ours))
    return reference


def step(model: torch.nn.Module, which: str, x: torch.Tensor) -> None:
    out = model({"s2_l2a": x}) if which == "ours" else model(x, "s2_l2a")
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)


def saved_activations_mib(model: torch.nn.Module, which: str, x: torch.Tensor) -> float:
    """Memory of the tensors autograd keeps for backward (MiB, unique storages, no weights).

    Exact and deterministic, unlike the process's resident set, which depends on the allocator.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model({"s2_l2a": x}) if which == "ours" else model(x, "s2_l2a")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights) / 2**20


def cpu_benchmark(batch: int, iters: int) -> dict[str, float]:
    """Median step time and peak memory of each variant, fp32 and bf16 autocast."""
    models = {w: build(w) for w in ("ours", "reference")}
    x = torch.randn(batch, 12, 224, 224)
    result: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        times: dict[str, list[float]] = {w: [] for w in models}
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            for w, m in models.items():
                step(m, w, x)  # warm-up
            for _ in range(iters):
                for w, m in models.items():
                    start = time.perf_counter()
                    step(m, w, x)
                    times[w].append(time.perf_counter() - start)
            for w, m in models.items():
                result[f"{w}_{precision}_saved_mib"] = saved_activations_mib(m, w, x)
        for w, t in times.items():
            result[f"{w}_{precision}_s"] = statistics.median(t)
        result[f"speedup_{precision}"] = (
            result[f"reference_{precision}_s"] / result[f"ours_{precision}_s"]
        )
    result["speedup_ours_bf16_vs_reference_fp32"] = (
        result["reference_fp32_s"] / result["ours_bf16_s"]
    )
    return result


def gpu_benchmark(batch: int, iters: int) -> dict[str, float]:
    model = terrafm_base().cuda()
    x = torch.randn(batch, 12, 224, 224, device="cuda")
    for _ in range(3):
        with torch.autocast("cuda", torch.bfloat16):
            step(model, "ours", x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        with torch.autocast("cuda", torch.bfloat16):
            step(model, "ours", x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    flops = 3 * FWD_GFLOPS_224 * 1e9 * batch
    peak = 989e12 if "H100" in torch.cuda.get_device_name() else 790e12  # dense bf16
    return {
        "images_per_s": batch / seconds,
        "mfu": flops / seconds / peak,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if args.device == "cpu":
        result = cpu_benchmark(args.batch, args.iters)
        for p in ("fp32", "bf16"):
            print(
                f"{p}: forward+backward terrafm_base b={args.batch} 224px S2-L2A CPU: ours "
                f"{result[f'ours_{p}_s']:.2f} s, reference {result[f'reference_{p}_s']:.2f} s, "
                f"speedup {result[f'speedup_{p}']:.2f}x (goal >= 1.3x); activations kept for "
                f"backward ours {result[f'ours_{p}_saved_mib']:.0f} MiB, reference "
                f"{result[f'reference_{p}_saved_mib']:.0f} MiB"
            )
        print(
            "ours under bf16 autocast vs the fp32 reference: "
            f"{result['speedup_ours_bf16_vs_reference_fp32']:.2f}x"
        )
    else:
        result = gpu_benchmark(args.batch, args.iters)
        machine["gpu"] = torch.cuda.get_device_name()
        print(
            f"bf16 forward+backward terrafm_base b={args.batch}: "
            f"{result['images_per_s']:.0f} images/s, MFU {result['mfu']:.1%}, "
            f"peak {result['peak_gib']:.1f} GiB"
        )
    print(json.dumps({"machine": machine, **result}))


if __name__ == "__main__":
    main()
