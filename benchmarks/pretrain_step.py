"""Pretraining step: host syncs and aten ops per step (torch.profiler), and samples/s.

Each step runs the on-device multi-crop (``MultiCrop``), the student and teacher forwards, the
loss, the centring, the backward, AdamW and the EMA through the Lightning Trainer. Tiles are
random and already on the device (the store loader is measured in ``benchmarks/loader.py``).

Ops per step on CPU, this tree next to another git revision (extracted to a temporary folder and
run in a subprocess with the same arguments), per phase of the step:
    python benchmarks/pretrain_step.py ops --baseline 8a8ca8f
Syncs are ``aten::_local_scalar_dense`` (``.item()``, ``bool()``, ``if tensor``) plus
``aten::nonzero`` (also what boolean-mask indexing runs); boolean ``aten::index`` calls are listed
on their own. On CPU none of them stalls anything, but each one is a device-to-host wait on a GPU.
Scalar reads inside ``_assert_async`` and ``_fused_adamw_`` are listed apart: only their CPU
kernels make them. Outer aten ops are those not called by another aten op.

Samples/s (tiny vs small on CPU; on a GPU paper crops, bf16, eager and compiled):
    python benchmarks/pretrain_step.py speed --models terrafm_tiny terrafm_small
    python benchmarks/pretrain_step.py speed --device cuda --models terrafm_base --paper-crops \
        --batch-size 64 --compile both
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from terrafm_lightning.data.multicrop import MultiCrop
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.ssl.module import TerraFMPretrainModule

PHASES = ("data", "forward", "backward", "optimizer")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
# Scalar reads that only the CPU kernels of these ops make: on a GPU a device-side assertion and
# the fused AdamW kernel (steps kept on the device) read nothing back to the host.
CPU_ONLY_READS = ("aten::_assert_async", "aten::_fused_adamw_")


def raw_batch(batch_size: int, tile: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A CPU-layout batch: whole tiles of every modality (S2 uint16), mixed WorldCover classes."""
    out: dict[str, torch.Tensor] = {
        m: (torch.rand(batch_size, len(BANDS[m]), tile, tile, device=device) * 3000 + 1).to(
            torch.uint16
        )
        for m in MODALITIES
    }
    out["s1"] = torch.rand(batch_size, 2, tile, tile, device=device) * 20 - 25
    out["available"] = torch.ones(batch_size, len(MODALITIES), dtype=torch.bool, device=device)
    classes = torch.tensor([10, 30, 50, 80, 95, 40, 20, 60], device=device)
    out["dominant_class"] = classes.repeat(batch_size // 8 + 1)[:batch_size]
    out["worldcover_hist"] = torch.full((batch_size, 11), 1 / 11, device=device)
    out["index"] = torch.arange(batch_size, device=device)
    return out


class RandomTiles(L.LightningDataModule):
    """The same raw batch every step, multi-cropped on the device like ``TerraFMDataModule``."""

    def __init__(self, batch: dict[str, torch.Tensor], steps: int, multicrop: MultiCrop) -> None:
        super().__init__()
        self.batch, self.steps, self.multicrop = batch, steps, multicrop

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * self.steps, batch_size=None)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> Any:
        return self.multicrop.to(batch["available"].device)(batch)


def build(
    args: argparse.Namespace, name: str, compile_mode: bool | str = False
) -> tuple[TerraFMPretrainModule, MultiCrop]:
    """The pretraining module and the multi-crop of ``args`` (paper crops or the small ones).

    ``compile_mode`` is the module's ``compile`` switch (Lightning compiles in
    ``configure_model``).
    """
    global_size, local_size = (224, 96) if args.paper_crops else (args.global_size, args.local_size)
    multicrop = MultiCrop(
        n_global=2, global_size=global_size, n_local=args.n_local, local_size=local_size
    )
    model = TerraFMPretrainModule(
        name,
        num_prototypes=args.prototypes,
        high_frequency_classes=[10, 30, 80],
        warmup_epochs=0,
        compile=compile_mode,
    )
    return model, multicrop


def tile_size(args: argparse.Namespace) -> int:
    """Tile size in pixels: 534 with paper crops, else ``--tile``."""
    return 534 if args.paper_crops else args.tile


