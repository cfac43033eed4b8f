"""One-shot GPU check: every figure issue 11 asks of a GPU, in one run of at most 9 minutes.

Each section runs in its own subprocess with a time limit and its result is written to the JSON
file as soon as it ends, so a section that fails or overruns (or a killed run) leaves the others
(``--dry-run`` runs them in one process):

- ``environment``: versions, device, memory, CPU cores.
- ``h2d``: pinned host-to-device copy GB/s.
- ``step_eager`` / ``step_compiled``: TerraFM-B pretraining step (Lightning, bf16-mixed, paper
  crops 2 x 224 + 6 x 96 from 534 px tiles already on the device, subset draws, dual centring)
  in samples/s at 16 / 32 / 64 per GPU, timed with CUDA events after warm-up; MFU from
  ``FlopCounterMode`` on the same step against the dense bf16 peak (989 TFLOP/s on H100/H200).
- ``syncs``: host syncs per step under ``torch.cuda.set_sync_debug_mode("warn")``.
- ``loader``: the same step fed by ``TerraFMDataModule`` with N workers from a 534 px synthetic
  store written on the machine.
- ``decode``: GPU vs CPU chunk decode, through the reader's decode backends when this tree has
  them (else skipped, saying so).

``--dry-run`` runs every section with tiny sizes on CPU (CI runs it); it measures nothing.

    python benchmarks/gpu_check.py --out gpu_check.json [--budget-s 540]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from pretrain_step import RandomTiles, raw_batch, trainer
from torch.utils.flop_counter import FlopCounterMode

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.data.multicrop import MultiCrop
from terrafm_lightning.ssl.module import TerraFMPretrainModule

SECTIONS = ("environment", "h2d", "step_eager", "syncs", "step_compiled", "loader", "decode")
# Upper bound of each section's share of the run, in seconds (GPU run).
LIMITS = {
    "environment": 20,
    "h2d": 20,
    "step_eager": 90,
    "syncs": 40,
    "step_compiled": 200,
    "loader": 150,
    "decode": 20,
}
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def sizes(dry_run: bool) -> dict[str, Any]:
    """Model and crop sizes: TerraFM-B with paper crops, or tiny ones for ``--dry-run``."""
    if dry_run:
        return {
            "backbone": "terrafm_tiny",
            "backbone_kwargs": {"depth": 1},
            "prototypes": 256,
            "batches": [2],
            "tile": 64,
            "global": 32,
            "local": 16,
            "n_local": 2,
            "warmup": 1,
            "steps": 2,
            "workers": [1],
            "store_samples": 8,
            "scheduler": "sync",
        }
    return {
        "backbone": "terrafm_base",
        "backbone_kwargs": {},
        "prototypes": 65536,
        "batches": [16, 32, 64],
        "tile": 534,
        "global": 224,
        "local": 96,
        "n_local": 6,
        "warmup": 3,
        "steps": 10,
        "workers": [8, 14],
        "store_samples": 128,
        "scheduler": "local",
    }


def device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(cfg: dict[str, Any], compiled: bool = False) -> tuple[TerraFMPretrainModule, MultiCrop]:
    """The pretraining module (dual centring) and the multi-crop of ``cfg``.

    ``compiled``: the module's ``compile`` switch (inductor, compiled in ``configure_model``).
    """
    torch.manual_seed(0)
    model = TerraFMPretrainModule(
        cfg["backbone"],
        cfg["backbone_kwargs"],
        num_prototypes=cfg["prototypes"],
        high_frequency_classes=[10, 30, 80],
        warmup_epochs=0,
        compile=compiled,
    )
    multicrop = MultiCrop(
        n_global=2, global_size=cfg["global"], n_local=cfg["n_local"], local_size=cfg["local"]
    )
    return model, multicrop


class StepClock(L.Callback):
    """Marks the end of every training step: CUDA events on a GPU, wall time on CPU."""

    def __init__(self) -> None:
        self.marks: list[Any] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> float:
        """Mean step time over the steps after ``warmup``."""
        first, last = self.marks[warmup - 1], self.marks[-1]
        n = len(self.marks) - warmup
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            return first.elapsed_time(last) / 1000 / n
        return (last - first) / n


def step_flops(model: TerraFMPretrainModule, crops: dict[str, Any]) -> int:
    """FLOPs of one training step: teacher forward, student forward and backward."""
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device(), dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
            loss = model._loss(crops, teacher_temp=0.04)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops() -> float | None:
    """Dense bf16 peak of this GPU, if known."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def section_environment(cfg: dict[str, Any]) -> dict[str, Any]:
    """Versions, device and memory."""
    import lightning
    import timm

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "cpu_cores": os.cpu_count(),
        "device": device(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {
            "gpu": props.name,
            "gpu_memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "dense_bf16_tflops": peak_tflops(),
        }
    return out


def section_h2d(cfg: dict[str, Any]) -> dict[str, Any]:
    """Pinned host-to-device copy bandwidth (1 GiB; 1 MiB host copy on CPU)."""
    size = 2**30 if torch.cuda.is_available() else 2**20
    host = torch.empty(size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    target = torch.empty(size, dtype=torch.uint8, device=device())
    for _ in range(2):
        target.copy_(host, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        target.copy_(host, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return {"bytes": size, "pinned": host.is_pinned(), "gb_per_s": size / seconds / 1e9}


def emit(partial: dict[str, Any]) -> None:
    """Print a section's results so far (the parent keeps the last line, even on a timeout)."""
    print(json.dumps(partial), flush=True)


def _step_rates(cfg: dict[str, Any], compiled: bool) -> dict[str, Any]:
    """Samples/s, GFLOP per sample and MFU per batch size (largest first when compiled)."""
    out: dict[str, Any] = {}
    peak = peak_tflops()
    for batch_size in sorted(cfg["batches"], reverse=compiled):
        model, multicrop = build(cfg, compiled)
        tiles = raw_batch(batch_size, cfg["tile"], device())
        model.to(device())
        flops = step_flops(model, multicrop.to(device())(tiles))  # eager: before configure_model
        clock = StepClock()
        fit = trainer(device(), [clock], log_every_n_steps=10**6)
        steps = cfg["warmup"] + cfg["steps"]
        fit.fit(model, datamodule=RandomTiles(tiles, steps, multicrop))
        seconds = clock.seconds_per_step(cfg["warmup"])
        rate = batch_size / seconds
        result = {
            "samples_per_s": rate,
            "gflop_per_sample": flops / batch_size / 1e9,
            "mfu": flops / seconds / (peak * 1e12) if peak else None,
        }
        if torch.cuda.is_available():
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        out[str(batch_size)] = result
        emit(out)
        del model, fit, tiles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def section_step_eager(cfg: dict[str, Any]) -> dict[str, Any]:
    """The step without ``torch.compile``."""
    return _step_rates(cfg, compiled=False)


def section_step_compiled(cfg: dict[str, Any]) -> dict[str, Any]:
    """The step with ``compile=True`` (student and teacher, inductor, ``fullgraph=True``)."""
    return _step_rates(cfg, compiled=True)


class SyncCounter(L.Callback):
    """Counts synchronising CUDA calls (``set_sync_debug_mode("warn")``) in the measured steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.warnings: list[str] = []
        self.steps = 0
        self._catch: Any = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._catch is not None:
            self.steps += 1
        if batch_idx == self.warmup - 1:
            self._catch = warnings.catch_warnings(record=True)
            self.warnings = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        """Leave debug mode and keep only the sync warnings."""
        torch.cuda.set_sync_debug_mode(0)
        if self._catch is not None:
            self._catch.__exit__(None, None, None)
        self.warnings = [
            f"{w.filename}:{w.lineno}" for w in self.warnings if "synchroniz" in str(w.message)
        ]


def section_syncs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Host syncs per step and where they come from."""
    batch_size = cfg["batches"][0]
    model, multicrop = build(cfg)
    tiles = raw_batch(batch_size, cfg["tile"], device())
    if not torch.cuda.is_available():
        # No sync debug mode on CPU: the profiler count of benchmarks/pretrain_step.py instead.
        from pretrain_step import PhaseProfiler, count_ops

        profiler = PhaseProfiler(cfg["warmup"], cfg["steps"])
        fit = trainer("cpu", [profiler], log_every_n_steps=10**6)
        fit.fit(model, datamodule=RandomTiles(tiles, cfg["warmup"] + cfg["steps"] + 1, multicrop))
        total = count_ops(profiler.prof, cfg["steps"])["total"]
        return {"method": "torch.profiler (CPU)", "syncs_per_step": total.get("syncs", 0.0)}
    counter = SyncCounter(cfg["warmup"])
    # One step more than measured: the epoch's last batch runs the finite check (a read).
    steps = cfg["warmup"] + cfg["steps"] + 1

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == steps - 2:
                counter.stop()

    fit = trainer("cuda", [counter, Stop()], log_every_n_steps=10**6)
    fit.fit(model, datamodule=RandomTiles(tiles, steps, multicrop))
    locations: dict[str, int] = {}
    for where in counter.warnings:
        locations[where] = locations.get(where, 0) + 1
    return {
        "method": 'torch.cuda.set_sync_debug_mode("warn")',
        "steps": cfg["steps"],
        "syncs_per_step": len(counter.warnings) / cfg["steps"],
        "locations": locations,
    }


def section_loader(cfg: dict[str, Any]) -> dict[str, Any]:
    """The step fed by ``TerraFMDataModule`` from a synthetic store written here."""
    from terrafm_lightning.prep.sources.synthetic import prepare_synthetic

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "synthetic.zarr")
        start = time.perf_counter()
        prepare_synthetic(
            path, cfg["store_samples"], cfg["tile"], scheduler=cfg["scheduler"], progress=False
        )
        out["store"] = {
            "samples": cfg["store_samples"],
            "tile": cfg["tile"],
            "write_s": time.perf_counter() - start,
        }
        emit(out)
        batch_size = cfg["batches"][-1]
        for workers in cfg["workers"]:
            model, _ = build(cfg)
            data = TerraFMDataModule(
                path,
                batch_size=batch_size,
                num_workers=workers,
                global_crop_size=cfg["global"],
                local_crop_size=cfg["local"],
                n_local_crops=cfg["n_local"],
                samples_per_epoch=batch_size * (cfg["warmup"] + cfg["steps"]),
            )
            clock = StepClock()
            fit = trainer(device(), [clock], log_every_n_steps=10**6)
            fit.fit(model, datamodule=data)
            rate = batch_size / clock.seconds_per_step(cfg["warmup"])
            out[f"workers_{workers}"] = {"batch_size": batch_size, "samples_per_s": rate}
            emit(out)
    return out


def section_decode(cfg: dict[str, Any]) -> dict[str, Any]:
    """GPU vs CPU decode, when this tree has decode backends."""
    name = "terrafm_lightning.data.decode"
    if importlib.util.find_spec(name) is None:
        return {
            "skipped": f"{name} is not in this tree: no GPU decode backend to compare "
            "(issue 11, deliverable 2)"
        }
    module = importlib.import_module(name)
    public = sorted(n for n in dir(module) if not n.startswith("_"))
    return {"skipped": f"{name} found but its interface is not wired here; public names {public}"}


def last_json(stdout: str) -> dict[str, Any]:
    """The last JSON object a section printed ({} if none)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def run_section(name: str, dry_run: bool) -> dict[str, Any]:
    """Run one section in this process."""
    torch.backends.cuda.matmul.allow_tf32 = True
    return globals()[f"section_{name}"](sizes(dry_run))


def in_process(name: str) -> dict[str, Any]:
    """Run a dry-run section here (seconds of imports saved per section); errors are kept."""
    try:
        return run_section(name, dry_run=True)
    except Exception as error:  # noqa: BLE001 -- the report must record any failure
        return {"error": f"{type(error).__name__}: {error}"}


def in_subprocess(name: str, limit: float) -> dict[str, Any]:
    """Run a section in a subprocess with a time limit, keeping what it printed on a timeout."""
    command = [sys.executable, __file__, "--section", name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as timeout:
        stdout = timeout.stdout or ""
        out = last_json(stdout if isinstance(stdout, str) else stdout.decode())
        out["error"] = f"timed out after {limit:.0f} s (results so far kept)"
        return out
    out = last_json(done.stdout)
    if done.returncode != 0:
        out["error"] = done.stderr.strip().splitlines()[-20:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="JSON results file")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--budget-s", type=float, default=540.0, help="whole run, seconds")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        emit(run_section(args.section, args.dry_run))
        return
    deadline = time.monotonic() + args.budget_s
    out_path = Path(args.out)
    results: dict[str, Any] = {"dry_run": args.dry_run, "budget_s": args.budget_s}
    for name in args.sections:
        left = deadline - time.monotonic()
        start = time.monotonic()
        if left < 5:
            results[name] = {"skipped": f"no time left in the {args.budget_s:.0f} s budget"}
        elif args.dry_run:
            results[name] = in_process(name)
        else:
            results[name] = in_subprocess(name, min(left, LIMITS[name]))
        results[name]["section_s"] = round(time.monotonic() - start, 1)
        out_path.write_text(json.dumps(results, indent=2))
        print(name, json.dumps(results[name])[:400], flush=True)


if __name__ == "__main__":
    main()
