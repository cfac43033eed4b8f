"""Device placement without a device: the training step's forward on fake CUDA tensors.

PyTorch's ``FakeTensorMode`` runs operators on tensors that carry a device, shape and dtype but
no data, so ``device="cuda"`` works without a GPU or a CUDA build for forward computations
(the autograd engine's backward needs a real CUDA context, so backward is not covered). Inside
it, a host read of a device value (``.item()``, ``.tolist()``, boolean-mask indexing, an ``if``
on a tensor) raises ``DataDependentOutputException``/``DynamicOutputShapeException``, and an
operator mixing a CUDA tensor with a CPU tensor of more than 0 dimensions raises
``FakeTensorDeviceMismatchError``; a dispatch mode below also records every operator that
produces a tensor off the CUDA device, even one that never meets a CUDA tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.ssl.ema import ema_update
from terrafm_lightning.ssl.module import TerraFMPretrainModule
from terrafm_lightning.ssl.online_knn import unique_samples, validation_metrics
from tests.generators.modules import TINY_NETWORKS
from tests.generators.stores import make_synthetic_store


class OffDeviceOutputs(TorchDispatchMode):
    """Records each operator whose output holds a tensor that is not on the CUDA device.

    ``torch.tensor(python_values, device="cuda")`` stages the values on the host
    (``aten.lift_fresh``) and copies them over: a host-to-device copy of a literal, no read of a
    device value. Those are kept apart, in ``literals``, by shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, tuple[int, ...]]] = []
        self.literals: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.lift_fresh.default:
            self.literals.append(tuple(out.shape))
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "cuda":
                self.found.append((str(func), tuple(t.shape)))
        return out


def _cuda(tree: Any) -> Any:
    return tree_map(lambda x: x.to("cuda") if isinstance(x, torch.Tensor) else x, tree)


def test_step_forward_and_online_knn_stay_on_the_device_without_host_syncs(
    tmp_path: Path,
) -> None:
    store = make_synthetic_store(tmp_path / "store.zarr", 16, 64)
    dm = TerraFMDataModule(
        str(store),
        batch_size=4,
        num_workers=0,
        global_crop_size=32,
        local_crop_size=16,
        n_local_crops=2,
        val_fraction=0.5,
    )
    dm.setup("fit")
    train_batch = next(iter(dm.train_dataloader()))
    val_batches = list(dm.val_dataloader())  # 8 held-out tiles, 2 batches
    model = TerraFMPretrainModule(**TINY_NETWORKS, high_frequency_classes=dm.high_frequency_classes)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:  # parameters, buffers and batches become fake CUDA tensors
        model = model.to("cuda").train()
        train_batch, val_batches = _cuda(train_batch), _cuda(val_batches)
    off_device = OffDeviceOutputs()
    with fake, off_device:
        # Training: the datamodule's on-device multi-crop and modality draws, both networks,
        # the DINO loss, the centring update and the EMA.
        crops = dm.on_after_batch_transfer(train_batch, 0)
        out = model._loss(crops, teacher_temp=0.04)
        model.centering.accumulate(out["teacher"], crops["dominant_class"])
        model.centering.step()
        ema_update(model.teacher, model.student, 0.996)
        # Validation: whole tiles, per-sample loss and features, de-duplication, two-fold kNN.
        for i, batch in enumerate(val_batches):
            model.validation_step(dm.multicrop.whole_tiles(batch), i)
        outputs = model._val_outputs
        rows = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        metrics = validation_metrics(unique_samples(rows, 8), dm.high_frequency_classes)
    assert off_device.found == []
    # Literals copied to the device: per validation batch the whole-tile box of
    # ``whole_tiles`` and the WorldCover code table of its labels, then the kNN's high-frequency
    # codes and their table. Training copies none.
    box, table, frequent = (1, 4), (11,), (len(dm.high_frequency_classes),)
    assert off_device.literals == [box, table, box, table, frequent, table]
    assert out["loss"].device == torch.device("cuda:0")
    assert model.centering.center.device == torch.device("cuda:0")
    assert set(metrics) == {"val/loss", "val/knn_top1", "val/knn_rare_top1", "rare_samples"}
    assert {m.device.type for m in metrics.values()} == {"cuda"}
    # The detectors fire: a host read and a CPU operand both raise.
    with fake, pytest.raises(DataDependentOutputException):
        out["loss"].item()
    with fake, pytest.raises(RuntimeError, match="two devices"):
        torch.ones(2) + crops["dominant_class"][:2]
