"""timm's model protocol through timm's own entry points (create_model, data config, features)."""

import logging

import pytest
import timm
import torch
from timm.data import resolve_model_data_config

from terrafm_lightning.bands import CHANNEL_TABLE
from terrafm_lightning.modalities import BANDS, L1C13_STATS, SSL4EO_STATS
from terrafm_lightning.models import TerraFM
from tests.conftest import shared_path
from tests.generators.weights import write_released


def create(**kwargs):
    return timm.create_model("terrafm_tiny", **{"depth": 2, **kwargs}).eval()


def test_classifier_pooling_and_head():
    torch.manual_seed(0)
    model = create(num_classes=10)
    x = torch.randn(2, 12, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 4, 192)
        pooled = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, tokens[:, 0])
        torch.testing.assert_close(model(x), model.head(pooled))
    assert model(x).shape == (2, 10) and model.num_classes == 10 and model.num_features == 192
    assert model.get_classifier() is model.head and model.head.out_features == 10
    model.reset_classifier(0, "avg")
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.global_pool == "avg"
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x)[:, 1:].mean(1))
    with pytest.raises(ValueError, match=r"global_pool='max'; accepted: \['token', 'avg'\]"):
        model.reset_classifier(3, "max")


def test_data_config_is_the_default_modality_not_imagenet():
    config = resolve_model_data_config(create())
    assert config["input_size"] == (12, 224, 224)
    assert config["mean"] == SSL4EO_STATS["s2_l2a"]["mean"]
    assert config["std"] == SSL4EO_STATS["s2_l2a"]["std"]
    l1c = resolve_model_data_config(create(in_chans=13))
    assert l1c["input_size"] == (13, 224, 224) and l1c["mean"] == L1C13_STATS["mean"]
    s1 = resolve_model_data_config(create(default_modality="s1"))
    assert s1["input_size"] == (2, 224, 224) and s1["mean"] == SSL4EO_STATS["s1"]["mean"]
    rgb = resolve_model_data_config(create(bands=["B04", "B03", "B02"]))
    assert rgb["mean"] == tuple(SSL4EO_STATS["s2_l2a"]["mean"][i] for i in (3, 2, 1))
    cfg = create().pretrained_cfg
    assert cfg["modalities"]["s1"]["bands"] == ["VV", "VH"]
    assert cfg["bands"] == list(BANDS["s2_l2a"])


def test_forward_intermediates_keywords():
    model = create()
    x = torch.randn(2, 12, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=2)
        only = model.forward_intermediates(x, indices=[-1], intermediates_only=True, norm=True)
        nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        prefixed = model.forward_intermediates(
            x, indices=[0], intermediates_only=True, return_prefix_tokens=True
        )
    torch.testing.assert_close(final, model.forward_features(x))
    assert [m.shape for m in maps] == [(2, 192, 2, 2)] * 2
    # The normed last map is forward_features' patch tokens laid out as a grid.
    torch.testing.assert_close(only[0].flatten(2).transpose(1, 2), final[:, 1:])
    torch.testing.assert_close(nlc[0], maps[1].flatten(2).transpose(1, 2))
    spatial, cls = prefixed[0]
    torch.testing.assert_close(spatial, maps[0])
    assert cls.shape == (2, 1, 192)
    with pytest.raises(ValueError, match=r"\[5\]: this model has 2 blocks; accepted 0..1"):
        model.forward_intermediates(x, indices=[5])


def test_features_only_and_pruning():
    features = timm.create_model("terrafm_tiny", depth=4, features_only=True, out_indices=(1, -1))
    assert features.feature_info.channels() == [192, 192]
    assert features.feature_info.reduction() == [16, 16]
    x = torch.randn(2, 12, 48, 48)
    maps = features(x)
    assert [m.shape for m in maps] == [(2, 192, 3, 3)] * 2
    full = create(depth=4)
    full.load_state_dict(features.model.state_dict(), strict=False)
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    torch.testing.assert_close([m.detach() for m in maps], expected)
    model = create(depth=4, num_classes=3)
    assert model.prune_intermediate_layers([1], prune_norm=True) == [1]
    assert len(model.blocks) == 2 and model.num_classes == 0
    assert isinstance(model.norm, torch.nn.Identity)
    with pytest.raises(ValueError, match=r"out_indices \[4\]: this model has 4 blocks"):
        timm.create_model("terrafm_tiny", depth=4, features_only=True, out_indices=(4,))


def test_grad_checkpointing_keeps_outputs_and_gradients():
    # set_grad_checkpointing comes with the ssl branch (TerraFM.set_grad_checkpointing).
    torch.manual_seed(0)
    model = create().train()
    x = torch.randn(2, 12, 32, 32)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out = model(x)
    model.zero_grad()
    model.set_grad_checkpointing(True)
    checkpointed = model(x)
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, out)
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad)


def test_in_chans_table_and_bad_input():
    for count, (modality, bands) in CHANNEL_TABLE.items():
        model = create(in_chans=count)
        assert (model.default_modality, model.input_bands) == (modality, bands)
    with pytest.raises(ValueError, match=r"in_chans=5 is not accepted; accepted: 12 -> s2_l2a"):
        create(in_chans=5)
    with pytest.raises(ValueError, match=r"bands \['B99'\] are not s2_l2a bands; accepted"):
        create(bands=["B04", "B99"])
    with pytest.raises(ValueError, match=r"in_chans=4 but 3 bands"):
        create(in_chans=4, bands=["B04", "B03", "B02"])
    with pytest.raises(ValueError, match=r"expected a \(B, 12, H, W\) tensor"):
        create()(torch.randn(1, 3, 32, 32))


def test_pretrained_file_in_the_release_layout_loads_offline(tmp_path, caplog):
    manifest = shared_path("reference", "terrafm_checkpoint_keys.json")
    path = write_released(manifest, tmp_path / "TerraFM-Ti.pth")
    released = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    initial = timm.create_model("terrafm_tiny").patch_embed.fusion.queries.detach().clone()
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        model = timm.create_model(
            "terrafm_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
        )
    assert isinstance(model, TerraFM)
    own = model.state_dict()
    for key, value in released.items():
        torch.testing.assert_close(own[key], value)
    fusion = ["patch_embed.fusion.key.weight", "patch_embed.fusion.queries"]
    fusion.append("patch_embed.fusion.score")
    assert model.released_missing_keys == fusion
    assert "patch_embed.fusion.queries" in caplog.text
    torch.testing.assert_close(model.patch_embed.fusion.queries, initial)
    # A new classifier is kept at its initialisation and reported likewise.
    classifier = timm.create_model(
        "terrafm_tiny", pretrained=True, num_classes=4, pretrained_cfg_overlay={"file": str(path)}
    )
    assert classifier.released_missing_keys == ["head.bias", "head.weight", *fusion]
    with pytest.raises(ValueError, match=r"width 192 with 12 blocks; this model has width 384"):
        timm.create_model(
            "terrafm_small", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
        )
