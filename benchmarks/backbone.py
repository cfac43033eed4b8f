"""Backbone forward+backward speed and peak memory: ours vs a plain reference, in one run.

CPU (default): ``terrafm_base``, batch 8, 224 px, S2-L2A, next to :class:`ReferenceTerraFM`
(explicit softmax attention) with the same weights, in float32 and under bf16 autocast. Timings
alternate between the two so machine load affects both alike; peak memory is the resident-set
growth of one forward+backward, each in its own subprocess.

GPU (``--device cuda``): bf16 autocast images/s and MFU of forward+backward for ours.

    python benchmarks/backbone.py [--batch 8] [--iters 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from terrafm_lightning.models import export_released_weights, terrafm_base
from terrafm_lightning.models.reference import ReferenceTerraFM

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


def peak_memory_mib(which: str, batch: int, bf16: bool) -> float:
    """Peak resident-set growth (MiB) over one forward+backward, in a fresh process."""
    code = (
        "import resource, sys, torch; sys.path.insert(0, 'benchmarks');"
        "from backbone import build, step;"
        f"m = build('{which}'); x = torch.randn({batch}, 12, 224, 224);"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"ctx = torch.autocast('cpu', torch.bfloat16, enabled={bf16});"
        f"ctx.__enter__(); step(m, '{which}', x); ctx.__exit__(None, None, None);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


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
        for w, t in times.items():
            result[f"{w}_{precision}_s"] = statistics.median(t)
            result[f"{w}_{precision}_peak_mib"] = peak_memory_mib(w, batch, precision == "bf16")
        result[f"speedup_{precision}"] = (
            result[f"reference_{precision}_s"] / result[f"ours_{precision}_s"]
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
                f"speedup {result[f'speedup_{p}']:.2f}x (goal >= 1.3x); peak memory ours "
                f"{result[f'ours_{p}_peak_mib']:.0f} MiB, reference "
                f"{result[f'reference_{p}_peak_mib']:.0f} MiB"
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
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
