"""``terrafm plan``: memory and throughput of a pretraining config, computed before the run.

The config is parsed as ``terrafm fit`` parses it (LightningCLI); its ``TerraFMPretrainModule``
is built on the meta device and materialised as fake tensors (``FakeTensorMode``: shapes,
dtypes and strides, no storage), and one training step runs on fake crops of the shapes the
datamodule's multi-crop makes: the teacher and student forwards and the DINO loss
(``TerraFMPretrainModule._loss``, what ``training_step`` computes, without its logging), the
centring, the backward, the module's gradient clipping, its AdamW, the EMA update. Nothing is
allocated, so a laptop plans a GPU run in seconds.

Measured on the fake step:

- bytes: :class:`LiveBytes`, a dispatch mode, adds the storage of every tensor an op creates
  and subtracts it when the storage dies; the step's peak is over activations, temporaries and
  gradients (the gradients weighted by the share a device keeps).
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; the
  CPU attention kernel a fake step runs is counted by :data:`SDPA_FLOPS`).

Counted from the built tensors: parameters, the EMA teacher, buffers and the AdamW state (taken
after one warm-up step). Per device, with ``N`` devices:

- DDP (and one device): everything replicated, plus DDP's gradient buckets (one copy of the
  gradients, unless ``gradient_as_bucket_view``).
- FSDP (``ModelParallelStrategy`` / ``FSDPStrategy``): parameters, teacher, AdamW state and
  gradients divided by ``N``, plus the units FSDP2 holds whole during the step
  (:meth:`TerraFMPretrainModule.configure_model`): the student's backbone stem and head from
  forward to backward and two gathered blocks (the current and the prefetched one), each with
  its unsharded gradient.

A configuration fits when its peak is at most ``(1 - HEADROOM)`` of the device memory: the CUDA
context, NCCL and cuBLAS workspaces and the caching allocator's fragmentation are not tensors
the plan sees. The fake step runs on CPU: the precision is Lightning's own plugin (autocast
with bf16-mixed), scaled-dot-product attention runs the CPU flash kernel, which, like CUDA's
flash attention, keeps the output and the log-sum-exp, not the attention matrix.

Throughput: samples/s per device = ``mfu * peak / flops_per_sample`` with ``peak`` the dense
bf16 tensor-core peak, 989 TFLOP/s for both the H100 SXM and the H200 (NVIDIA H100 Tensor Core
GPU datasheet and NVIDIA H200 Tensor Core GPU datasheet: "BF16 Tensor Core 1,979 teraFLOPS",
a figure given with sparsity, i.e. 989 TFLOP/s dense). FLOPs per sample are model FLOPs
(student forward and backward, teacher forward), without the recompute of checkpointing.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from terrafm_lightning.batch import CropBatch
from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.errors import MissingInputError, UserError
from terrafm_lightning.modalities import BANDS, MODALITIES, WORLDCOVER_CLASSES
from terrafm_lightning.ssl.ema import ema_update
from terrafm_lightning.ssl.module import TerraFMPretrainModule

GIB = 2**30
MAX_BATCH = 1 << 16
"""Largest per-device batch the plan searches."""
HEADROOM = 0.1
"""Share of the device memory left for what the plan does not see (context, workspaces)."""


@dataclass(frozen=True)
class Device:
    """A GPU the plan sizes for."""

    name: str
    memory_gib: float
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""


DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM", 80.0, 989e12),
    "h200": Device("NVIDIA H200 SXM", 141.0, 989e12),
}

PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
SHARDED_STRATEGIES = ("ModelParallelStrategy", "FSDPStrategy")


def _sdpa_forward_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *_: Any, **__: Any
) -> int:
    """Two matmuls, ``q k^T`` and ``a v``, for (B, H, S, D) query, key and value."""
    batch, heads, queries, dim = query
    keys, value_dim = key[-2], value[-1]
    return 2 * batch * heads * queries * keys * (dim + value_dim)


def _sdpa_backward_flops(
    grad: Sequence[int],
    query: Sequence[int],
    key: Sequence[int],
    value: Sequence[int],
    *_: Any,
    **__: Any,
) -> int:
    """Four matmuls (gradients of v, the scores, q and k): twice the forward."""
    return 2 * _sdpa_forward_flops(query, key, value)


aten = torch.ops.aten
SDPA_FLOPS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}
"""FLOP formulas of the CPU attention kernels, which ``FlopCounterMode`` does not know (its
formulas for the CUDA kernels count the same matmuls)."""


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages that ops create (fake or real tensors), and their peak.

    A storage is counted once, when an op first returns it, and uncounted when it dies.
    Storages that :meth:`mark_gradient` names count as gradients, weighted by
    ``gradient_share`` in :attr:`peak` (the share of the gradients a device keeps).
    """

    def __init__(self, gradient_share: float = 1.0) -> None:
        super().__init__()
        self.gradient_share = gradient_share
        self._sizes: dict[int, int] = {}
        self._gradients: set[int] = set()
        self.other = self.gradients = 0
        self.peak = self.peak_other = 0.0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _has_storage(t)}
        for tensor in tree_leaves(out):
            # In-place ops and views return their input's storage: not a new one.
            if _has_storage(tensor) and id(tensor.untyped_storage()) not in inputs:
                self._add(tensor.untyped_storage())
        self._update()
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.other += storage.nbytes()
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self._sizes.pop(key)
        if key in self._gradients:
            self._gradients.remove(key)
            self.gradients -= size
        else:
            self.other -= size

    def _update(self) -> None:
        self.peak = max(self.peak, self.other + self.gradient_share * self.gradients)
        self.peak_other = max(self.peak_other, self.other)

    def mark_gradient(self, gradient: Tensor) -> None:
        """Count ``gradient``'s storage (made during the step) as a gradient from now on."""
        key = id(gradient.untyped_storage())
        if key in self._sizes and key not in self._gradients:
            self._gradients.add(key)
            self.other -= self._sizes[key]
            self.gradients += self._sizes[key]
            self._update()


