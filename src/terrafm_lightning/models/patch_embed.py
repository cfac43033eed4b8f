"""Modality-specific patch embedding with cross-attention fusion (TerraFM sections 2-3)."""

from __future__ import annotations

from collections.abc import Iterable

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

    Computed without keys, per-slot values or query outputs, by linearity (no bias in ``key``
    or ``proj1``): the score of query q on slot m is ``t_m . (q W_k)``; the query output
    ``o_q = sum_m a_qm v_m`` scores ``sum_m a_qm (t_m . W_v^T p_r)``; and the result
    ``sum_q w_q o_q = W_v (sum_m c_m t_m)`` with ``c_m = sum_q w_q a_qm``. So each slot costs
    two skinny products and ``proj1`` runs once on the mixed tokens, not once per slot.
    """

    def __init__(self, stem_dim: int, num_queries: int = 5) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(num_queries, stem_dim))
        self.key = nn.Linear(stem_dim, stem_dim, bias=False)
        self.score = nn.Parameter(torch.zeros(stem_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        nn.init.trunc_normal_(self.score, std=0.02)

    def forward(self, tokens: list[Tensor], mask: Tensor, value: nn.Linear) -> Tensor:
        """Fuse modality tokens.

        Args:
            tokens: per modality slot, finite stem tokens (B, N, D).
            mask: (B, M) bool, True where slot ``m`` is present (at least one per row).
            value: the value projection (``proj1``, no bias).

        Returns:
            Fused values (B, N, D); a row with one present slot gets exactly that slot's value.
        """
        query_keys = self.queries @ self.key.weight * tokens[0].shape[-1] ** -0.5  # (Q, D)
        value_score = self.score @ value.weight  # (D,)
        logits = torch.stack([t @ query_keys.T for t in tokens], dim=-1)  # (B, N, Q, M)
        attention = logits.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(dim=-1)
        slot_scores = torch.stack([t @ value_score for t in tokens], dim=-1)  # (B, N, M)
        weights = (attention * slot_scores[:, :, None, :]).sum(dim=-1).softmax(dim=-1)
        coefficients = (weights[..., None] * attention).sum(dim=2)  # (B, N, M)
        # Dividing by the sum (1 up to rounding) makes a one-slot row exactly its value (1 and 0
        # stay exact in the tokens' dtype, e.g. bf16 under autocast).
        coefficients = coefficients / coefficients.sum(dim=-1, keepdim=True)
        coefficients = coefficients.to(tokens[0].dtype)
        mixed = coefficients[..., 0, None] * tokens[0]
        for m in range(1, len(tokens)):
            mixed = mixed + coefficients[..., m, None] * tokens[m]
        return value(mixed)


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

    def unused_parameters(self, names: Iterable[str]) -> list[nn.Parameter]:
        """Parameters that a forward on the modalities ``names`` does not reach.

        The stems of the other modalities, and the fusion when only one modality is given.
        """
        given = [m for m in self.modalities if m in set(names)]
        params = [
            p
            for m in self.modalities
            if m not in given
            for p in (*getattr(self, f"conv2d_{m}").parameters(), getattr(self, f"{m}_embed"))
        ]
        return params + list(self.fusion.parameters()) if len(given) == 1 else params

    def forward(self, inputs: dict[str, Tensor], presence: Tensor) -> Tensor:
        """Embed a batch whose samples may carry different modality subsets.

        Every row of every given modality goes through its stem (static shapes, no host sync);
        rows absent per ``presence`` are zeroed first and get weight 0 in the fusion, so what
        they hold (even NaN) never reaches the result, and every stem takes part in each step.

        Args:
            inputs: modality -> (B, C, H, W).
            presence: (B, len(MODALITIES)) bool, already validated against ``inputs``.

        Returns:
            Patch tokens, (B, H/16 * W/16, embed_dim).
        """
        names = [m for m in self.modalities if m in inputs]
        if len(names) == 1:
            return self.projection(self.stem(names[0], inputs[names[0]]))
        mask = torch.stack([presence[:, MODALITIES.index(m)] for m in names], dim=1)
        tokens = [
            self.stem(m, torch.where(mask[:, j, None, None, None], inputs[m], 0.0))
            for j, m in enumerate(names)
        ]
        return self.projection.head(self.fusion(tokens, mask, self.projection.proj1))
