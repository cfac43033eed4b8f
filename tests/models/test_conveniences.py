"""timm-style conveniences and release-exact details of the backbone."""

from __future__ import annotations

import pytest
import timm
import torch

from terrafm_lightning.modalities import BANDS, SSL4EO_STATS
from terrafm_lightning.models import export_released_weights, terrafm_tiny
from tests.models.reference import ReferenceTerraFM


def test_one_modality_tensor_call_equals_the_dict_call() -> None:
    model = terrafm_tiny(depth=1).eval()
    x = torch.randn(2, 12, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, modality="s2_l2a"), model({"s2_l2a": x}))
        assert not torch.allclose(model(x, modality="s2_l2a"), model(x, modality="s2_l1c"))
        # A plain tensor goes to the default modality (S2 L2A for 12 channels).
        torch.testing.assert_close(model(x), model({"s2_l2a": x}))


@pytest.mark.parametrize("name", ["terrafm_tiny", "terrafm_small", "terrafm_base", "terrafm_large"])
def test_pretrained_cfg_records_bands_order_and_normalisation(name: str) -> None:
    cfg = timm.create_model(name, depth=1, modalities=["s1", "s2_l2a"]).pretrained_cfg
    assert cfg["architecture"] == name and cfg["input_size"][1:] == (224, 224)
    assert list(cfg["modalities"]) == ["s1", "s2_l2a"]
    assert cfg["modalities"]["s2_l2a"]["bands"][8] == "B8A"
    for m, entry in cfg["modalities"].items():
        assert entry["bands"] == list(BANDS[m])
        assert entry["mean"] == list(SSL4EO_STATS[m]["mean"]) and len(entry["std"]) == len(BANDS[m])


def test_shared_projection_layernorm_eps_is_the_release_default() -> None:
    ours = terrafm_tiny(depth=1).eval()
    reference = ReferenceTerraFM(embed_dim=192, depth=1, num_heads=3).eval()
    assert reference.patch_embed.projection.norm_input.eps == 1e-5
    # Tiny token variance makes the LayerNorm eps visible in the output.
    with torch.no_grad():
        ours.patch_embed.projection.proj1.weight.mul_(1e-3)
    reference.load_state_dict(export_released_weights(ours))
    x = torch.randn(2, 12, 32, 32) * 1e-2
    with torch.no_grad():
        torch.testing.assert_close(ours(x, modality="s2_l2a"), reference(x, "s2_l2a"))


def test_stems_keep_pytorch_default_conv_init() -> None:
    torch.manual_seed(0)
    stem = terrafm_tiny(depth=1).patch_embed.conv2d_s2_l2a
    fan_in = 12 * 16 * 16
    # kaiming_uniform(a=sqrt(5)) bounds weights and biases by 1 / sqrt(fan_in).
    bound = fan_in**-0.5
    assert stem.weight.abs().max() <= bound and stem.weight.abs().max() > 0.9 * bound
    assert stem.bias.abs().max() <= bound and stem.bias.abs().max() > 0.5 * bound
