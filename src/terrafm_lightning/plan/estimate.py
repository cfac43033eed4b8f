"""The plan of a pretraining config: state and step bytes per device, largest batch, FLOPs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.errors import UserError
from terrafm_lightning.modalities import MODALITIES, WORLDCOVER_CLASSES
from terrafm_lightning.plan.config import (
    Strategy,
    init_defaults,
    parse_strategy,
    precision_plugin,
    read_config,
    run_devices,
    section_class,
)
from terrafm_lightning.plan.devices import DEVICES, Device
from terrafm_lightning.plan.memory import tensor_bytes
from terrafm_lightning.plan.search import largest_batch
from terrafm_lightning.plan.step import StepMemory, StepRunner
from terrafm_lightning.ssl.module import TerraFMPretrainModule

GIB = 2**30
HEADROOM = 0.1
"""Share of the device memory left for what the plan does not see (context, workspaces)."""


@dataclass(frozen=True)
class Plan:
    """Memory per device, FLOPs and throughput of one pretraining config."""

    config: str
    backbone: str
    precision: str
    strategy: Strategy
    batch_size: int
    crops: str
    parameters: int
    trainable: int
    state: dict[str, float]
    """Bytes per device held across the step, by name."""
    step: dict[bool, StepMemory]
    """The step at the config's batch, without (False) and with (True) checkpointing."""
    largest: dict[bool, int]
    """Largest batch per device that fits, without and with checkpointing."""
    flops_per_sample: float
    """Model FLOPs of one sample (student forward and backward, teacher forward)."""
    recompute_flops_per_sample: float
    """FLOPs checkpointing adds per sample (the recomputed student block forwards)."""
    device: Device
    memory_gib: float
    mfu: float

    @property
    def usable(self) -> float:
        """Bytes a configuration may peak at."""
        return self.memory_gib * GIB * (1 - HEADROOM)

    def peak(self, checkpointing: bool) -> float:
        """Peak bytes per device of a step at the config's batch."""
        return sum(self.state.values()) + self.step[checkpointing].peak

    @property
    def samples_per_second(self) -> float:
        """Per device, at ``mfu`` of the device's dense bf16 peak."""
        return self.mfu * self.device.bf16_flops / self.flops_per_sample

    def render(self) -> str:
        """The plan as a text table."""
        gib = lambda value: f"{value / GIB:10.2f}"  # noqa: E731
        devices = self.strategy.devices
        lines = [
            f"plan of {self.config}",
            f"  model        {self.backbone}, {self.parameters:,} parameters in the student "
            f"({self.trainable:,} trained), as many in the EMA teacher",
            f"  step         {self.crops} per sample; {self.batch_size} per device, "
            f"{self.batch_size * devices} in all",
            f"  precision    {self.precision}; {self.strategy.name}",
            "",
            f"  {'per device, GiB':<40}{'no checkpointing':>18}{'checkpointing':>16}",
        ]
        for name, value in self.state.items():
            lines.append(f"  {name:<40}{gib(value):>18}{gib(value):>16}")
        rows = (
            ("activation peak of the step", lambda c: self.step[c].activations),
            ("step peak (activations + gradients)", lambda c: self.step[c].peak),
            ("total peak", self.peak),
        )
        for name, value in rows:
            lines.append(f"  {name:<40}{gib(value(False)):>18}{gib(value(True)):>16}")
        usable = f"largest batch per device in {self.usable / GIB:.1f} GiB"
        lines.append(f"  {usable:<40}{self.largest[False]:>18}{self.largest[True]:>16}")
        rate = self.samples_per_second
        lines += [
            "",
            f"  (usable: {1 - HEADROOM:.0%} of --gpu-memory {self.memory_gib:g} GiB; the rest is "
            "for the CUDA context, workspaces and fragmentation)",
            f"  FLOPs per sample   {self.flops_per_sample / 1e9:.1f} GFLOP (student forward + "
            f"backward, teacher forward); checkpointing recomputes "
            f"{self.recompute_flops_per_sample / 1e9:.1f} GFLOP more",
            f"  throughput         {rate:.1f} samples/s per device, {rate * devices:,.0f} on "
            f"{devices} devices, at MFU {self.mfu:g} of {self.device.name} "
            f"({self.device.bf16_flops / 1e12:.0f} TFLOP/s dense bf16); "
            f"{self.batch_size / rate:.3f} s per step",
        ]
        return "\n".join(lines)


