"""A plain restatement of the released TerraFM inference network, for verification.

Independent of :class:`TerraFM`: explicit softmax attention, no timm, no fusion, one modality
per call, parameters named as in the released state dict. Tests compare our backbone with it
and ``benchmarks/backbone.py`` uses it as the baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_STEM_BANDS = {"s1": 2, "s2_l1c": 12, "s2_l2a": 12}


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Projection(nn.Module):
    def __init__(self, wide: int, dim: int) -> None:
        super().__init__()
        self.proj1 = nn.Linear(wide, wide, bias=False)
        self.norm_input = nn.LayerNorm(wide)  # the release: default eps 1e-5
        self.proj2 = nn.Linear(wide, wide)
        self.proj3 = nn.Linear(wide, dim)


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        wide = 3 * dim
        for m, bands in _STEM_BANDS.items():
            self.add_module(f"conv2d_{m}", nn.Conv2d(bands, wide, 16, stride=16))
            self.register_parameter(f"{m}_embed", nn.Parameter(torch.zeros(1, wide)))
        self.projection = _Projection(wide, dim)


class ReferenceTerraFM(nn.Module):
    """Released TerraFM inference: ``forward(x, modality)`` returns the normalised CLS feature."""

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 197, embed_dim))
        self.patch_embed = _PatchEmbed(embed_dim)
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def _pos_embed(self, h: int, w: int) -> Tensor:
        if h == w == 14:
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, 14, 14, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / 14, (w + 0.1) / 14), mode="bicubic")
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)

    def forward(self, x: Tensor, modality: str) -> Tensor:
        """CLS feature of ``x`` (B, C, H, W) through the stem of ``modality``."""
        pe = self.patch_embed
        t = getattr(pe, f"conv2d_{modality}")(x)
        h, w = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2) + getattr(pe, f"{modality}_embed")
        p = pe.projection
        t = p.proj3(p.proj2(p.norm_input(p.proj1(t))))
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self._pos_embed(h, w)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)[:, 0]
