"""Full fine-tuning with layer-wise learning-rate decay."""

from __future__ import annotations

from typing import Any

from terrafm_lightning.eval.linear_probe import LinearProbe
from terrafm_lightning.models.terrafm import layer_group_matcher
from terrafm_lightning.ssl.optim import layer_decay_groups


class FineTune(LinearProbe):
    """:class:`LinearProbe` with the backbone unfrozen and layer-wise lr decay.

    The learning rate of layer i (stem = 0, blocks 1..depth with the final norm in the last,
    head = depth + 1) is ``lr * layer_decay ** (depth + 1 - i)``; biases, norms and
    ``no_weight_decay()`` tensors get no weight decay (timm's ``param_groups_layer_decay``).

    Args:
        layer_decay: per-layer lr factor (BEiT/MAE convention; 0.75 for ViT-B).
        lr: base (head) learning rate.
        weight_decay: weight decay of matrices.
        **kwargs: :class:`LinearProbe` arguments.
    """

    def __init__(
        self,
        layer_decay: float = 0.75,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        **kwargs: Any,
    ) -> None:
        kwargs["frozen"] = False
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Timm layer groups: stem, one per block (final norm with the last), head on top."""
        return layer_group_matcher("backbone.")

    def param_groups(self) -> list[dict[str, Any]]:
        """Layer-decayed parameter groups with their lr scale and weight decay set."""
        groups = layer_decay_groups(self, self.backbone, self.hparams.layer_decay)
        for group in groups:
            group["lr"] = self.hparams.lr * group.pop("lr_scale")
            group["weight_decay"] = self.hparams.weight_decay if group.pop("decay") else 0.0
        return groups
