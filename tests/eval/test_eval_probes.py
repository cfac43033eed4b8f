import pytest
import torch
from lightning import Trainer
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from terrafm_lightning.eval import FineTune, LinearProbe, SegmentationProbe
from terrafm_lightning.eval.datasets import (
    BigEarthNetDataModule,
    EuroSATDataModule,
    Sen1Floods11DataModule,
)
from terrafm_lightning.eval.features import SplitFeatures
from terrafm_lightning.eval.linear_probe import LinearHead, linear_probe_on_features
from terrafm_lightning.eval.task import BackboneTask
from terrafm_lightning.models import export_released_weights
from tests.generators.benchmarks import (
    pretraining_checkpoint,
    write_bigearthnet,
    write_eurosat,
    write_sen1floods11,
)

TINY = {"backbone": "terrafm_tiny", "backbone_kwargs": {"depth": 2}}


def trainer(epochs=1, **kwargs):
    return Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


@torch.no_grad()
def predictions(module, loader):
    """The module's outputs and the labels over a whole loader (eval mode)."""
    module.eval()
    outputs, labels = zip(
        *(
            (
                module(batch, batch["label"].shape[-2:])
                if batch["label"].ndim == 3
                else module(batch),
                batch["label"],
            )
            for batch in loader
        ),
        strict=True,
    )
    return torch.cat(outputs), torch.cat(labels)


def same_weights(a, b):
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_backbone_from_teacher_student_released_or_random(tmp_path):
    teacher, student = pretraining_checkpoint(tmp_path / "pre.ckpt")
    from_teacher = BackboneTask(checkpoint=str(tmp_path / "pre.ckpt")).backbone
    from_student = BackboneTask(
        checkpoint=str(tmp_path / "pre.ckpt"), checkpoint_branch="student"
    ).backbone
    assert len(from_teacher.blocks) == 2  # architecture from the checkpoint's hyper-parameters
    assert same_weights(from_teacher, teacher) and same_weights(from_student, student)
    assert not same_weights(from_teacher, from_student)
    torch.save(export_released_weights(teacher), tmp_path / "TerraFM-Ti.pth")
    released = BackboneTask(released_weights=str(tmp_path / "TerraFM-Ti.pth"), **TINY).backbone
    for name, tensor in export_released_weights(teacher).items():
        assert torch.equal(released.state_dict()[name], tensor)
    assert not same_weights(BackboneTask(**TINY).backbone, teacher)


