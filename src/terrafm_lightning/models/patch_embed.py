"""Modality-specific patch embedding with cross-attention fusion (TerraFM sections 2-3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from terrafm_lightning.modalities import BANDS, MODALITIES


class SharedProjection(nn.Module):
    """The shared projection psi: ``proj1`` -> LayerNorm -> ``proj2`` -> ``proj3``.

    ``proj1`` is also the value projection of the fusion attention, so :meth:`head` is psi
    without ``proj1``. The LayerNorm has PyTorch's default eps (1e-5) as in the release, unlike
    the ViT blocks' 1e-6.
    """

    def __init__(self, stem_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj1 = nn.Linear(stem_dim, stem_dim, bias=False)
        self.norm_input = nn.LayerNorm(stem_dim)
        self.proj2 = nn.Linear(stem_dim, stem_dim)
        self.proj3 = nn.Linear(stem_dim, embed_dim)

    def head(self, x: Tensor) -> Tensor:
        """Apply LayerNorm, ``proj2`` and ``proj3`` to already ``proj1``-projected tokens."""
        return self.proj3(self.proj2(self.norm_input(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Project stem tokens (..., stem_dim) to (..., embed_dim)."""
        return self.head(self.proj1(x))


class CrossModalFusion(nn.Module):
    """Per-position cross-attention of ``num_queries`` learned queries over modality tokens.

    Keys are a (pretraining-only) linear map of the stem tokens, values are ``proj1`` of them;
    a learned vector ``score`` (p_r) weights the query outputs. With one modality every query
    output equals the value, so the result is the single-modality path.
    """

    def __init__(self, stem_dim: int, num_queries: int = 5) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(num_queries, stem_dim))
        self.key = nn.Linear(stem_dim, stem_dim, bias=False)
        self.score = nn.Parameter(torch.zeros(stem_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        nn.init.trunc_normal_(self.score, std=0.02)

    def forward(self, tokens: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """Fuse modality tokens.

        Args:
            tokens: stem tokens, (B, M, N, D).
            values: ``proj1(tokens)``, (B, M, N, D).
            mask: (B, M) bool, True where the modality is present (at least one per row).

        Returns:
            Fused values, (B, N, D).
        """
        keys = self.key(tokens)
        scores = torch.einsum("bmnd,qd->bnqm", keys, self.queries) * keys.shape[-1] ** -0.5
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        outputs = torch.einsum("bnqm,bmnd->bnqd", scores.softmax(dim=-1), values)
        weights = (outputs @ self.score).softmax(dim=-1)
        return torch.einsum("bnq,bnqd->bnd", weights, outputs)


class ModalityPatchEmbed(nn.Module):
    """Per-modality 16x16 stems, modality embeddings, fusion and the shared projection.

    Parameter names follow the released checkpoint (``conv2d_<m>``, ``<m>_embed``,
    ``projection.*``); ``fusion.*`` holds the pretraining-only tensors.
    """

    def __init__(
        self,
        embed_dim: int,
        stem_ratio: int = 3,
        patch_size: int = 16,
        num_queries: int = 5,
        modalities: tuple[str, ...] = MODALITIES,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.stem_dim = stem_ratio * embed_dim
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        for m in self.modalities:
            conv = nn.Conv2d(len(BANDS[m]), self.stem_dim, patch_size, stride=patch_size)
            self.add_module(f"conv2d_{m}", conv)
            self.register_parameter(f"{m}_embed", nn.Parameter(torch.zeros(1, self.stem_dim)))
            nn.init.trunc_normal_(getattr(self, f"{m}_embed"), std=0.02)
        self.projection = SharedProjection(self.stem_dim, embed_dim)
        self.fusion = CrossModalFusion(self.stem_dim, num_queries)

    def stem(self, modality: str, x: Tensor) -> Tensor:
        """Stem tokens ``conv_m(x) + e_m`` of one modality, (B, N, stem_dim)."""
        tokens = getattr(self, f"conv2d_{modality}")(x).flatten(2).transpose(1, 2)
        return tokens + getattr(self, f"{modality}_embed")

    def forward(self, inputs: dict[str, Tensor], presence: Tensor) -> Tensor:
        """Embed a batch whose samples may carry different modality subsets.

        Args:
            inputs: modality -> (B, C, H, W); rows absent per ``presence`` are never computed.
            presence: (B, len(MODALITIES)) bool, already validated against ``inputs``.

        Returns:
            Patch tokens, (B, H/16 * W/16, embed_dim).
        """
        names = [m for m in self.modalities if m in inputs]
        cols = [MODALITIES.index(m) for m in names]
        mask = presence[:, cols]
        batch = mask.shape[0]
        if bool(mask.all()) and len(names) == 1:
            return self.projection(self.stem(names[0], inputs[names[0]]))

        first = inputs[names[0]]
        n_tokens = (first.shape[-2] // self.patch_size) * (first.shape[-1] // self.patch_size)
        tokens, values = None, None
        for j, m in enumerate(names):
            rows = mask[:, j].nonzero().squeeze(1)
            if not rows.numel():
                continue
            t = self.stem(m, inputs[m].index_select(0, rows))
            v = self.projection.proj1(t)
            if tokens is None:
                tokens = t.new_zeros(batch, len(names), n_tokens, self.stem_dim)
                values = v.new_zeros(batch, len(names), n_tokens, self.stem_dim)
            tokens[rows, j] = t
            values[rows, j] = v
        # Absent slots hold zeros, so a sum over modalities is exactly the value of a
        # single-modality sample.
        fused = values.sum(dim=1)
        multi = mask.sum(dim=1) > 1
        if bool(multi.any()):
            rows = multi.nonzero().squeeze(1)
            fused = fused.index_copy(
                0, rows, self.fusion(tokens[rows], values[rows], mask[rows]).to(fused.dtype)
            )
        return self.projection.head(fused)
