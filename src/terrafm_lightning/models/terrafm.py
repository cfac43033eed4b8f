"""The TerraFM backbone: modality-specific stems + fusion in front of a pre-norm ViT."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from terrafm_lightning.batch import require
from terrafm_lightning.modalities import BANDS, MODALITIES, SSL4EO_STATS, UNITS
from terrafm_lightning.models.patch_embed import ModalityPatchEmbed


class TerraFMBlock(Block):
    """The timm pre-norm ViT block (no dropout) that can also run crop sets of different sizes.

    Packed, the tokens of all crop sets are the rows of one (R, d) tensor: the row-wise parts
    (norms, qkv, projection, MLP, residuals) run once over all rows, attention per crop set, and
    drop-path per sample (one draw for both branches). Without drop-path the values are those of
    one call per crop set; with it, only the random draws differ.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float,
        norm_layer: type[nn.Module],
    ) -> None:
        super().__init__(
            dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path, norm_layer=norm_layer
        )
        # timm's Dropout(p=0) modules would still dispatch an op per call.
        self.attn.proj_drop = self.mlp.drop1 = self.mlp.drop2 = nn.Identity()

    def forward(
        self,
        x: Tensor,
        sets: Sequence[tuple[int, int]] | None = None,
        row_sample: Tensor | None = None,
    ) -> Tensor:
        """The timm forward of (B, N, d) tokens, or the forward of packed rows (R, d).

        Args:
            x: tokens (B, N, d), or packed rows (R, d).
            sets: packed only: (samples, tokens per sample) of each crop set, in row order.
            row_sample: packed only: (R,) sample of each row, numbered over all crop sets.
        """
        if sets is None:
            return super().forward(x)
        keep = self._packed_keep(x, sum(b for b, _ in sets), row_sample)
        attn = self.ls1(self._packed_attention(self.norm1(x), sets))
        x = x + (attn if keep is None else attn * keep[0])
        mlp = self.ls2(self.mlp(self.norm2(x)))
        return x + (mlp if keep is None else mlp * keep[1])

    def _packed_keep(self, x: Tensor, samples: int, row_sample: Tensor) -> Tensor | None:
        """Drop-path factors of both branches for the packed rows ``x``, (2, R, 1).

        As timm's ``DropPath`` (one draw per sample, kept paths scaled by 1 / keep-probability),
        drawn for both branches at once; None without drop-path or outside training.
        """
        if not isinstance(self.drop_path1, DropPath) or not self.training:
            return None
        keep_prob = 1.0 - self.drop_path1.drop_prob
        draws = x.new_empty(2, samples, 1).bernoulli_(keep_prob).div_(keep_prob)
        return draws[:, row_sample]

    def _packed_attention(self, x: Tensor, sets: Sequence[tuple[int, int]]) -> Tensor:
        """The timm ``Attention`` on packed rows: qkv and projection once, SDPA per crop set."""
        attn = self.attn
        out = []
        for rows, (b, n) in zip(attn.qkv(x).split([b * n for b, n in sets]), sets, strict=True):
            qkv = rows.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            y = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v)
            out.append(y.transpose(1, 2).reshape(b * n, attn.attn_dim))
        return attn.proj(attn.norm(torch.cat(out)))


