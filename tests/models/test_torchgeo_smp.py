"""TerraFM through torchgeo's trainers and smp's DPT, by their own entry points."""

import pytest
import segmentation_models_pytorch as smp
import torch
from torchgeo.trainers import ClassificationTask, SemanticSegmentationTask

import terrafm_lightning.models  # noqa: F401  (registers terrafm_* in timm)
from terrafm_lightning.cli import main
from terrafm_lightning.models import terrafm_tiny
from tests.generators.weights import write_pretraining_checkpoint
from tests.models.fast_fit import fast_dev_fit


def classification_batches():
    generator = torch.Generator().manual_seed(0)
    return [
        {"image": torch.randn(2, 12, 32, 32, generator=generator), "label": torch.tensor([0, 2])}
    ]


def segmentation_batches():
    generator = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 3, (2, 32, 32), generator=generator)
    return [{"image": torch.randn(2, 12, 32, 32, generator=generator), "mask": mask}]


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_torchgeo_classification_trains(freeze_backbone):
    task = ClassificationTask(
        model="terrafm_tiny", in_channels=12, num_classes=3, freeze_backbone=freeze_backbone
    )
    before = snapshot(task.model)
    trainer = fast_dev_fit(task, classification_batches())
    assert trainer.state.finished and task.model.head.out_features == 3
    moved = changed(before, task.model)
    assert {"head.weight", "head.bias"} <= moved
    # Frozen: only the classifier moves; else the backbone trains too.
    assert (moved == {"head.weight", "head.bias"}) is freeze_backbone


def test_torchgeo_dpt_segmentation_trains():
    task = SemanticSegmentationTask(
        model="dpt", backbone="tu-terrafm_tiny", in_channels=12, num_classes=3
    )
    before = snapshot(task.model)
    trainer = fast_dev_fit(task, segmentation_batches())
    assert trainer.state.finished
    assert "encoder.model.blocks.0.attn.qkv.weight" in changed(before, task.model)


def test_smp_dpt_forward():
    model = smp.DPT(encoder_name="tu-terrafm_tiny", encoder_weights=None, in_channels=13, classes=4)
    assert model.encoder.model.default_modality == "s2_l1c"
    with torch.no_grad():
        assert model(torch.randn(2, 13, 64, 64)).shape == (2, 4, 64, 64)


@pytest.mark.parametrize("task_name", ["classification", "segmentation"])
def test_export_backbone_torchgeo_weights_land_in_the_model(tmp_path, capsys, task_name):
    torch.manual_seed(0)
    teacher, student = terrafm_tiny().state_dict(), terrafm_tiny().state_dict()
    ckpt = write_pretraining_checkpoint(tmp_path / "last.ckpt", "terrafm_tiny", teacher, student)
    out = tmp_path / "torchgeo.ckpt"
    main(["export-backbone", "--ckpt", str(ckpt), "--out", str(out), "--torchgeo", task_name])
    assert capsys.readouterr().out.strip() == str(out)
    if task_name == "classification":
        task = ClassificationTask(model="terrafm_tiny", in_channels=12, num_classes=3, weights=out)
        loaded = task.model.state_dict()
    else:
        task = SemanticSegmentationTask(
            model="dpt", backbone="tu-terrafm_tiny", in_channels=12, num_classes=3, weights=out
        )
        loaded = task.model.encoder.model.state_dict()
    for key, value in teacher.items():
        torch.testing.assert_close(loaded[key], value)
    assert not torch.equal(loaded["blocks.0.attn.qkv.weight"], student["blocks.0.attn.qkv.weight"])
