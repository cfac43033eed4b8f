"""Backbone weights in the checkpoint layout torchgeo's trainers accept as ``weights=``.

torchgeo reads a file passed as ``weights=`` with ``torchgeo.trainers.utils.extract_backbone``:
a Lightning-style dict whose ``hyper_parameters`` name the model and whose ``state_dict`` keys
carry the trainer's prefix. Two layouts, one per trainer family:

- ``classification`` (``ClassificationTask(model="terrafm_base", weights=file)``):
  ``{"hyper_parameters": {"model": name}, "state_dict": {"model.<key>": ...}}``; torchgeo loads
  it non-strictly into ``timm.create_model(name)``.
- ``segmentation`` (``SemanticSegmentationTask(model="dpt", backbone="tu-terrafm_base",
  weights=file)``): ``{"hyper_parameters": {"backbone": "tu-" + name}, "state_dict":
  {"model.backbone.model.model.<key>": ...}}``; torchgeo strips ``model.backbone.model.`` and
  loads the rest strictly into smp's encoder (whose ``model`` is the TerraFM).

torchgeo rebuilds the backbone from its factory name alone, so only backbones built with the
factory's defaults (every stem) fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from terrafm_lightning.errors import UserError

TorchGeoTask = Literal["classification", "segmentation"]
TASKS: tuple[str, ...] = ("classification", "segmentation")


def torchgeo_checkpoint(
    name: str, kwargs: dict[str, Any], state: dict[str, Tensor], task: TorchGeoTask
) -> dict[str, Any]:
    """The torchgeo ``weights=`` dict of a backbone (factory ``name``, its ``kwargs``, tensors).

    Raises:
        ValueError: on an unknown ``task``, or ``kwargs`` that torchgeo cannot pass on (it
            builds the factory with its defaults).
    """
    if task not in TASKS:
        raise UserError(f"torchgeo task {task!r}; accepted: {list(TASKS)}")
    if kwargs:
        raise UserError(
            f"torchgeo builds {name} with its default arguments; this backbone was built with "
            f"{kwargs}, which torchgeo cannot pass on: export without --torchgeo"
        )
    state = {k: v.detach().cpu() for k, v in state.items()}
    if task == "classification":
        return {"hyper_parameters": {"model": name}, "state_dict": _prefixed("model.", state)}
    return {
        "hyper_parameters": {"backbone": f"tu-{name}"},
        "state_dict": _prefixed("model.backbone.model.model.", state),
    }


def write_torchgeo_checkpoint(
    name: str,
    kwargs: dict[str, Any],
    state: dict[str, Tensor],
    out: str | Path,
    task: TorchGeoTask = "classification",
) -> Path:
    """Write :func:`torchgeo_checkpoint` to ``out`` (atomically); return the path."""
    payload = torchgeo_checkpoint(name, kwargs, state, task)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    torch.save(payload, tmp)
    tmp.replace(out)
    return out


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}