def _has_storage(value: object) -> bool:
    """A tensor with a dense storage to count."""
    return isinstance(value, Tensor) and not value.is_sparse


def tensor_bytes(tensors: Iterator[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    sizes = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(sizes.values())


def precision_plugin(precision: str | int | None) -> Precision:
    """Lightning's precision plugin of a ``trainer.precision`` value, on CPU."""
    value = str(precision if precision is not None else "32-true")
    value = PRECISION_ALIASES.get(value, value)
    if value in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(value, device="cpu")
    if value in ("bf16-true", "16-true"):
        return HalfPrecision(value)
    if value == "64-true":
        return DoublePrecision()
    if value == "32-true":
        return Precision()
    raise UserError(
        f"trainer.precision {precision!r} cannot be planned: use 32-true, bf16-mixed, 16-mixed, "
        "bf16-true or 16-true"
    )


@dataclass(frozen=True)
class Strategy:
    """How a strategy places the training state on ``devices`` devices."""

    name: str
    devices: int
    sharded: bool
    ddp_buckets: bool

    @property
    def shards(self) -> int:
        """Ways the parameters, gradients and optimizer state are split."""
        return self.devices if self.sharded else 1


def parse_strategy(strategy: Any, devices: int) -> Strategy:
    """The :class:`Strategy` of a ``trainer.strategy`` value (a name or a class config)."""
    init: Mapping[str, Any] = {}
    if isinstance(strategy, str) or strategy is None:
        name = strategy or "auto"
    else:
        name = str(strategy["class_path"]).rsplit(".", 1)[-1]
        init = dict(strategy.get("init_args") or {})
    if name.endswith(SHARDED_STRATEGIES) or name.startswith("fsdp"):
        tensor_parallel = init.get("tensor_parallel_size", 1)
        if tensor_parallel not in (1, "auto"):
            raise UserError(
                f"trainer.strategy {name} with tensor_parallel_size {tensor_parallel} cannot be "
                "planned: the plan shards over data-parallel devices only (set it to 1)"
            )
        return Strategy(f"FSDP over {devices} devices", devices, True, False)
    if name.startswith("deepspeed") or "DeepSpeed" in name:
        raise UserError(f"trainer.strategy {name} cannot be planned: use ddp or FSDP")
    ddp = name.startswith("ddp") or name.endswith("DDPStrategy") or devices > 1
    buckets = ddp and not init.get("gradient_as_bucket_view", False)
    label = f"DDP over {devices} devices" if ddp else "one device"
    return Strategy(label, devices, False, buckets)


class _ConfigOnly(LightningCLI):
    """LightningCLI that parses a config (short class names included) and builds nothing."""

    def before_instantiate_classes(self) -> None:
        """Nothing runs, so no run folder either."""

    def instantiate_classes(self) -> None:
        """The plan builds the model itself, on fake tensors."""


def read_config(path: str | Path) -> Any:
    """Parse a ``terrafm fit`` config as the CLI does; returns its namespace."""
    if not Path(path).is_file():
        raise MissingInputError(f"config {path} not found")
    import terrafm_lightning.cli  # noqa: F401  (registers every class the CLI resolves)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = _ConfigOnly(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=["--config", str(path)],
            parser_kwargs={"exit_on_error": False},
        )
    return cli.config


def _class(config: Any, key: str, expected: type, path: str | Path) -> tuple[type, dict]:
    """The class and init arguments of ``config[key]``, which must subclass ``expected``."""
    section = config.get(key)
    class_path = str(section["class_path"]) if section else ""
    module, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, expected)):
        raise UserError(
            f"{path}: {key} is {name or 'missing'}; terrafm plan takes a pretraining config "
            f"({key}: {expected.__name__})"
        )
    init = section.get("init_args")
    return cls, (init.as_dict() if hasattr(init, "as_dict") else dict(init or {}))