def trainer(device: str, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """A one-epoch Trainer without logging or checkpoints (bf16-mixed on CUDA)."""
    return L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true",
        max_epochs=1,
        gradient_clip_val=3.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


class PhaseProfiler(L.Callback):
    """Profile ``steps`` training steps after ``start`` warm-up steps, one label per phase.

    Phases: ``data`` (transfer and multi-crop), ``forward`` (training step: forwards, loss,
    centring, logging), ``backward``, ``optimizer`` (clipping, AdamW, EMA).
    """

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.prof: profile | None = None
        self._phase: record_function | None = None

    def _enter(self, name: str | None) -> None:
        if self._phase is not None:
            self._phase.__exit__(None, None, None)
            self._phase = None
        if name is not None and self.prof is not None:
            self._phase = record_function(name)
            self._phase.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._enter("forward")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._enter("backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._enter("optimizer")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._enter(None)
        if batch_idx == self.start - 1:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()
        elif batch_idx == self.start + self.steps - 1 and self.prof is not None:
            self.prof.__exit__(None, None, None)
            return
        self._enter("data")


def count_ops(prof: profile, steps: int) -> dict[str, dict[str, float]]:
    """Per phase and in total: aten ops (all and outermost), syncs, boolean index calls.

    Phases are attributed by time: Lightning's ``Optimizer.step`` range wraps the closure, so the
    phase ranges do not nest in the profiler's event tree.
    """
    events = prof.events()
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES]
    counts: dict[str, Counter] = {p: Counter() for p in (*PHASES, "total")}
    for event in events:
        name = event.name
        if not name.startswith("aten::"):
            continue
        start = event.time_range.start
        phase = next((p for s, e, p in ranges if s <= start <= e), None)
        if phase is None:
            continue
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        outer = not any(a.startswith("aten::") for a in ancestors)
        children = {child.name for child in event.cpu_children}
        boolean = name == "aten::index" and "aten::nonzero" in children
        cpu_only = next((a for a in ancestors if a in CPU_ONLY_READS), None)
        for key in (phase, "total"):
            c = counts[key]
            c["aten_ops"] += 1
            c["outer_aten_ops"] += outer
            c["boolean_index"] += boolean
            if name in SYNC_OPS and cpu_only:
                c[f"cpu-only read in {cpu_only}"] += 1
            elif name in SYNC_OPS:
                c["syncs"] += 1
                c[name] += 1
    return {phase: {k: v / steps for k, v in sorted(c.items())} for phase, c in counts.items() if c}


def measure_ops(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Ops per step of ``args.models[0]`` on CPU (eager), counted over ``args.steps`` steps."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, multicrop = build(args, args.models[0])
    profiler = PhaseProfiler(args.warmup, args.steps)
    batch = raw_batch(args.batch_size, tile_size(args))
    fit = trainer("cpu", [profiler])
    fit.fit(model, datamodule=RandomTiles(batch, args.warmup + args.steps, multicrop))
    return count_ops(profiler.prof, args.steps)


def baseline_ops(args: argparse.Namespace, argv: list[str]) -> dict[str, dict[str, float]]:
    """The same ops count against ``src/`` of git revision ``args.baseline``, in a subprocess."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", args.baseline, "src"],
        check=True,
        capture_output=True,
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src")}
        without = [a for i, a in enumerate(argv) if not _is_baseline_arg(argv, i)]
        out = subprocess.run(
            [sys.executable, __file__, *without, "--json"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _is_baseline_arg(argv: list[str], i: int) -> bool:
    return argv[i].startswith("--baseline") or (i > 0 and argv[i - 1] == "--baseline")


def print_ops(new: dict[str, dict[str, float]], old: dict[str, dict[str, float]] | None) -> None:
    """One row per phase and count, this tree next to the baseline with their ratio."""
    header = f"{'phase':<10}{'count':<42}{'this tree':>11}"
    print(header + (f"{'baseline':>11}{'ratio':>8}" if old else ""))
    for phase in (*PHASES, "total"):
        keys = sorted(set(new.get(phase, {})) | set((old or {}).get(phase, {})))
        for key in keys:
            value = new.get(phase, {}).get(key, 0.0)
            row = f"{phase:<10}{key:<42}{value:>11.1f}"
            if old:
                before = old.get(phase, {}).get(key, 0.0)
                ratio = f"{value / before:>8.2f}" if before else f"{'-':>8}"
                row += f"{before:>11.1f}{ratio}"
            print(row)


class StepTimer(L.Callback):
    """Wall time at the end of every training step (after a CUDA synchronise)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def measure_speed(args: argparse.Namespace, name: str, compiled: bool) -> dict[str, float]:
    """Samples/s of ``name`` through the Trainer (and peak memory on CUDA)."""
    model, multicrop = build(args, name, args.compile_mode if compiled else False)
    batch = raw_batch(args.batch_size, tile_size(args))
    timer = StepTimer()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fit = trainer(args.device, [timer])
    fit.fit(model, datamodule=RandomTiles(batch, args.warmup + args.steps, multicrop))
    measured = timer.times[args.warmup - 1 :]
    result = {"samples_per_s": args.batch_size * (len(measured) - 1) / (measured[-1] - measured[0])}
    if args.device == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def parser() -> argparse.ArgumentParser:
    """Arguments shared by both modes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["ops", "speed"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", nargs="+", default=["terrafm_tiny", "terrafm_small"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--paper-crops", action="store_true", help="2x224 + 6x96 from 534 px")
    p.add_argument("--global-size", type=int, default=96)
    p.add_argument("--local-size", type=int, default=48)
    p.add_argument("--n-local", type=int, default=6)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="speed: the module's compile switch; both: eager then compiled, side by side",
    )
    p.add_argument("--compile-mode", default="default", help="speed: torch.compile mode")
    p.add_argument("--baseline", help="ops: git revision to count next to this tree")
    p.add_argument("--json", action="store_true", help="ops: print only the counts as JSON")
    return p


def main() -> None:
    argv = sys.argv[1:]
    args = parser().parse_args(argv)
    if args.mode == "ops":
        new = measure_ops(args)
        if args.json:
            print(json.dumps(new))
            return
        old = baseline_ops(args, argv) if args.baseline else None
        print(f"{args.models[0]}, batch {args.batch_size}, per step over {args.steps} steps (CPU)")
        print_ops(new, old)
        return
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = {}
    for name in args.models:
        for compiled in compile_modes:
            key = f"{name}{' compiled' if compiled else ''}"
            results[key] = measure_speed(args, name, compiled)
            print(key, {k: round(v, 3) for k, v in results[key].items()}, flush=True)
    base = next(iter(results.values()))["samples_per_s"]
    for key, result in results.items():
        rate = result["samples_per_s"]
        print(f"{key}: {rate:.2f} samples/s ({rate / base:.2f}x the first)")


if __name__ == "__main__":
    main()
