"""Pretraining step throughput: samples/s of TerraFMPretrainModule through the Lightning Trainer.

Each step runs the on-device multi-crop (``MultiCrop``), the student and teacher forwards, the
backward, AdamW and the EMA. Tiles are random, already on the device (the store loader is
measured in ``benchmarks/loader.py``).

CPU (tiny vs small, side by side):
    python benchmarks/pretrain_step.py --models terrafm_tiny terrafm_small
GPU (paper crops 2 x 224 + 6 x 96 from 534 px tiles, bf16, with and without torch.compile;
MFU from FLOPs counted with torch.utils.flop_counter, peak = --peak-tflops):
    python benchmarks/pretrain_step.py --device cuda --models terrafm_base --paper-crops \
        --batch-size 64 --compile both
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from terrafm_lightning.data.multicrop import MultiCrop
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.ssl.module import TerraFMPretrainModule


def raw_batch(batch_size: int, tile: int) -> dict[str, torch.Tensor]:
    """A CPU batch of the contract: whole tiles of every modality, mixed WorldCover classes."""
    out: dict[str, torch.Tensor] = {
        m: torch.rand(batch_size, len(BANDS[m]), tile, tile) * 3000 for m in BANDS
    }
    out["s1"] = out["s1"] / 3000 * 20 - 25
    out["available"] = torch.ones(batch_size, len(MODALITIES), dtype=torch.bool)
    out["dominant_class"] = torch.tensor([10, 30, 50, 80, 95, 40, 20, 60] * batch_size)[:batch_size]
    out["worldcover_hist"] = torch.full((batch_size, 11), 1 / 11)
    out["index"] = torch.arange(batch_size)
    return out


class RandomTiles(L.LightningDataModule):
    """The same random raw batch every step, multi-cropped on the device."""

    def __init__(self, batch: dict[str, torch.Tensor], steps: int, multicrop: MultiCrop) -> None:
        super().__init__()
        self.batch, self.steps, self.multicrop = batch, steps, multicrop

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * self.steps, batch_size=None)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.multicrop.to(batch["available"].device)(batch)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def flops_per_sample(model: TerraFMPretrainModule, crops: dict, batch_size: int) -> float:
    """Student forward+backward (3x forward) of every crop plus the teacher forward of globals."""
    views = [(c, p) for c, p in zip(crops["global_crops"], crops["student_presence"], strict=False)]
    views += list(zip(crops["local_crops"], crops["student_presence"][len(views) :], strict=True))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for inputs, presence in views:
            model.student.head(model.student.backbone(inputs, presence))
    student = counter.get_total_flops()
    with counter, torch.no_grad():
        for inputs, presence in zip(crops["global_crops"], crops["teacher_presence"], strict=True):
            model.teacher.head(model.teacher.backbone(inputs, presence))
    return (3 * student + counter.get_total_flops()) / batch_size


def run(args: argparse.Namespace, name: str, compiled: bool) -> dict[str, float]:
    sizes = (224, 96, 534) if args.paper_crops else (args.global_size, args.local_size, args.tile)
    multicrop = MultiCrop(
        n_global=2, global_size=sizes[0], n_local=args.n_local, local_size=sizes[1]
    )
    model = TerraFMPretrainModule(name, high_frequency_classes=[10, 30, 80], warmup_epochs=0)
    if compiled:
        for net in (model.student, model.teacher):
            net.backbone = torch.compile(net.backbone)
    batch = raw_batch(args.batch_size, sizes[2])
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.device if args.device == "cpu" else "gpu",
        devices=1,
        precision="bf16-mixed" if args.device == "cuda" else "32-true",
        max_epochs=1,
        gradient_clip_val=3.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=RandomTiles(batch, args.warmup + args.steps, multicrop))
    measured = timer.times[args.warmup - 1 :]
    rate = args.batch_size * (len(measured) - 1) / (measured[-1] - measured[0])
    result = {"samples_per_s": rate}
    if args.device == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        device_batch = {k: v.cuda() for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            flops = flops_per_sample(model, multicrop.cuda()(device_batch), args.batch_size)
        result["gflops_per_sample"] = flops / 1e9
        result["mfu"] = flops * rate / (args.peak_tflops * 1e12)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", default=["terrafm_tiny", "terrafm_small"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--paper-crops", action="store_true", help="2x224 + 6x96 from 534 px")
    parser.add_argument("--global-size", type=int, default=96)
    parser.add_argument("--local-size", type=int, default=48)
    parser.add_argument("--n-local", type=int, default=6)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    args = parser.parse_args()
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = {}
    for name in args.models:
        for compiled in compile_modes:
            key = f"{name}{' compiled' if compiled else ''}"
            results[key] = run(args, name, compiled)
            print(key, {k: round(v, 3) for k, v in results[key].items()}, flush=True)
    base = next(iter(results.values()))["samples_per_s"]
    for key, result in results.items():
        rate = result["samples_per_s"]
        print(f"{key}: {rate:.2f} samples/s ({rate / base:.2f}x the first)")


if __name__ == "__main__":
    main()