def make_plan(
    config_path: str | Path,
    devices: int | None = None,
    gpu_memory: float | None = None,
    mfu: float = 0.4,
    device: str = "h100",
) -> Plan:
    """Plan the pretraining config at ``config_path`` (see :mod:`terrafm_lightning.plan`).

    Args:
        config_path: a ``terrafm fit`` config of ``TerraFMPretrainModule`` and
            ``TerraFMDataModule``.
        devices: devices of the whole run (default ``trainer.devices`` x ``trainer.num_nodes``).
        gpu_memory: memory per device in GiB (default: the device's).
        mfu: model FLOPs utilisation the throughput assumes.
        device: ``h100`` or ``h200``.

    Raises:
        ValueError: an unknown device, a config that is not a pretraining config, or a batch
            that does not fit even at 1 sample per device.
    """
    if device not in DEVICES:
        raise UserError(f"--device {device!r} is unknown; accepted: {', '.join(DEVICES)}")
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} must be in (0, 1]")
    if devices is not None and devices < 1:
        raise UserError(f"--devices {devices} must be at least 1")
    spec = DEVICES[device]
    memory = spec.memory_gib if gpu_memory is None else gpu_memory
    if memory <= 0:
        raise UserError(f"--gpu-memory {gpu_memory} must be positive")
    config = read_config(config_path)
    model_class, model_args = section_class(config, "model", TerraFMPretrainModule, config_path)
    _, data_args = section_class(config, "data", TerraFMDataModule, config_path)
    data_args = {**init_defaults(TerraFMDataModule), **data_args}
    trainer = config.trainer
    strategy = parse_strategy(trainer.get("strategy"), devices or run_devices(trainer, config_path))
    plugin = precision_plugin(trainer.get("precision"))
    if not model_args.get("high_frequency_classes"):
        # Taken from the store at fit time; which classes they are changes no shape.
        model_args["high_frequency_classes"] = [min(WORLDCOVER_CLASSES)]
    modalities = data_args.get("modalities") or (model_args.get("backbone_kwargs") or {}).get(
        "modalities", MODALITIES
    )
    modalities = [m for m in MODALITIES if m in modalities]
    with torch.device("meta"):
        module = model_class(**model_args)
    runner = StepRunner(
        module,
        plugin,
        data_args,
        modalities,
        int(trainer.get("accumulate_grad_batches") or 1),
        trainer.get("gradient_clip_val"),
    )
    batch_size = int(data_args["batch_size"])
    flops = {c: runner.flops(batch_size, c) / batch_size for c in (False, True)}
    state = _state_bytes(runner, strategy)
    fixed, usable = sum(state.values()), memory * GIB * (1 - HEADROOM)
    share = 1 / strategy.shards
    step, largest = {}, {}
    for checkpointing in (False, True):
        step[checkpointing] = runner.memory(batch_size, checkpointing, share)

        def peak(batch: int, checkpointing: bool = checkpointing) -> float:
            return fixed + runner.memory(batch, checkpointing, share).peak

        largest[checkpointing] = largest_batch(
            peak, usable, {batch_size: fixed + step[checkpointing].peak}
        )
    if not largest[True]:
        one = fixed + runner.memory(1, True, share).peak
        fix = (
            "more devices (--devices)"
            if strategy.sharded
            else ("FSDP (trainer.strategy: ModelParallelStrategy) over more devices")
        )
        raise UserError(
            f"{config_path}: 1 sample per device needs {one / GIB:.1f} GiB even with activation "
            f"checkpointing, over the {usable / GIB:.1f} GiB usable of --gpu-memory {memory:g}: "
            f"use {fix}, or smaller crops (data.init_args.global_crop_size, local_crop_size)"
        )
    n_global, n_local = data_args["n_global_crops"], data_args["n_local_crops"]
    crops = f"{n_global} x {data_args['global_crop_size']} px"
    if n_local:
        crops += f" + {n_local} x {data_args['local_crop_size']} px"
    return Plan(
        config=str(config_path),
        backbone=str(model_args.get("backbone", "terrafm_base")),
        precision=str(trainer.get("precision") or "32-true"),
        strategy=strategy,
        batch_size=batch_size,
        crops=f"{crops} crops of {', '.join(modalities)}",
        parameters=sum(p.numel() for p in runner.module.student.parameters()),
        trainable=sum(p.numel() for p in runner.module.student.parameters() if p.requires_grad),
        state=state,
        step=step,
        largest=largest,
        flops_per_sample=flops[False],
        recompute_flops_per_sample=flops[True] - flops[False],
        device=spec,
        memory_gib=memory,
        mfu=mfu,
    )


def _state_bytes(runner: StepRunner, strategy: Strategy) -> dict[str, float]:
    """Bytes per device held across the step (see :mod:`terrafm_lightning.plan`)."""
    module, shards = runner.module, strategy.shards
    trainable = tensor_bytes(iter(runner.trainable))
    optimizer = [t for s in runner.optimizer.state.values() for t in s.values()]
    state = {
        "student parameters": tensor_bytes(module.student.parameters()) / shards,
        "EMA teacher": tensor_bytes(module.teacher.parameters()) / shards,
        "AdamW state": tensor_bytes(t for t in optimizer if isinstance(t, Tensor)) / shards,
        "buffers": float(tensor_bytes(module.buffers())),
    }
    if runner.accumulate > 1:
        state["gradients (accumulated)"] = trainable / shards
    if strategy.ddp_buckets:
        state["DDP gradient buckets"] = float(trainable)
    if strategy.sharded:
        backbone, head = module.student.backbone, module.student.head
        blocks = {id(p) for p in backbone.blocks.parameters()}
        stem = tensor_bytes(p for p in backbone.parameters() if id(p) not in blocks)
        block = max(tensor_bytes(b.parameters()) for b in backbone.blocks)
        whole = stem + tensor_bytes(head.parameters()) + 2 * block
        state["FSDP whole units (+ their gradients)"] = 2.0 * whole
    return state