def crop_batch(data: Mapping[str, Any], modalities: Sequence[str], batch_size: int) -> CropBatch:
    """A ``CropBatch`` of the shapes ``MultiCrop`` makes for ``data``'s crop settings.

    Every crop carries every modality (the datamodule sends all selected ones; the presence
    masks only choose among them), so the shapes do not depend on the draws.
    """
    n_global, n_local = data["n_global_crops"], data["n_local_crops"]

    def crops(n: int, size: int) -> dict[str, Tensor]:
        return {m: torch.zeros(n * batch_size, len(BANDS[m]), size, size) for m in modalities}

    return {
        "global_crops": crops(n_global, data["global_crop_size"]),
        "local_crops": crops(n_local, data["local_crop_size"]) if n_local else {},
        "teacher_presence": torch.ones(n_global * batch_size, len(MODALITIES), dtype=torch.bool),
        "student_presence": torch.ones(
            (n_global + n_local) * batch_size, len(MODALITIES), dtype=torch.bool
        ),
        "available": torch.ones(batch_size, len(MODALITIES), dtype=torch.bool),
        "dominant_class": torch.full((batch_size,), min(WORLDCOVER_CLASSES)),
        "worldcover_hist": torch.zeros(batch_size, len(WORLDCOVER_CLASSES)),
        "index": torch.arange(batch_size),
    }


@dataclass(frozen=True)
class StepMemory:
    """Peaks of one fake training step over the state held across it, bytes."""

    peak: float
    """Activations, temporaries and the device's share of the gradients."""
    activations: float
    """Activations and temporaries alone."""


class StepRunner:
    """A module, its optimizer and precision on fake tensors; runs and measures steps.

    With ``fake=False`` the same steps run on the module's real tensors (to validate the plan).

    A step is the forward under the precision's context, the backward and the gradient
    clipping, then AdamW, the EMA and the centring update. The latter three run outside the
    measurement: on the device they are in-place fused kernels, while their fake versions
    decompose into temporaries. (FLOPs and bytes are counted in separate steps because
    ``FlopCounterMode``'s module hooks keep checkpointed activations alive.)
    """

    def __init__(
        self,
        module: TerraFMPretrainModule,
        plugin: Precision,
        data: Mapping[str, Any],
        modalities: Sequence[str],
        accumulate: int,
        clip: float | None,
        fake: bool = True,
    ) -> None:
        self.module, self.plugin, self.data, self.modalities = module, plugin, data, modalities
        self.accumulate, self.clip = accumulate, clip
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
        with self.fake_mode:
            if fake:
                module = module.to_empty(device="cpu")
            self.module = plugin.convert_module(module)
            self.module.train()
            self.optimizer = self.module.configure_optimizers()
        self.trainable = [p for p in self.module.student.parameters() if p.requires_grad]

    def _step(self, batch_size: int, mode: AbstractContextManager) -> None:
        """One step; ``mode`` (a counter) is active from the batch to the clipping."""
        module, optimizer = self.module, self.optimizer
        with self.fake_mode:
            if self.accumulate == 1:
                optimizer.zero_grad(set_to_none=True)
            with mode:
                batch = crop_batch(self.data, self.modalities, batch_size)
                batch = self.plugin.convert_input(batch)
                with self.plugin.forward_context():
                    out = module._loss(batch, module.hparams.teacher_temp)
                    module.centering.accumulate(out["teacher"], batch["dominant_class"])
                loss = out.pop("loss")
                del out
                loss.backward()
                del loss
                module.configure_gradient_clipping(optimizer, self.clip, "norm")
            optimizer.step()
            ema_update(module.teacher, module.student, module.hparams.momentum_teacher)
            module.centering.step()

    def flops(self, batch_size: int, checkpointing: bool) -> int:
        """FLOPs of one step of ``batch_size`` samples (the first step creates AdamW's state)."""
        self.module.student.backbone.set_grad_checkpointing(checkpointing)
        counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
        self._step(batch_size, counter)
        return counter.get_total_flops()

    def memory(self, batch_size: int, checkpointing: bool, gradient_share: float) -> StepMemory:
        """Peak bytes of one step of ``batch_size`` samples."""
        self.module.student.backbone.set_grad_checkpointing(checkpointing)
        counter = LiveBytes(gradient_share)
        hooks = [
            p.register_post_accumulate_grad_hook(lambda p: counter.mark_gradient(p.grad))
            for p in self.trainable
        ]
        try:
            self._step(batch_size, counter)
        finally:
            for hook in hooks:
                hook.remove()
        return StepMemory(counter.peak, counter.peak_other)


