"""``terrafm plan``: fake-tensor plan against real CPU runs, exact counts, CLI and bad input."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from terrafm_lightning.cli import main
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.plan import make_plan
from terrafm_lightning.plan.config import precision_plugin
from terrafm_lightning.plan.devices import DEVICES
from terrafm_lightning.plan.estimate import GIB, HEADROOM
from terrafm_lightning.plan.flops import SDPA_FLOPS
from terrafm_lightning.plan.search import largest_batch
from terrafm_lightning.plan.step import StepRunner
from terrafm_lightning.ssl.module import TerraFMPretrainModule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "pretrain_tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _config(tmp_path: Path, trainer: dict | None = None, data: dict | None = None) -> Path:
    """The tiny CPU recipe with ``trainer`` / ``data.init_args`` entries replaced."""
    config = yaml.safe_load(TINY.read_text())
    config["trainer"].update(trainer or {})
    config["data"]["init_args"].update(data or {})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _head_parameters(dim: int) -> int:
    """DINO head: MLP dim -> 2048 -> 2048 -> 256, weight-normed 256 -> 65536 (v and g)."""
    return dim * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + 65536 * 256 + 65536


def _backbone_parameters(dim: int, depth: int) -> int:
    """TerraFM: stems (D = 3d) over 26 bands, shared projection, fusion, tokens, ViT blocks."""
    stem = 3 * dim
    bands = sum(len(b) for b in BANDS.values())
    stems = bands * 16 * 16 * stem + 2 * len(MODALITIES) * stem  # conv weights, biases, embeds
    projection = stem * stem + 2 * stem + stem * stem + stem + stem * dim + dim
    fusion = 5 * stem + stem * stem + stem
    tokens = dim + 197 * dim + 2 * dim  # cls, position (14 x 14 + 1), final norm
    return stems + projection + fusion + tokens + depth * (12 * dim * dim + 13 * dim)


@pytest.mark.parametrize(
    ("backbone", "dim", "depth", "total"),
    [("terrafm_tiny", 192, 12, 32_284_288), ("terrafm_base", 768, 12, 141_412_096)],
)
def test_plan_counts_the_exact_parameters(backbone: str, dim: int, depth: int, total: int) -> None:
    with torch.device("meta"):
        module = TerraFMPretrainModule(backbone, high_frequency_classes=[10])
    runner = StepRunner(module, precision_plugin("bf16-mixed"), {}, MODALITIES, 1, None)
    student = list(runner.module.student.parameters())
    assert total == _backbone_parameters(dim, depth) + _head_parameters(dim)
    assert sum(p.numel() for p in student) == total
    # The prototype norms g (65536) are fixed by norm_last_layer.
    assert sum(p.numel() for p in student if p.requires_grad) == total - 65536


def _step_modules() -> tuple[dict, dict]:
    """A tiny module whose blocks matter (narrow stems) and small crops."""
    model = {
        "backbone": "terrafm_tiny",
        "backbone_kwargs": {"depth": 4, "stem_ratio": 1},
        "num_prototypes": 1024,
        "head_hidden_dim": 256,
        "head_bottleneck_dim": 64,
        "high_frequency_classes": [10],
    }
    data = {"n_global_crops": 2, "global_crop_size": 64, "n_local_crops": 2, "local_crop_size": 32}
    return model, data


def _allocator_peak(runner: StepRunner, batch_size: int) -> int:
    """Peak bytes the CPU allocator holds during a real step, above those held before it.

    Every allocation and free of the CPU allocator is a ``[memory]`` event of the profiler;
    their running sum over the step is what the step adds to the state held before it.
    oneDNN is off: its convolution backward takes a scratch buffer (CPU only) that the
    step's tensors do not include.
    """
    runner.optimizer.zero_grad(set_to_none=True)  # freed before the profile starts
    with (
        torch.backends.mkldnn.flags(enabled=False),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        runner._step(batch_size, nullcontext())
    events = prof.profiler.kineto_results.events()
    sizes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, size in sizes:
        live += size
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("checkpointing", [False, True])
def test_planned_peak_is_within_10_percent_of_a_real_cpu_step(checkpointing: bool) -> None:
    model, data = _step_modules()
    batch_size, plugin = 4, precision_plugin("32-true")
    with torch.device("meta"):
        planned = StepRunner(TerraFMPretrainModule(**model), plugin, data, MODALITIES, 1, 3.0)
    planned.flops(batch_size, False)  # the AdamW state, as in make_plan
    plan = planned.memory(batch_size, checkpointing, 1.0)
    torch.manual_seed(0)
    real = StepRunner(TerraFMPretrainModule(**model), plugin, data, MODALITIES, 1, 3.0, fake=False)
    real.flops(batch_size, False)
    real.module.student.backbone.set_grad_checkpointing(checkpointing)
    measured = _allocator_peak(real, batch_size)
    assert abs(plan.peak - measured) / measured < 0.1, (plan.peak, measured)
    # The same dispatch-mode count on real tensors: fake kernels make the same tensors.
    assert real.memory(batch_size, checkpointing, 1.0).peak == pytest.approx(plan.peak, rel=0.01)
    # Fake and real steps count the same FLOPs.
    assert planned.flops(batch_size, checkpointing) == real.flops(batch_size, checkpointing)


def test_checkpointing_lowers_the_planned_activations() -> None:
    model, data = _step_modules()
    with torch.device("meta"):
        runner = StepRunner(
            TerraFMPretrainModule(**model), precision_plugin("32-true"), data, MODALITIES, 1, 3.0
        )
    plain, checkpointed = (runner.memory(8, c, 1.0) for c in (False, True))
    assert checkpointed.activations < 0.8 * plain.activations
    assert runner.flops(8, True) > runner.flops(8, False)  # the recomputed block forwards


def test_attention_flops_of_the_cpu_kernel_count_the_math_kernel_matmuls() -> None:
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))

    def count(backend: SDPBackend) -> int:
        counter = FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS)
        with counter, sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        return counter.get_total_flops()

    # Forward q k^T and a v, backward 4 matmuls: 6 x 2 x 2*3 x 17*17 x 8.
    assert count(SDPBackend.FLASH_ATTENTION) == count(SDPBackend.MATH) == 6 * 2 * 6 * 289 * 8


@pytest.mark.parametrize(
    ("fixed", "per_sample", "usable", "expected"),
    [(1.0, 0.25, 72.0, 284), (0.5, 0.1, 72.0, 715), (71.0, 1.0, 72.0, 1), (100.0, 1.0, 72.0, 0)],
)
def test_largest_batch_of_a_linear_peak(
    fixed: float, per_sample: float, usable: float, expected: int
) -> None:
    calls: list[int] = []

    def peak(batch: int) -> float:
        calls.append(batch)
        return fixed + per_sample * batch

    assert largest_batch(peak, usable, {16: peak(16)}) == expected
    assert len(calls) <= 5


def test_cli_prints_the_plan_of_the_tiny_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    argv = ["--config", str(config), "--devices", "2", "--gpu-memory", "0.25", "--mfu", "0.5"]
    main(["plan", *argv])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"plan of {config}"
    assert lines[2].startswith("  step         2 x 32 px + 4 x 16 px crops of s1, s2_l1c, s2_l2a")
    assert lines[2].endswith("8 per device, 16 in all")
    assert lines[3] == "  precision    32-true; DDP over 2 devices"
    assert lines[-5].startswith("  largest batch per device in 0.2 GiB")
    assert "at MFU 0.5 of NVIDIA H100 SXM (989 TFLOP/s dense bf16)" in lines[-1]


def _tiny_model() -> dict:
    return yaml.safe_load(TINY.read_text())["model"]["init_args"]


def test_fsdp_divides_the_state_by_the_devices(tmp_path: Path) -> None:
    strategy = {
        "class_path": "ModelParallelStrategy",
        "init_args": {"data_parallel_size": 4, "tensor_parallel_size": 1},
    }
    ddp = make_plan(_config(tmp_path), devices=4, gpu_memory=0.25)
    fsdp = make_plan(_config(tmp_path, {"strategy": strategy}), devices=4, gpu_memory=0.25)
    assert fsdp.strategy.sharded and not ddp.strategy.sharded
    for name in ("student parameters", "EMA teacher", "AdamW state"):
        assert fsdp.state[name] == ddp.state[name] / 4
    assert "DDP gradient buckets" in ddp.state and "DDP gradient buckets" not in fsdp.state
    assert "FSDP whole units (+ their gradients)" in fsdp.state
    assert fsdp.step[False].peak < ddp.step[False].peak  # a quarter of the gradients
    assert fsdp.flops_per_sample == ddp.flops_per_sample
    params, trained = ddp.parameters, ddp.trainable
    assert ddp.batch_size == 8
    assert ddp.state["student parameters"] == ddp.state["EMA teacher"] == 4 * params
    assert ddp.state["DDP gradient buckets"] == 4 * trained
    tensors = sum(1 for p in TerraFMPretrainModule(**_tiny_model()).student.parameters())
    # exp_avg and exp_avg_sq per trained parameter, one float32 step per trained tensor.
    assert ddp.state["AdamW state"] == 8 * trained + 4 * (tensors - 1)
    assert ddp.usable == 0.25 * GIB * (1 - HEADROOM)
    assert ddp.peak(False) <= ddp.usable and ddp.largest[False] >= 8
    assert ddp.samples_per_second == 0.4 * DEVICES["h100"].bf16_flops / ddp.flops_per_sample


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", str(TINY), "--device", "a100"])
    assert exit_.value.code == 2
    first, *_ = capsys.readouterr().err.splitlines()
    assert first == "terrafm: error: --device 'a100' is unknown; accepted: h100, h200"
    with pytest.raises(SystemExit):
        main(["plan", "--config", str(TINY), "--gpu-memory", "0.01"])
    first, *_ = capsys.readouterr().err.splitlines()
    assert first.startswith(f"terrafm: error: {TINY}: 1 sample per device needs ")
    assert "use FSDP (trainer.strategy: ModelParallelStrategy) over more devices" in first
