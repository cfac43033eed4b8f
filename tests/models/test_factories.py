"""One contract test over every registered ``terrafm_*`` factory (timm's test_models idea).

Each factory is built through timm with its real width and heads but one block (the blocks are
identical, so depth adds time, not coverage), and must honour the backbone interface of
docs/contracts.md for every modality and for fusion.
"""

import pytest
import timm
import torch

from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.models import TerraFM

FACTORIES = timm.list_models("terrafm_*")


def test_every_size_is_registered():
    assert set(FACTORIES) >= {"terrafm_tiny", "terrafm_small", "terrafm_base", "terrafm_large"}


@pytest.mark.parametrize("name", FACTORIES)
def test_factory_contract(name):
    model = timm.create_model(name, depth=1).eval()
    assert isinstance(model, TerraFM)
    d = model.embed_dim
    assert d % model.blocks[0].attn.num_heads == 0
    inputs = {m: torch.randn(2, len(BANDS[m]), 32, 32) for m in MODALITIES}
    presence = torch.tensor([[True, False, False], [True, True, True]])
    with torch.no_grad():
        for j, m in enumerate(MODALITIES):
            alone = torch.zeros(2, len(MODALITIES), dtype=torch.bool)
            alone[:, j] = True
            assert model({m: inputs[m]}, alone).shape == (2, d)
        cls = model(inputs, presence)
        tokens = model.forward_features(inputs, presence)
        maps = model.forward_intermediates(inputs, presence, indices=1, intermediates_only=True)
    assert cls.shape == (2, d) and torch.isfinite(cls).all()
    assert tokens.shape == (2, 1 + 4, d)
    torch.testing.assert_close(tokens[:, 0], cls)
    assert len(maps) == 1 and maps[0].shape == (2, d, 2, 2)
    assert {"cls_token", "pos_embed"} <= model.no_weight_decay()


@pytest.mark.parametrize("name", ["terrafm_tiny", "terrafm_small"])
def test_sizes_without_released_weights_say_so(name):
    with pytest.raises(RuntimeError, match=f"No pretrained weights exist for {name}"):
        timm.create_model(name, pretrained=True)


def test_released_sizes_are_listed_with_their_hub_files():
    assert timm.list_models("terrafm*", pretrained=True) == [
        "terrafm_base.release",
        "terrafm_large.release",
    ]
    for name, file in [("terrafm_base", "TerraFM-B.pth"), ("terrafm_large", "TerraFM-L.pth")]:
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ("MBZUAI/TerraFM", file)