def largest_batch(peak: Callable[[int], float], usable: float, known: Mapping[int, float]) -> int:
    """The largest batch ``b`` with ``peak(b) <= usable`` (0 if none), for an increasing peak.

    The peak is close to linear in the batch: the secant through the two measured batches
    nearest the limit predicts it, and the prediction is checked at ``b`` (and at ``b + 1`` if
    ``b`` fits); a bisection finishes any rest. ``known`` holds peaks already measured, by batch.
    """
    points = dict(known) or {1: peak(1)}
    for batch in list(points):
        points.setdefault(8 * batch, peak(8 * batch))

    def bounds() -> tuple[int, int | None]:
        fitting = [b for b, value in points.items() if value <= usable]
        too_big = [b for b, value in points.items() if value > usable]
        return max(fitting, default=0), min(too_big, default=None)

    low, high = bounds()
    for _ in range(3):
        if high == low + 1 or (high is None and low >= MAX_BATCH):
            return low
        if low and high:
            first, last = low, high
        else:
            first, last = sorted(points)[-2:] if low else sorted(points)[:2]
        slope = (points[last] - points[first]) / (last - first)
        guess = first + int((usable - points[first]) // slope) if slope > 0 else 2 * max(low, 1)
        guess = max(min(guess, MAX_BATCH - 1, high - 1 if high else MAX_BATCH), low, 1)
        for batch in (guess, guess + 1):
            if batch not in points:
                points[batch] = peak(batch)
            if points[batch] > usable:
                break
        low, high = bounds()
    high = high or MAX_BATCH + 1
    while high - low > 1:
        middle = (low + high) // 2
        points[middle] = peak(middle)
        low, high = (middle, high) if points[middle] <= usable else (low, middle)
    return low


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


def _devices(trainer: Any, path: str | Path) -> int:
    """Devices of the run: ``trainer.devices`` x ``trainer.num_nodes``."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1:
        raise UserError(
            f"{path}: trainer.devices is {devices!r}; pass --devices N (devices of the whole run)"
        )
    return devices * int(nodes)


def make_plan(
    config_path: str | Path,
    devices: int | None = None,
    gpu_memory: float | None = None,
    mfu: float = 0.4,
    device: str = "h100",
) -> Plan:
    """Plan the pretraining config at ``config_path`` (see the module docstring).

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
    model_class, model_args = _class(config, "model", TerraFMPretrainModule, config_path)
    _, data_args = _class(config, "data", TerraFMDataModule, config_path)
    data_args = {**_init_defaults(TerraFMDataModule), **data_args}
    trainer = config.trainer
    strategy = parse_strategy(trainer.get("strategy"), devices or _devices(trainer, config_path))
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


def _init_defaults(cls: type) -> dict[str, Any]:
    """Default values of ``cls.__init__``'s arguments."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _state_bytes(runner: StepRunner, strategy: Strategy) -> dict[str, float]:
    """Bytes per device held across the step (see the module docstring)."""
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