def test_backbone_source_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        BackboneTask(checkpoint=str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"no 'teacher.backbone.\*' tensors.*\['model'\]"):
        BackboneTask(checkpoint=str(tmp_path / "other.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt: not a readable checkpoint"):
        BackboneTask(checkpoint=str(tmp_path / "junk.ckpt"))
    pretraining_checkpoint(tmp_path / "pre.ckpt")
    with pytest.raises(ValueError, match="'teacher' or 'student'"):
        BackboneTask(checkpoint=str(tmp_path / "pre.ckpt"), checkpoint_branch="ema")
    with pytest.raises(ValueError, match="either checkpoint or released_weights"):
        BackboneTask(checkpoint="a", released_weights="b")


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    return write_eurosat(tmp_path_factory.mktemp("eurosat"), per_class=3, size=32)


def test_linear_probe_learns_with_a_frozen_backbone(eurosat, tmp_path):
    pretraining_checkpoint(tmp_path / "pre.ckpt", drop_path_rate=0.5)
    dm = EuroSATDataModule(eurosat, batch_size=10)
    probe = LinearProbe(dm.num_classes, lr=0.05, checkpoint=str(tmp_path / "pre.ckpt"))
    before = {k: v.clone() for k, v in probe.backbone.state_dict().items()}
    probe.train()
    assert not probe.backbone.training and probe.head.training  # norms / drop-path in eval
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    t = trainer(epochs=40, check_val_every_n_epoch=40)
    t.fit(probe, datamodule=dm)
    test = t.test(probe, datamodule=dm, verbose=False)[0]
    assert all(torch.equal(before[k], v) for k, v in probe.backbone.state_dict().items())
    # >= 7 of 10 test tiles (float32 makes 7/10 0.69999999).
    assert test["test/top1"] >= 0.7 - 1e-6
    logits, labels = predictions(probe, dm.test_dataloader())
    assert test["test/top1"] == pytest.approx(
        float(MulticlassAccuracy(10, average="micro")(logits, labels))
    )
    assert test["test/f1_macro"] == pytest.approx(float(MulticlassF1Score(10)(logits, labels)))


def test_linear_probe_cls_mean_and_bad_pooling():
    probe = LinearProbe(3, pooling="cls_mean", **TINY)
    assert probe.head.in_features == 2 * 192
    batch = {"s2_l2a": torch.randn(2, 12, 32, 32), "s1": torch.randn(2, 2, 32, 32)}  # fusion
    assert probe(batch).shape == (2, 3)
    with pytest.raises(ValueError, match="pooling"):
        LinearProbe(3, pooling="max", **TINY)


def test_multilabel_linear_probe_on_bigearthnet_s1_s2_fusion(tmp_path):
    dm = BigEarthNetDataModule(
        write_bigearthnet(tmp_path),
        modalities=["s2_l2a", "s1"],
        batch_size=4,
        img_size=32,
        split_seed=0,
    )
    probe = LinearProbe(dm.num_classes, dm.multilabel, **TINY)
    with pytest.warns(UserWarning, match="no official split"):
        dm.setup()
    t = trainer(epochs=2)
    t.fit(probe, datamodule=dm)
    test = t.test(probe, datamodule=dm, verbose=False)[0]
    logits, labels = predictions(probe, dm.test_dataloader())
    probs, labels = logits.sigmoid(), labels.long()
    assert test["test/f1_micro"] == pytest.approx(
        float(MultilabelF1Score(19, average="micro")(probs, labels))
    )
    assert test["test/f1_macro"] == pytest.approx(
        float(MultilabelF1Score(19, average="macro")(probs, labels))
    )
    assert test["test/map"] == pytest.approx(float(MultilabelAveragePrecision(19)(probs, labels)))


def test_finetune_layer_decay_and_unfrozen_backbone(eurosat):
    model = FineTune(num_classes=10, layer_decay=0.5, lr=1e-3, **TINY)
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())
    groups = model.param_groups()
    lr_of = {}
    for group in groups:
        for p in group["params"]:
            lr_of[id(p)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    lr = lambda name: lr_of[id(named[name])][0]  # noqa: E731
    assert lr("head.weight") == pytest.approx(1e-3)
    # timm convention: the final norm shares the last block's group.
    assert (
        lr("backbone.norm.weight") == lr("backbone.blocks.1.attn.qkv.weight") == pytest.approx(5e-4)
    )
    assert lr("backbone.blocks.0.attn.qkv.weight") == pytest.approx(2.5e-4)
    assert lr("backbone.patch_embed.conv2d_s1.weight") == pytest.approx(1.25e-4)
    assert (
        lr("backbone.pos_embed")
        == lr("backbone.cls_token")
        == lr("backbone.patch_embed.conv2d_s1.weight")
    )
    assert lr_of[id(named["backbone.pos_embed"])][1] == 0  # no weight decay
    assert lr_of[id(named["backbone.blocks.0.attn.qkv.weight"])][1] == 0.05
    before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    trainer(epochs=1, limit_train_batches=2, limit_val_batches=1).fit(
        model, datamodule=EuroSATDataModule(eurosat, batch_size=8)
    )
    assert not torch.equal(before, model.backbone.blocks[0].attn.qkv.weight)


@pytest.fixture(scope="module")
def floods(tmp_path_factory):
    return write_sen1floods11(tmp_path_factory.mktemp("floods"), n=5, size=32)


@pytest.mark.parametrize("head", ["linear", "upernet"])
def test_segmentation_probe_shapes_and_training(floods, head):
    dm = Sen1Floods11DataModule(floods, modalities=["s1"], batch_size=3)
    probe = SegmentationProbe(
        dm.num_classes, dm.ignore_index, head=head, decoder_channels=32, lr=0.01, **TINY
    )
    batch = {"s1": torch.randn(2, 2, 32, 32)}
    assert probe(batch).shape == (2, 2, 32, 32)
    assert probe(batch, size=(20, 24)).shape == (2, 2, 20, 24)  # the label grid
    t = trainer(epochs=2)
    t.fit(probe, datamodule=dm)
    test = t.test(probe, datamodule=dm, verbose=False)[0]
    logits, labels = predictions(probe, dm.test_dataloader())
    miou = MulticlassJaccardIndex(2, ignore_index=-1)(logits, labels)
    pixel_acc = MulticlassAccuracy(2, average="micro", ignore_index=-1)(logits, labels)
    assert test["test/miou"] == pytest.approx(float(miou))
    assert test["test/pixel_acc"] == pytest.approx(float(pixel_acc))
    if head == "upernet":
        assert probe.block_indices == [0, 0, 1, 1]


def test_segmentation_ignore_index_is_excluded():
    probe = SegmentationProbe(2, ignore_index=-1, **TINY)
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = 10.0  # confident class 0 everywhere
    labels = torch.tensor([[[0, 0], [-1, -1]]])
    assert probe.loss(logits, labels) < 1e-3  # the ignored pixels would cost ~10 each
    probe.metrics["val"].update(logits, torch.tensor([[[0, 1], [-1, -1]]]))
    # Class 0: 1 hit, 1 false positive -> IoU 1/2; class 1: missed -> 0; ignored pixels: none.
    assert probe.metrics["val"].compute()["miou"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="head"):
        SegmentationProbe(2, head="fcn", **TINY)


def test_backbone_kwargs_that_contradict_the_checkpoint_are_refused(tmp_path):
    pretraining_checkpoint(tmp_path / "pre.ckpt")  # depth 2, embed_dim 192, 3 modalities
    path = str(tmp_path / "pre.ckpt")
    for key, value, have in (
        ("depth", 4, "2"),
        ("embed_dim", 384, "192"),
        ("modalities", ["s1"], "['s1', 's2_l1c', 's2_l2a']"),
    ):
        with pytest.raises(ValueError) as err:
            BackboneTask(checkpoint=path, backbone_kwargs={key: value})
        assert str(err.value) == (
            f"{path}: the checkpoint's backbone has {key}={have}, backbone_kwargs asks "
            f"{key}={value}; remove {key} from backbone_kwargs (the checkpoint sets the "
            "architecture) or give a checkpoint of that architecture"
        )
    same = {"depth": 2, "embed_dim": 192, "modalities": ["s2_l2a", "s1", "s2_l1c"]}
    task = BackboneTask(checkpoint=path, backbone_kwargs={**same, "drop_path_rate": 0.0})
    assert len(task.backbone.blocks) == 2


def test_linear_probe_on_separable_features_is_exact():
    centres = torch.eye(4) * 10
    train_y, test_y = torch.arange(4).repeat(5), torch.arange(4).repeat(2)
    train = SplitFeatures(centres[train_y] + 0.1 * torch.randn(20, 4), train_y)
    test = SplitFeatures(centres[test_y] + 0.1 * torch.randn(8, 4), test_y)
    assert linear_probe_on_features(train, test, 4, steps=100) == {"top1": 1.0, "f1_macro": 1.0}
    multi = SplitFeatures(train.features, torch.eye(4)[train_y])
    got = linear_probe_on_features(multi, SplitFeatures(test.features, torch.eye(4)[test_y]), 4,
                                   multilabel=True, steps=200)  # fmt: skip
    assert got == {"f1_micro": 1.0, "f1_macro": 1.0, "map": 1.0}


def test_linear_head_loss_and_scores():
    head = LinearHead(3, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        head.weight, 0.01 * torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    )
    assert torch.equal(head.bias, torch.zeros(2))
    logits = torch.tensor([[2.0, -1.0]])
    assert head.loss(logits, torch.tensor([0])) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.tensor([0])))
    )
    assert torch.equal(head.scores(logits), logits)
    multi = LinearHead(3, 2, multilabel=True)
    assert torch.equal(multi.scores(logits), logits.sigmoid())
    assert multi.loss(logits, torch.tensor([[1, 0]])) == pytest.approx(
        float(
            torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0]]))
        )
    )