class TerraFM(nn.Module):
    """TerraFM vision transformer over any subset of S1 / S2-L1C / S2-L2A inputs.

    Args:
        embed_dim: token width d.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / d.
        patch_size: stem patch size (16 in the release).
        img_size: size the position embedding is learned for (224 -> 14x14 grid).
        stem_ratio: stem width D = stem_ratio * d (3 in the release).
        num_queries: learned fusion queries (5 in the paper).
        drop_path_rate: stochastic depth of the last block (linear over depth).
        modalities: modalities to build stems for.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        img_size: int = 224,
        stem_ratio: int = 3,
        num_queries: int = 5,
        drop_path_rate: float = 0.0,
        modalities: Sequence[str] = MODALITIES,
    ) -> None:
        super().__init__()
        for m in modalities:
            if m not in BANDS:
                raise ValueError(f"unknown modality {m!r}; expected a subset of {list(MODALITIES)}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.patch_embed = ModalityPatchEmbed(
            embed_dim, stem_ratio, patch_size, num_queries, tuple(modalities)
        )
        self.modalities = self.patch_embed.modalities
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2 + 1, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            TerraFMBlock(embed_dim, num_heads, mlp_ratio, r, norm_layer) for r in rates
        )
        self.norm = norm_layer(embed_dim)
        self.grad_checkpointing = 0
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Recompute every ``every``-th block's activations in backward instead of keeping them.

        Only in training mode with gradients enabled (``torch.utils.checkpoint``, non-reentrant).
        """
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.grad_checkpointing = every if enable else 0

    def _block(self, index: int, x: Tensor, *args: object) -> Tensor:
        block = self.blocks[index]
        every = self.grad_checkpointing
        if every and index % every == 0 and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (timm convention)."""
        tokens = {f"patch_embed.{m}_embed" for m in self.modalities}
        return tokens | {
            "pos_embed",
            "cls_token",
            "patch_embed.fusion.queries",
            "patch_embed.fusion.score",
        }

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Timm layer groups (for ``param_groups_layer_decay``); see :func:`layer_group_matcher`."""
        return layer_group_matcher()

    def presence_mask(self, inputs: dict[str, Tensor], presence: Tensor | None = None) -> Tensor:
        """Validate ``inputs`` and return the (B, 3) bool presence mask.

        Raises:
            ValueError: on an empty input, an unknown modality, a wrong band count, a size that is
                not a multiple of the patch size, inconsistent shapes or an inconsistent mask.
        """
        if not inputs:
            raise ValueError(f"empty input: give at least one of {list(self.modalities)}")
        shape = None
        for m, x in inputs.items():
            if m not in self.modalities:
                raise ValueError(
                    f"unknown modality {m!r}; this model takes {list(self.modalities)}"
                )
            if x.ndim != 4 or x.shape[1] != len(BANDS[m]):
                raise ValueError(
                    f"{m}: expected (B, {len(BANDS[m])}, H, W) with bands {list(BANDS[m])}, "
                    f"got shape {tuple(x.shape)}"
                )
            h, w = x.shape[-2:]
            if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
                raise ValueError(
                    f"{m}: spatial size {h}x{w} must be a positive multiple of {self.patch_size}"
                )
            if shape is not None and (x.shape[0], h, w) != shape:
                raise ValueError(
                    f"{m}: batch and size {(x.shape[0], h, w)} differ from the other "
                    f"modalities' {shape}"
                )
            shape = (x.shape[0], h, w)
        device = next(iter(inputs.values())).device
        if presence is None:
            columns = [torch.full((shape[0],), m in inputs, device=device) for m in MODALITIES]
            return torch.stack(columns, dim=1)
        if presence.shape != (shape[0], len(MODALITIES)) or presence.dtype != torch.bool:
            raise ValueError(
                f"presence mask must be bool of shape ({shape[0]}, {len(MODALITIES)}) with "
                f"columns {list(MODALITIES)}; got {presence.dtype} {tuple(presence.shape)}"
            )
        # Value checks without a host sync (see ``require``): static shapes, compilable.
        lacking = [m for m in MODALITIES if m not in inputs]
        if lacking:
            marked = torch.stack([presence[:, MODALITIES.index(m)].any() for m in lacking])

            def message() -> str:
                names = [m for m, bad in zip(lacking, marked.tolist(), strict=True) if bad]
                return f"presence mask marks {names} present but inputs lack them"

            require(~marked, message)
        used = presence.any(dim=1)
        require(
            used,
            lambda: (
                "presence mask has no modality for samples "
                f"{torch.nonzero(~used).flatten().tolist()}"
            ),
        )
        return presence

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embedding for an ``h`` x ``w`` patch grid (DINO-style bicubic resampling)."""
        if h == w == self.grid_size:
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        n, dim = self.grid_size, grid.shape[-1]
        grid = grid.reshape(1, n, n, dim).permute(0, 3, 1, 2)
        # The +0.1 avoids floating point error in the resulting size (as in DINO).
        grid = F.interpolate(
            grid.float(), scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic"
        ).to(grid.dtype)
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(f"position grid resampled to {tuple(grid.shape[-2:])}, not {(h, w)}")
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)

    def prepare_tokens(self, inputs: dict[str, Tensor], presence: Tensor | None = None) -> Tensor:
        """Patch-embed, prepend the CLS token and add position embeddings: (B, 1+N, d)."""
        presence = self.presence_mask(inputs, presence)
        h, w = (s // self.patch_size for s in next(iter(inputs.values())).shape[-2:])
        x = self.patch_embed(inputs, presence)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.interpolate_pos_encoding(h, w)

    def forward_features(self, inputs: dict[str, Tensor], presence: Tensor | None = None) -> Tensor:
        """Normalised CLS + patch tokens, (B, 1 + H/16*W/16, d)."""
        x = self.prepare_tokens(inputs, presence)
        for index in range(len(self.blocks)):
            x = self._block(index, x)
        return self.norm(x)

    def forward_packed(
        self, inputs: Sequence[dict[str, Tensor]], presence: Sequence[Tensor | None]
    ) -> Tensor:
        """Normalised CLS features of several crop sets, (sum of their B, d), in order.

        The crop sets (e.g. global and local crops, each of one size) go through the blocks
        packed (:class:`TerraFMBlock`): the same values as one :meth:`forward` per set (up to
        the drop-path draws in training).
        """
        tokens = [self.prepare_tokens(x, p) for x, p in zip(inputs, presence, strict=True)]
        sets = [tuple(t.shape[:2]) for t in tokens]
        x = torch.cat([t.flatten(0, 1) for t in tokens])
        device, offset, row_sample = x.device, 0, []
        for b, n in sets:
            row_sample.append(torch.arange(b * n, device=device) // n + offset)
            offset += b
        row_sample = torch.cat(row_sample)
        for index in range(len(self.blocks)):
            x = self._block(index, x, sets, row_sample)
        rows = x.split([b * n for b, n in sets])
        cls = [r.view(b, n, -1)[:, 0] for r, (b, n) in zip(rows, sets, strict=True)]
        return self.norm(torch.cat(cls))

    def forward(
        self,
        inputs: dict[str, Tensor] | Tensor | Sequence[dict[str, Tensor]],
        presence: Tensor | Sequence[Tensor | None] | None = None,
        modality: str | None = None,
    ) -> Tensor:
        """Normalised CLS features, (B, d).

        ``model(x, modality="s2_l2a")`` is ``model({"s2_l2a": x})`` (one modality, timm style).
        A list of input dicts with a list of masks (crop sets of different sizes) is
        :meth:`forward_packed`; under FSDP2 it must go through this call, which gathers the
        parameters.
        """
        if isinstance(inputs, (list, tuple)):
            return self.forward_packed(inputs, presence)
        if modality is not None:
            if not isinstance(inputs, Tensor):
                raise ValueError("modality= takes one (B, C, H, W) tensor, not a dict of inputs")
            inputs = {modality: inputs}
        elif isinstance(inputs, Tensor):
            raise ValueError(
                f"a bare tensor needs modality=, one of {list(self.modalities)} "
                "(or pass a dict modality -> tensor)"
            )
        return self.forward_features(inputs, presence)[:, 0]

    def forward_intermediates(
        self,
        inputs: dict[str, Tensor],
        presence: Tensor | None = None,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
    ) -> list[Tensor]:
        """Patch-token maps of chosen blocks for dense heads.

        Args:
            inputs: modality -> (B, C, H, W).
            presence: optional (B, 3) bool mask.
            indices: last ``n`` blocks if an int, else block indices (negative allowed);
                all blocks if None.
            norm: apply the final LayerNorm to each map.

        Returns:
            One (B, d, H/16, W/16) map per selected block, in block order.
        """
        take, last = feature_take_indices(len(self.blocks), indices)
        h, w = (s // self.patch_size for s in next(iter(inputs.values())).shape[-2:])
        x = self.prepare_tokens(inputs, presence)
        maps = []
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in take:
                y = self.norm(x) if norm else x
                maps.append(y[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return maps


def layer_group_matcher(prefix: str = "") -> dict[str, Any]:
    """Timm ``group_matcher`` of a TerraFM whose parameter names start with ``prefix``.

    Layer 0 is the stem (stems, fusion, tokens, position embedding), layer i + 1 is block i and
    the final norm joins the last block (timm's ViT convention). Parameters outside the backbone
    (heads) fall into the top layer, so layer-wise lr decay leaves them at the base lr.
    """
    p = re.escape(prefix)
    return {
        "stem": rf"^{p}(?:cls_token|pos_embed|patch_embed)",
        "blocks": [(rf"^{p}blocks\.(\d+)", None), (rf"^{p}norm", (99999,))],
    }


def _init_weights(module: nn.Module) -> None:
    # As the release (DINO's ViT init): Linear layers only; the stems' Conv2d keep PyTorch's
    # default initialisation and LayerNorms their ones / zeros.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_SIZES: dict[str, dict[str, int]] = {
    "terrafm_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "terrafm_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "terrafm_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "terrafm_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


def pretrained_cfg(name: str, model: TerraFM) -> dict[str, Any]:
    """timm-style ``pretrained_cfg`` of a built model: inputs, band order and normalisation.

    ``modalities`` maps each stem's modality to its band order (the input channel order), unit
    and the documented default normalisation (:data:`SSL4EO_STATS`; a store's own ``stats``
    override them in training). Released weights are never downloaded (``url`` empty).
    """
    return {
        "architecture": name,
        "url": "",
        "hf_hub_id": None,
        "license": "apache-2.0",
        "paper_ids": "arXiv:2506.06281",
        "input_size": (
            None,
            model.grid_size * model.patch_size,
            model.grid_size * model.patch_size,
        ),
        "patch_size": model.patch_size,
        "num_classes": 0,
        "modalities": {
            m: {
                "bands": list(BANDS[m]),
                "units": UNITS[m],
                "mean": list(SSL4EO_STATS[m]["mean"]),
                "std": list(SSL4EO_STATS[m]["std"]),
            }
            for m in model.modalities
        },
    }


def _build(name: str, pretrained: bool, **kwargs: object) -> TerraFM:
    if pretrained:
        raise ValueError(
            f"{name}: no hub download; build it and call load_released_weights(model, path)"
        )
    # timm.create_model passes its own pretrained-config arguments; they do not apply here.
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = TerraFM(**{**_SIZES[name], **kwargs})
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(name, model)
    return model


@register_model
def terrafm_tiny(pretrained: bool = False, **kwargs: object) -> TerraFM:
    """TerraFM-Ti: d=192, 12 blocks, 3 heads (tests and the CPU demo)."""
    return _build("terrafm_tiny", pretrained, **kwargs)


@register_model
def terrafm_small(pretrained: bool = False, **kwargs: object) -> TerraFM:
    """TerraFM-S: d=384, 12 blocks, 6 heads."""
    return _build("terrafm_small", pretrained, **kwargs)


@register_model
def terrafm_base(pretrained: bool = False, **kwargs: object) -> TerraFM:
    """TerraFM-B: d=768, 12 blocks, 12 heads (released weights ``TerraFM-B.pth``)."""
    return _build("terrafm_base", pretrained, **kwargs)


@register_model
def terrafm_large(pretrained: bool = False, **kwargs: object) -> TerraFM:
    """TerraFM-L: d=1024, 24 blocks, 16 heads (released weights ``TerraFM-L.pth``)."""
    return _build("terrafm_large", pretrained, **kwargs)
