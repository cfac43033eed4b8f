"""TerraFM in terratorch: registry, backbone contract, EncoderDecoderFactory + UPerNet, a fit."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from terrafm_lightning.modalities import SSL4EO_STATS
from terrafm_lightning.models import export_released_weights, terrafm_tiny

# Imported before terratorch itself, which sets torch's float32 matmul precision to "medium" for
# the whole process on import; our module restores it (terratorch is imported in the tests).
from terrafm_lightning.models.terratorch import TerraFMBackbone
from terrafm_lightning.ssl.checkpoint import backbone_payload
from tests.generators.benchmarks import write_segmentation_folders
from tests.models.fast_fit import fast_dev_fit

DOC = Path(__file__).resolve().parents[2] / "docs" / "use_elsewhere.md"

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


def custom_modules_folder(folder: Path) -> Path:
    """A folder for terratorch's ``custom_modules_path`` that registers our backbones."""
    folder.mkdir()
    (folder / "__init__.py").write_text("import terrafm_lightning.models.terratorch  # noqa\n")
    return folder


def test_importing_the_backbones_keeps_torch_matmul_precision():
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.slow
def test_custom_module_folder_registers_the_backbones(tmp_path):
    # terratorch's mechanism behind `custom_modules_path: <folder>` in a `terratorch fit` YAML,
    # in a fresh interpreter (this test module has registered them already).
    folder = custom_modules_folder(tmp_path / "terrafm_modules")
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


@pytest.mark.slow
def test_terratorch_fit_cli_runs_the_documented_yaml(tmp_path):
    # terratorch's own CLI in a fresh interpreter, on the YAML of docs/use_elsewhere.md with a
    # 4-block TerraFM-Ti (no weights file) and a fast_dev_run on the CPU.
    (block,) = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    config = yaml.safe_load(block)
    data = config["data"]["init_args"]
    assert data["means"] == list(SSL4EO_STATS["s2_l2a"]["mean"])
    assert data["stds"] == list(SSL4EO_STATS["s2_l2a"]["std"])
    model_args = config["model"]["init_args"]["model_args"]
    del model_args["backbone_ckpt_path"]
    model_args.update(backbone="terrafm_tiny", backbone_depth=4, necks=NECKS)
    config["trainer"] = {
        "fast_dev_run": True,
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "detect_anomaly": True,  # a NaN in the backward pass fails the run
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelSummary",
                "init_args": {"max_depth": 2},
            }
        ],
    }
    write_segmentation_folders(tmp_path / "data", classes=data["num_classes"])
    custom_modules_folder(tmp_path / config["custom_modules_path"])
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "terratorch", "fit", "--config", "fit.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    # The model terratorch built holds our encoder with the 4 blocks asked for; one step ran.
    from terratorch.registry import BACKBONE_REGISTRY

    size = sum(p.numel() for p in BACKBONE_REGISTRY.build("terrafm_tiny", depth=4).parameters())
    row = (
        rf"model\.encoder\s*\|\s*TerraFMBackbone\s*\|\s*{re.escape(get_human_readable_count(size))}"
    )
    assert re.search(row, log), log[-4000:]
    assert "`Trainer.fit` stopped: `max_steps=1` reached." in log
