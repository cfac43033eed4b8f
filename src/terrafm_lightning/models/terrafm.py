"""The TerraFM backbone: modality-specific stems + fusion in front of a pre-norm ViT.

Besides its own call (a dict modality -> tensor with a presence mask), the model follows timm's
model protocol: a plain tensor goes to the default modality with the channel layout of
``in_chans`` / ``bands`` (:func:`~terrafm_lightning.bands.input_bands`), and ``num_classes``,
``global_pool``, ``forward_head``, ``forward_intermediates`` and ``feature_info`` behave as in
timm's ViTs. Only public timm API is used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from terrafm_lightning.bands import input_bands, stem_indices
from terrafm_lightning.batch import require
from terrafm_lightning.errors import UserError
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.models.patch_embed import ModalityPatchEmbed

POOLS = ("token", "avg")
"""``global_pool`` values: the CLS token, or the mean of the patch tokens."""


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
        num_classes: classifier outputs; 0 returns the pooled features (timm convention).
        global_pool: ``token`` (CLS) or ``avg`` (mean of the patch tokens).
        in_chans: channels of a plain tensor input: 12 (S2 L2A), 13 (S2 L1C as distributed,
            B10 dropped), 2 (S1 VV, VH); see :data:`~terrafm_lightning.bands.CHANNEL_TABLE`.
        bands: band names of a plain tensor's channels (any order or subset of the default
            modality's bands, matched by name; absent stem bands are zero, i.e. the
            normalisation mean).
        default_modality: stem that plain tensors go to (default: from ``in_chans``, else
            ``s2_l2a``).
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
        num_classes: int = 0,
        global_pool: str = "token",
        in_chans: int | None = None,
        bands: Sequence[str] | None = None,
        default_modality: str | None = None,
    ) -> None:
        super().__init__()
        for m in modalities:
            if m not in BANDS:
                raise UserError(f"unknown modality {m!r}; expected a subset of {list(MODALITIES)}")
        self.default_modality, self.input_bands = input_bands(in_chans, bands, default_modality)
        if self.default_modality not in modalities:
            raise UserError(
                f"default_modality {self.default_modality!r} has no stem; this model takes "
                f"{list(modalities)}"
            )
        self.in_chans = len(self.input_bands)
        self._register_channel_map()
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = 1
        self.has_cls_token = True
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
        self.grad_checkpointing = 0  # block period of activation checkpointing (0: off)
        self.feature_info = [
            {"num_chs": embed_dim, "reduction": patch_size, "module": f"blocks.{i}"}
            for i in range(depth)
        ]
        # The head is the last child (torchgeo's weight loading looks for the classifier there).
        self.num_classes, self.global_pool = 0, global_pool
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, global_pool)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def _register_channel_map(self) -> None:
        """Buffers that gather a plain tensor's channels into the default stem's band order."""
        indices = stem_indices(self.input_bands, self.default_modality, "bands=")
        self.identity_channels = list(indices) == list(range(self.in_chans))
        present = [j for j, i in enumerate(indices) if i is not None]
        self.register_buffer("stem_channels", torch.tensor(present), persistent=False)
        self.register_buffer(
            "input_channels", torch.tensor([indices[j] for j in present]), persistent=False
        )

    def plain_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """The input dict of a plain (B, in_chans, H, W) tensor: the default stem's bands.

        Stem bands the tensor lacks (a ``bands=`` subset) are zero, the normalisation mean.

        Raises:
            ValueError: on a tensor of another shape, naming the channel layout expected.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise UserError(
                f"expected a (B, {self.in_chans}, H, W) tensor with bands "
                f"{list(self.input_bands)} ({self.default_modality}), got shape {tuple(x.shape)}; "
                "build the model with in_chans= or bands= for another layout"
            )
        if self.identity_channels:
            return {self.default_modality: x}
        stem = x.new_zeros(x.shape[0], len(BANDS[self.default_modality]), *x.shape[-2:])
        stem[:, self.stem_channels] = x[:, self.input_channels]
        return {self.default_modality: stem}

    def _as_inputs(self, inputs: dict[str, Tensor] | Tensor) -> dict[str, Tensor]:
        return self.plain_inputs(inputs) if isinstance(inputs, Tensor) else inputs

    def get_classifier(self) -> nn.Module:
        """The classifier head (``Identity`` when ``num_classes`` is 0)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a fresh ``num_classes`` classifier (0: features), timm style.

        Raises:
            ValueError: on a ``global_pool`` other than ``token`` or ``avg``.
        """
        if global_pool is not None:
            if global_pool not in POOLS:
                raise UserError(f"global_pool={global_pool!r}; accepted: {list(POOLS)}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (timm convention)."""
        tokens = {f"patch_embed.{m}_embed" for m in self.modalities}
        return tokens | {
            "pos_embed",
            "cls_token",
            "patch_embed.fusion.queries",
            "patch_embed.fusion.score",
        }

    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Activation checkpointing of the blocks (timm's method), in both forward paths.

        Checkpointed blocks keep only their input for backward and run their forward again
        there (``torch.utils.checkpoint``, non-reentrant, random state restored so drop-path
        draws repeat): the same outputs and gradients for less activation memory.

        Args:
            enable: turn it on (off with False).
            every: checkpoint blocks 0, k, 2k, ... (1: every block).

        Raises:
            ValueError: if ``every`` < 1.
        """
        if every < 1:
            raise UserError(f"every must be >= 1 (every k-th block), got {every}")
        self.grad_checkpointing = every if enable else 0

    def _block(self, i: int, block: TerraFMBlock, *args: Any) -> Tensor:
        """Block ``i`` on ``args``, checkpointed when it is one of the checkpointed blocks."""
        k = self.grad_checkpointing
        if k and i % k == 0 and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

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
            raise UserError(f"empty input: give at least one of {list(self.modalities)}")
        shape = None
        for m, x in inputs.items():
            if m not in self.modalities:
                raise UserError(f"unknown modality {m!r}; this model takes {list(self.modalities)}")
            if x.ndim != 4 or x.shape[1] != len(BANDS[m]):
                raise UserError(
                    f"{m}: expected (B, {len(BANDS[m])}, H, W) with bands {list(BANDS[m])}, "
                    f"got shape {tuple(x.shape)}"
                )
            h, w = x.shape[-2:]
            if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
                raise UserError(
                    f"{m}: spatial size {h}x{w} must be a positive multiple of {self.patch_size}"
                )
            if shape is not None and (x.shape[0], h, w) != shape:
                raise UserError(
                    f"{m}: batch and size {(x.shape[0], h, w)} differ from the other "
                    f"modalities' {shape}"
                )
            shape = (x.shape[0], h, w)
        device = next(iter(inputs.values())).device
        if presence is None:
            columns = [torch.full((shape[0],), m in inputs, device=device) for m in MODALITIES]
            return torch.stack(columns, dim=1)
        if presence.shape != (shape[0], len(MODALITIES)) or presence.dtype != torch.bool:
            raise UserError(
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

    def forward_features(
        self, inputs: dict[str, Tensor] | Tensor, presence: Tensor | None = None
    ) -> Tensor:
        """Normalised CLS + patch tokens, (B, 1 + H/16*W/16, d), of a dict or a plain tensor."""
        x = self.prepare_tokens(self._as_inputs(inputs), presence)
        for i, block in enumerate(self.blocks):
            x = self._block(i, block, x)
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
        for i, block in enumerate(self.blocks):
            x = self._block(i, block, x, sets, row_sample)
        rows = x.split([b * n for b, n in sets])
        cls = [r.view(b, n, -1)[:, 0] for r, (b, n) in zip(rows, sets, strict=True)]
        return self.norm(torch.cat(cls))

    def forward(
        self,
        inputs: dict[str, Tensor] | Tensor | Sequence[dict[str, Tensor]],
        presence: Tensor | Sequence[Tensor | None] | None = None,
        modality: str | None = None,
    ) -> Tensor:
        """Pooled features (B, d), or logits (B, num_classes) with a classifier.

        A plain tensor goes to the default modality in the ``in_chans`` / ``bands`` layout;
        ``model(x, modality="s2_l2a")`` is ``model({"s2_l2a": x})`` (the stem's band order). A
        list of input dicts with a list of masks (crop sets of different sizes) is
        :meth:`forward_packed`; under FSDP2 it must go through this call, which gathers the
        parameters.
        """
        if isinstance(inputs, (list, tuple)):
            return self.forward_packed(inputs, presence)
        if modality is not None:
            if not isinstance(inputs, Tensor):
                raise UserError("modality= takes one (B, C, H, W) tensor, not a dict of inputs")
            inputs = {modality: inputs}
        return self.forward_head(self.forward_features(inputs, presence))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool ``forward_features`` tokens (``global_pool``) and apply the classifier.

        Args:
            x: (B, 1 + N, d) tokens.
            pre_logits: return the pooled (B, d) features without the classifier.
        """
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(1)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        inputs: dict[str, Tensor] | Tensor,
        presence: Tensor | None = None,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
        stop_early: bool = False,
    ) -> list[Any] | tuple[Tensor, list[Any]]:
        """Token maps of chosen blocks for dense heads (timm's keywords).

        Args:
            inputs: modality -> (B, C, H, W), or a plain tensor.
            presence: optional (B, 3) bool mask.
            indices: last ``n`` blocks if an int, else block indices (negative allowed);
                all blocks if None.
            norm: apply the final LayerNorm to each map.
            output_fmt: ``NCHW`` maps (B, d, H/16, W/16) or ``NLC`` tokens (B, N, d).
            intermediates_only: return only the maps, not the final features as well.
            return_prefix_tokens: give each map with its CLS token, ``(map, (B, 1, d))``.
            stop_early: with ``intermediates_only``, stop after the last selected block
                (always done then); kept for timm's signature.

        Returns:
            The maps in block order; unless ``intermediates_only``, ``(forward_features
            tokens, maps)``.

        Raises:
            ValueError: on an index beyond the depth or an unknown ``output_fmt``.
        """
        fmt = getattr(output_fmt, "value", output_fmt)
        if fmt not in ("NCHW", "NLC"):
            raise UserError(f"output_fmt={fmt!r}; accepted: 'NCHW', 'NLC'")
        take = block_indices(len(self.blocks), indices)
        inputs = self._as_inputs(inputs)
        h, w = (s // self.patch_size for s in next(iter(inputs.values())).shape[-2:])
        x = self.prepare_tokens(inputs, presence)
        last = len(self.blocks) - 1 if not intermediates_only else max(take)
        maps: list[Any] = []
        for i, block in enumerate(self.blocks[: last + 1]):
            x = block(x)
            if i in take:
                y = self.norm(x) if norm else x
                tokens = y[:, self.num_prefix_tokens :]
                if fmt == "NCHW":
                    tokens = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
                prefix = y[:, : self.num_prefix_tokens]
                maps.append((tokens, prefix) if return_prefix_tokens else tokens)
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (timm protocol); the kept indices.

        Args:
            indices: as in :meth:`forward_intermediates`.
            prune_norm: replace the final norm by an identity.
            prune_head: drop the classifier (``num_classes`` 0).
        """
        take = block_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take


def block_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Sorted non-negative block indices of ``indices`` for a model of ``depth`` blocks.

    An int ``n`` is the last ``n`` blocks; a sequence gives indices (negative from the end);
    None is all blocks.

    Raises:
        ValueError: naming an index or count beyond ``depth`` and the accepted range.
    """
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise UserError(
                f"indices={indices}: this model has {depth} blocks; accepted 1..{depth}"
            )
        return list(range(depth - indices, depth))
    bad = [i for i in indices if not -depth <= i < depth]
    if bad or not indices:
        raise UserError(
            f"indices / out_indices {list(indices)}: this model has {depth} blocks; "
            f"accepted 0..{depth - 1} or -{depth}..-1"
        )
    return sorted({i % depth for i in indices})


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
