"""``terrafm plan``: memory and throughput of a pretraining config, computed before the run.

The config is parsed as ``terrafm fit`` parses it (LightningCLI); its ``TerraFMPretrainModule``
is built on the meta device and materialised as fake tensors (``FakeTensorMode``: shapes,
dtypes and strides, no storage), and one training step runs on fake crops of the shapes the
datamodule's multi-crop makes: the teacher and student forwards and the DINO loss
(``TerraFMPretrainModule._loss``, what ``training_step`` computes, without its logging), the
centring, the backward, the module's gradient clipping, its AdamW, the EMA update. Nothing is
allocated, so a laptop plans a GPU run in seconds.

Measured on the fake step:

- bytes: :class:`~terrafm_lightning.plan.memory.LiveBytes`, a dispatch mode, adds the storage
  of every tensor an op creates and subtracts it when the storage dies; the step's peak is over
  activations, temporaries and gradients (the gradients weighted by the share a device keeps).
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; the
  CPU attention kernel a fake step runs is counted by
  :data:`~terrafm_lightning.plan.flops.SDPA_FLOPS`).

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

Modules: ``config`` (reading the config: classes, precision, strategy, devices), ``step`` (the
fake step and its crops), ``memory`` (byte counts), ``flops`` (attention FLOP formulas),
``devices`` (the GPU table), ``search`` (the largest batch that fits), ``estimate`` (the
:class:`Plan` and :func:`make_plan`), ``cli`` (the ``terrafm plan`` parser).
"""

from terrafm_lightning.plan.cli import main
from terrafm_lightning.plan.estimate import Plan, make_plan

__all__ = ["Plan", "main", "make_plan"]
