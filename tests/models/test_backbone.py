import json

import pytest
import timm
import torch

from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.models import (
    TerraFM,
    export_released_weights,
    load_released_weights,
    terrafm_tiny,
)
from tests.conftest import shared_path
from tests.models.reference import ReferenceTerraFM


def tiny(**kwargs):
    return terrafm_tiny(depth=2, **kwargs).eval()


def make_inputs(batch=2, size=32, modalities=MODALITIES):
    return {m: torch.randn(batch, len(BANDS[m]), size, size) for m in modalities}


SUBSETS = [("s1",), ("s2_l1c",), ("s2_l2a",), ("s1", "s2_l2a"), ("s2_l1c", "s2_l2a"), MODALITIES]


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("size", [16, 64, 96])
def test_output_shapes_for_every_subset(subset, size):
    model = tiny()
    inputs = make_inputs(2, size, subset)
    n = (size // 16) ** 2
    assert model(inputs).shape == (2, 192)
    assert model.forward_features(inputs).shape == (2, 1 + n, 192)
    maps = model.forward_intermediates(inputs, indices=[0, 1], intermediates_only=True)
    assert [m.shape for m in maps] == [(2, 192, size // 16, size // 16)] * 2


@pytest.mark.parametrize(
    "name,dim", [("terrafm_small", 384), ("terrafm_base", 768), ("terrafm_large", 1024)]
)
def test_factories_registered_in_timm(name, dim):
    model = timm.create_model(name, depth=1)
    assert isinstance(model, TerraFM) and model.embed_dim == dim
    assert model(make_inputs(1, 16, ("s1",))).shape == (1, dim)


def test_mixed_presence_batch_equals_per_sample_results():
    model = tiny()
    inputs = make_inputs(4, 32)
    presence = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    # Absent rows hold garbage that must not leak into the result.
    for j, m in enumerate(MODALITIES):
        inputs[m][~presence[:, j]] = float("nan")
    batched = model(inputs, presence)
    for i in range(4):
        sample = {m: inputs[m][i : i + 1] for j, m in enumerate(MODALITIES) if presence[i, j]}
        torch.testing.assert_close(batched[i : i + 1], model(sample), rtol=1e-5, atol=1e-5)


def test_packed_crop_sets_equal_one_call_per_set():
    # Crop sets of different sizes and modalities, packed through the blocks; in float64, so
    # the gradients' different summation order stays far below the tolerance.
    torch.manual_seed(0)
    model = terrafm_tiny(depth=2).train().double()
    sets = [make_inputs(3, 32), make_inputs(5, 16, ("s1", "s2_l2a"))]
    inputs = [{m: x.double() for m, x in crops.items()} for crops in sets]
    presence = [torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool), None]
    results = []
    for packed in (False, True):
        model.zero_grad()
        if packed:
            out = model(inputs, presence)
        else:
            out = torch.cat([model(x, p) for x, p in zip(inputs, presence, strict=True)])
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    assert results[0][0].shape == (8, model.embed_dim)
    torch.testing.assert_close(results[1], results[0])


def test_packed_drop_path_draws_one_mask_per_sample():
    block = terrafm_tiny(depth=2, drop_path_rate=0.5).train().blocks[1]
    # Two crop sets: 40 samples of 5 rows, then 60 samples of 2 rows.
    row_sample = torch.cat([torch.arange(40).repeat_interleave(5), torch.arange(40, 100).repeat(2)])
    rows = torch.ones(len(row_sample), 4)
    torch.manual_seed(0)
    keep = block._packed_keep(rows, 100, row_sample)
    assert keep.shape == (2, len(row_sample), 1)
    # Every row of a sample is dropped (0) or kept and scaled by 1 / keep-probability (2) alike,
    # independently in the two branches.
    per_sample = torch.zeros(2, 100, 1).index_copy_(1, row_sample, keep)
    torch.testing.assert_close(keep, per_sample[:, row_sample])
    assert set(keep.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(keep[0], keep[1])
    assert block.eval()._packed_keep(rows, 100, row_sample) is None


def test_one_modality_fusion_equals_single_path():
    model = tiny()
    embed = model.patch_embed
    tokens = embed.stem("s2_l2a", torch.randn(3, 12, 32, 32))
    values = embed.projection.proj1(tokens)
    # Put the single modality in slot 1 of 3; the other slots carry noise but are masked.
    stacked = [torch.randn_like(tokens), tokens, torch.randn_like(tokens)]
    mask = torch.tensor([[False, True, False]] * 3)
    fused = embed.fusion(stacked, mask, embed.projection.proj1)
    torch.testing.assert_close(fused, values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        embed.projection.head(fused), embed.projection(tokens), rtol=1e-5, atol=1e-5
    )


def test_fusion_changes_output_and_gradients_reach_queries():
    model = terrafm_tiny(depth=1)
    inputs = make_inputs(2, 32, ("s1", "s2_l2a"))
    out = model(inputs)
    single = model({"s2_l2a": inputs["s2_l2a"]})
    assert not torch.allclose(out, single)
    out.square().sum().backward()
    fusion = model.patch_embed.fusion
    for p in (fusion.queries, fusion.key.weight, fusion.score):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_single_modality_batch_skips_fusion_grads():
    model = terrafm_tiny(depth=1)
    model(make_inputs(2, 32, ("s1",))).sum().backward()
    assert model.patch_embed.fusion.queries.grad is None
    assert model.patch_embed.conv2d_s2_l2a.weight.grad is None


def test_absent_modality_costs_no_stem_compute():
    # Static shapes (no host sync): a given modality's stem runs on every row once, absent rows
    # masked; a modality left out of ``inputs`` costs nothing.
    model = tiny()
    calls = {}

    def count(name):
        def hook(_module, args):
            calls[name] = args[0].shape[0]

        return hook

    for m in MODALITIES:
        getattr(model.patch_embed, f"conv2d_{m}").register_forward_pre_hook(count(m))
    presence = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    model(make_inputs(3, 32, ("s1", "s2_l2a")), presence)
    assert calls == {"s1": 3, "s2_l2a": 3}


def test_presence_checks_are_device_assertions(monkeypatch):
    # The value checks go through torch._assert_async (sync-free on accelerators), once each.
    seen = []
    real = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async", lambda t: (seen.append(t), real(t))[1])
    presence = torch.tensor([[1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    tiny()(make_inputs(2, 16, ("s1", "s2_l2a")), presence)
    assert len(seen) == 2 and all(t.dtype == torch.bool and t.ndim == 0 for t in seen)


@pytest.mark.parametrize(
    "inputs,presence,match",
    [
        ({}, None, "empty input"),
        ({"s3": torch.zeros(1, 2, 16, 16)}, None, "unknown modality 's3'"),
        (
            {"s1": torch.zeros(1, 3, 16, 16)},
            None,
            r"expected \(B, 2, H, W\) with bands \['VV', 'VH'\]",
        ),
        ({"s2_l2a": torch.zeros(1, 13, 16, 16)}, None, "got shape"),
        ({"s1": torch.zeros(1, 2, 20, 16)}, None, "multiple of 16"),
        (
            {"s1": torch.zeros(1, 2, 16, 16), "s2_l2a": torch.zeros(1, 12, 32, 32)},
            None,
            "differ",
        ),
        ({"s1": torch.zeros(2, 2, 16, 16)}, torch.ones(2, 3, dtype=torch.bool), "inputs lack"),
        (
            {"s1": torch.zeros(2, 2, 16, 16)},
            torch.tensor([[1, 0, 0], [0, 0, 0]]).bool(),
            "no modality",
        ),
        ({"s1": torch.zeros(2, 2, 16, 16)}, torch.ones(2, 2, dtype=torch.bool), "shape"),
        ({"s1": torch.zeros(2, 2, 16, 16)}, torch.ones(2, 3), "bool"),
    ],
)
def test_clear_errors(inputs, presence, match):
    with pytest.raises(ValueError, match=match):
        tiny()(inputs, presence)


def test_unknown_modality_at_construction():
    with pytest.raises(ValueError, match="unknown modality 'rgb'"):
        TerraFM(embed_dim=64, depth=1, num_heads=2, modalities=("rgb",))


def manifest():
    return json.loads(shared_path("reference", "terrafm_checkpoint_keys.json").read_text())


@pytest.mark.parametrize("name", ["terrafm_base", "terrafm_large"])
def test_release_layout_round_trip_covers_manifest(name):
    expected = {k: tuple(v) for k, v in manifest()[name].items()}
    with torch.device("meta"):
        model = timm.create_model(name)
    exported = export_released_weights(model)
    assert {k: tuple(v.shape) for k, v in exported.items()} == expected
    # Loading the released layout uses every tensor and reports only the fusion tensors missing.
    with torch.device("meta"):
        target = timm.create_model(name)
    released = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    missing = load_released_weights(target, released)
    assert missing == [
        "patch_embed.fusion.key.weight",
        "patch_embed.fusion.queries",
        "patch_embed.fusion.score",
    ]


def test_load_rejects_wrong_shape_and_unexpected_keys():
    model = tiny()
    state = export_released_weights(model)
    bad = dict(state, pos_embed=torch.zeros(1, 5, 192))
    with pytest.raises(ValueError, match="pos_embed: release"):
        load_released_weights(model, bad)
    with pytest.raises(ValueError, match="unexpected: \\['extra'\\]"):
        load_released_weights(model, dict(state, extra=torch.zeros(1)))
    state.pop("norm.weight")
    with pytest.raises(ValueError, match="missing: \\['norm.weight'\\]"):
        load_released_weights(model, state)


def test_load_from_file_and_bad_file(tmp_path):
    model = tiny()
    path = tmp_path / "TerraFM-T.pth"
    torch.save(export_released_weights(model), path)
    other = tiny()
    load_released_weights(other, path)
    x = make_inputs(1, 32, ("s2_l2a",))
    torch.testing.assert_close(model(x), other(x))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_released_weights(other, tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_released_weights(other, tmp_path / "nothere.pth")


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", [224, 64, 96, 128])
def test_features_equal_released_architecture(modality, size):
    ours = terrafm_tiny(depth=3).eval()
    reference = ReferenceTerraFM(embed_dim=192, depth=3, num_heads=3).eval()
    reference.load_state_dict(export_released_weights(ours))
    x = torch.randn(2, len(BANDS[modality]), size, size)
    with torch.no_grad():
        torch.testing.assert_close(
            ours({modality: x}), reference(x, modality), rtol=1e-5, atol=1e-5
        )


def test_l2a_goes_through_the_l2a_stem():
    model = tiny()
    x = torch.randn(1, 12, 32, 32)
    assert not torch.allclose(model({"s2_l2a": x}), model({"s2_l1c": x}))
