"""Activation checkpointing of the student's blocks: same losses and gradients, less memory."""

from __future__ import annotations

import pytest
import torch

from terrafm_lightning.ssl.module import TerraFMPretrainModule
from tests.generators.batches import make_batch
from tests.generators.modules import TINY_NETWORKS

TINY = {
    **TINY_NETWORKS,
    "backbone_kwargs": {"depth": 4},
    "high_frequency_classes": [10, 30],
    "drop_path_rate": 0.3,  # drop-path draws must repeat in the recomputation
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def saved_activation_bytes(model: TerraFMPretrainModule, batch: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one training loss."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model._loss(batch, teacher_temp=0.04)["loss"].backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def loss_and_grads(every: bool | int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = TerraFMPretrainModule(**{**TINY, "grad_checkpointing": every}).train()
    batch = make_batch(generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss = model._loss(batch, teacher_temp=0.04)["loss"]
    loss.backward()
    grads = {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    return loss.detach(), grads, saved_activation_bytes(model, batch)


def test_checkpointed_blocks_give_the_same_losses_and_gradients_for_less_memory() -> None:
    loss, grads, saved = loss_and_grads(False)
    for every in (True, 2):
        got_loss, got_grads, got_saved = loss_and_grads(every)
        torch.testing.assert_close(got_loss, loss, rtol=0, atol=0)
        assert got_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert got_saved < saved, (every, got_saved, saved)
    model = TerraFMPretrainModule(**{**TINY, "grad_checkpointing": 2})
    assert model.student.backbone.grad_checkpointing == 2
    assert model.teacher.backbone.grad_checkpointing == 0


def test_checkpointing_the_teacher_is_refused_in_one_line() -> None:
    kwargs = {**TINY, "backbone_kwargs": {"depth": 2, "grad_checkpointing": True}}
    with pytest.raises(
        ValueError, match=r"^backbone_kwargs.grad_checkpointing would reach the teacher"
    ):
        TerraFMPretrainModule(**kwargs)
    model = TerraFMPretrainModule(**TINY)
    model.teacher.backbone.set_grad_checkpointing()
    with pytest.raises(ValueError, match=r"^grad_checkpointing is on in the teacher"):
        model.configure_model()
    with pytest.raises(ValueError, match=r"grad_checkpointing=-1: use true"):
        TerraFMPretrainModule(**{**TINY, "grad_checkpointing": -1})
