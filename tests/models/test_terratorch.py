"""TerraFM in terratorch: registry, backbone contract, EncoderDecoderFactory + UPerNet, a fit."""

import subprocess
import sys

import pytest
import torch

from terrafm_lightning.models import export_released_weights, terrafm_tiny

# Imported before terratorch itself, which sets torch's float32 matmul precision to "medium" for
# the whole process on import; our module restores it (terratorch is imported in the tests).
from terrafm_lightning.models.terratorch import TerraFMBackbone
from terrafm_lightning.ssl.checkpoint import backbone_payload
from tests.models.fast_fit import fast_dev_fit

NECKS = [
    {"name": "SelectIndices", "indices": [0, 1, 2, 3]},
    {"name": "LearnedInterpolateToPyramidal"},
]


CUSTOM_MODULE_CHECK = """
import sys
from terratorch.cli_tools import import_custom_modules
from terratorch.registry import BACKBONE_REGISTRY
before = "terrafm_tiny" in BACKBONE_REGISTRY
import_custom_modules(sys.argv[1])
print(before, BACKBONE_REGISTRY.build("terrafm_tiny", depth=1).out_channels)
"""


def test_importing_the_backbones_keeps_torch_matmul_precision():
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.slow
def test_custom_module_folder_registers_the_backbones(tmp_path):
    # terratorch's mechanism behind `custom_modules_path: <folder>` in a `terratorch fit` YAML,
    # in a fresh interpreter (this test module has registered them already).
    folder = tmp_path / "terrafm_modules"
    folder.mkdir()
    (folder / "__init__.py").write_text("import terrafm_lightning.models.terratorch  # noqa\n")
    result = subprocess.run(
        [sys.executable, "-c", CUSTOM_MODULE_CHECK, str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False [192]"


def test_backbone_contract_tensor_and_modality_dict():
    from terratorch.registry import BACKBONE_REGISTRY

    backbone = BACKBONE_REGISTRY.build("terrafm_tiny", depth=3)
    assert isinstance(backbone, TerraFMBackbone) and backbone.out_channels == [192] * 3
    x = torch.randn(2, 12, 32, 32)
    with torch.no_grad():
        maps = backbone(x)
        by_our_name = backbone({"s2_l2a": x})
        by_terratorch_name = backbone({"S2L2A": x})
        fused = backbone({"S2L2A": x, "S1RTC": torch.randn(2, 2, 32, 32)})
    assert [m.shape for m in maps] == [(2, 192, 2, 2)] * 3
    torch.testing.assert_close(by_our_name, maps)
    torch.testing.assert_close(by_terratorch_name, maps)
    assert not torch.allclose(fused[-1], maps[-1])


@pytest.mark.parametrize("layout", ["export", "released"])
def test_ckpt_path_loads_our_export_or_the_release(tmp_path, layout):
    from terratorch.registry import BACKBONE_REGISTRY

    torch.manual_seed(0)
    source = terrafm_tiny(depth=2)
    path = tmp_path / f"{layout}.pth"
    if layout == "export":
        torch.save(backbone_payload("terrafm_tiny", {"depth": 2}, source.state_dict()), path)
    else:
        torch.save(export_released_weights(source), path)
    backbone = BACKBONE_REGISTRY.build("terrafm_tiny", depth=2, ckpt_path=str(path))
    loaded = backbone.model.state_dict()
    expected = source.state_dict() if layout == "export" else export_released_weights(source)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value)


def test_encoder_decoder_factory_builds_upernet():
    from terratorch.models import EncoderDecoderFactory

    model = EncoderDecoderFactory().build_model(
        task="segmentation",
        backbone="terrafm_tiny",
        backbone_depth=4,
        necks=NECKS,
        decoder="UperNetDecoder",
        decoder_channels=32,
        num_classes=3,
    )
    with torch.no_grad():
        assert model(torch.randn(2, 12, 32, 32)).output.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("dict_input", [False, True])
def test_semantic_segmentation_task_fits(dict_input):
    from terratorch.tasks import SemanticSegmentationTask

    model_args = {
        "backbone": "terrafm_tiny",
        "backbone_depth": 4,
        "necks": NECKS,
        "decoder": "UperNetDecoder",
        "decoder_channels": 32,
        "num_classes": 3,
    }
    task = SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory", model_args=model_args, loss="ce", ignore_index=-1
    )
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 12, 32, 32, generator=generator)
    if dict_input:
        image = {"S2L2A": image, "S1RTC": torch.randn(2, 2, 32, 32, generator=generator)}
    batches = [{"image": image, "mask": torch.randint(0, 3, (2, 32, 32), generator=generator)}]
    stem = task.model.encoder.model.patch_embed.conv2d_s1.weight.detach().clone()
    trainer = fast_dev_fit(task, batches)
    assert trainer.state.finished and "train/loss" in trainer.callback_metrics
    # The S1 stem trains exactly when the dict input carries S1 (fusion of both modalities).
    s1_trained = not torch.equal(task.model.encoder.model.patch_embed.conv2d_s1.weight, stem)
    assert s1_trained is dict_input
