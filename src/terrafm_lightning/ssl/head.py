"""The DINO projection head: MLP, L2 normalisation and a weight-normalised prototype layer."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP ``in_dim -> hidden -> hidden -> bottleneck``, L2 norm, then ``num_prototypes`` logits.

    Args:
        in_dim: backbone feature width d.
        num_prototypes: K, the output width (65,536 in TerraFM).
        hidden_dim: MLP hidden width.
        bottleneck_dim: width before the prototype layer.
        norm_last_layer: fix the weight-norm magnitude g to 1 (DINO's ``norm_last_layer``), so
            every prototype is a unit vector and the logits are cosine similarities.
    """

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, num_prototypes, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        """Prototype logits (..., num_prototypes) of features (..., in_dim)."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
