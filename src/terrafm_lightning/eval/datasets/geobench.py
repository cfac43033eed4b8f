"""GEO-Bench v1 HDF5 tasks (classification and segmentation) with Sentinel-2 bands.

Layout: a task folder (e.g. ``classification_v1.0/m-eurosat``) with one ``<sample>.hdf5`` per
sample (one 2-D dataset per band, a ``label`` dataset for segmentation), ``band_stats.json`` and
``default_partition.json`` (``{"train": [...], "valid": [...], "test": [...]}``; other
partitions such as ``0.01x_train`` via ``partition``). ``root`` may also be the GEO-Bench root
holding ``classification_v1.0/`` and ``segmentation_v1.0/`` with ``task=`` naming the task.
Sample metadata (classification label, band order, band kinds, and for georeferenced tasks the
``affine.Affine`` transform and ``rasterio.crs.CRS``) is a pickle in the file's ``pickle``
attribute, read with a restricted unpickler: GEO-Bench's own classes become inert records,
numpy arrays, dates, ``Affine`` and ``CRS`` are built, and every other global is refused.

Bands: only Sentinel-2 bands are used (their metadata class is ``Sentinel2``), mapped by the
number in their names ("08A - ..." -> B8A). m-eurosat is the exception: geo-bench's converter
copied the EuroSAT GeoTIFF bands in file order (B01..B12, B8A last; see
:data:`~terrafm_lightning.eval.datasets.eurosat.EUROSAT_MS_BANDS`) under the standard names, so
its 13 bands take the EuroSAT order. Known tasks (table below) set ``num_classes``, multilabel
and the stem; others need ``num_classes``.
"""

from __future__ import annotations

import ast
import importlib
import io
import json
import logging
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from terrafm_lightning.bands import canonical_band
from terrafm_lightning.errors import MissingInputError, UserError
from terrafm_lightning.eval.datasets.base import Detection, EvalDataModule, Sample, layout_error
from terrafm_lightning.eval.datasets.eurosat import EUROSAT_MS_BANDS

log = logging.getLogger(__name__)

GEOBENCH_TASKS: dict[str, tuple[int, bool, str]] = {
    "bigearthnet": (43, True, "s2_l2a"),
    "brick-kiln": (2, False, "s2_l1c"),
    "eurosat": (10, False, "s2_l1c"),
    "so2sat": (17, False, "s2_l1c"),
    "cashew-plant": (7, False, "s2_l1c"),
    "sa-crop-type": (10, False, "s2_l1c"),
}
"""Known S2 tasks: name -> (num_classes, multilabel, stem modality)."""

_SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}
_BAND_NUMBER = re.compile(r"^\s*(\d{1,2}A?)\s*-")
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("datetime", "date"),
    ("datetime", "datetime"),
    ("affine", "Affine"),
    ("rasterio.crs", "CRS"),
}
GEOBENCH_FOLDERS = ("classification_v1.0", "segmentation_v1.0")
"""Sub-folders of a GEO-Bench v1 download (``geobench.download``) holding the task folders."""


class _Record:
    """Inert stand-in for a pickled GEO-Bench object: keeps its state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] in ("ccb", "geobench"):
            return type(name, (_Record,), {})
        module = module.replace("numpy.core.", "numpy._core.")
        if (module, name) in _SAFE_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def task_key(folder: Path) -> str:
    """Normalised task name of a folder: ``m-SA-crop-type`` -> ``sa-crop-type``."""
    name = folder.name.lower().replace("_", "-")
    return re.sub(r"-v\d+(\.\d+)*$", "", name).removeprefix("m-")


def read_sample(path: Path) -> tuple[dict[str, np.ndarray], Any, list[str]]:
    """One GEO-Bench sample: S2 band arrays by name, label, S2 band names in content order.

    Raises:
        FileNotFoundError: if the file is absent.
        ValueError: naming the file if it is not a GEO-Bench HDF5 sample.
    """
    if not path.is_file():
        raise MissingInputError(f"GEO-Bench sample not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            meta = _SafeUnpickler(io.BytesIO(_pickle_bytes(f.attrs["pickle"]))).load()
            if not isinstance(meta, dict):
                raise ValueError(f"pickled metadata is a {type(meta).__name__}, not a dict")
            order = list(meta.get("bands_order", sorted(f.keys())))
            s2 = [
                b for b in order if type(meta.get(b, {}).get("band_info")).__name__ == "Sentinel2"
            ]
            arrays = {b: np.asarray(f[b], dtype=np.float32) for b in s2}
            label = np.asarray(f["label"]) if "label" in f else meta["label"]
    except (OSError, KeyError, pickle.UnpicklingError, ValueError, SyntaxError) as err:
        raise UserError(f"{path}: not a GEO-Bench v1 sample ({type(err).__name__}: {err})") from err
    if not s2:
        raise UserError(f"{path}: no Sentinel-2 bands (bands: {order})")
    return arrays, label, s2


def _pickle_bytes(attr: Any) -> bytes:
    # GEO-Bench stores str(pickle.dumps(...)), i.e. the repr of a bytes object.
    return ast.literal_eval(attr) if isinstance(attr, str) else bytes(attr)


def s2_band_names(names: Sequence[str], source: str, task: str = "") -> list[str]:
    """Stem band names of GEO-Bench S2 bands: by number, m-eurosat in EuroSAT file order."""
    if task == "eurosat" and len(names) == len(EUROSAT_MS_BANDS):
        return list(EUROSAT_MS_BANDS)
    parsed = []
    for name in names:
        match = _BAND_NUMBER.match(name)
        if not match:
            raise UserError(f"{source}: cannot read the S2 band of {name!r}")
        parsed.append(canonical_band(match.group(1)))
    return parsed


class GeoBenchDataModule(EvalDataModule):
    """A GEO-Bench v1 classification or segmentation task from its HDF5 folder.

    Args:
        root: the task folder, or the GEO-Bench root with ``task``.
        task: task folder name (e.g. ``m-eurosat``) under ``root/classification_v1.0`` or
            ``root/segmentation_v1.0``; None: ``root`` is the task folder.
        modalities: the S2 stem (default from the task table, else ``s2_l1c``).
        partition: partition file prefix (``default`` -> ``default_partition.json``).
        num_classes: required for tasks not in :data:`GEOBENCH_TASKS`.
        ignore_index: segmentation label value to ignore.
        **kwargs: :class:`EvalDataModule` arguments.
    """

    supported = ("s2_l1c", "s2_l2a")

    @classmethod
    def detect(cls, root: Path) -> list[Detection]:
        """A task folder: ``default_partition.json``, or ``.hdf5`` samples without it (problem)."""
        paper_key = f"geobench/{task_key(root)}"
        if (root / "default_partition.json").is_file():
            return [Detection(paper_key=paper_key)]
        if next(root.glob("*.hdf5"), None) is not None:
            problem = "GEO-Bench task folder (.hdf5 samples) without default_partition.json"
            return [Detection(paper_key=paper_key, problem=problem)]
        return []

    def __init__(
        self,
        root: str | Path,
        task: str | None = None,
        modalities: Sequence[str] | None = None,
        partition: str = "default",
        num_classes: int | None = None,
        ignore_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        if task is not None:
            found = [
                Path(root) / f / task for f in GEOBENCH_FOLDERS if (Path(root) / f / task).is_dir()
            ]
            if not found:
                raise layout_error(Path(root), f"{[f'{f}/{task}' for f in GEOBENCH_FOLDERS]}")
            root = found[0]
        self.key = task_key(Path(root))
        known = GEOBENCH_TASKS.get(self.key)
        super().__init__(root, modalities or [known[2] if known else "s2_l1c"], **kwargs)
        path = self.root / f"{partition}_partition.json"
        if partition == "default" and not path.is_file():
            raise layout_error(self.root, "a GEO-Bench v1 task folder with default_partition.json")
        try:
            partition_data = json.loads(path.read_text())
            self.partition = {s: list(partition_data[k]) for s, k in _SPLIT_KEYS.items()}
        except FileNotFoundError as err:
            raise MissingInputError(f"{self.root}: partition file {path.name} not found") from err
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{path}: malformed partition ({type(err).__name__}: {err})") from err
        if num_classes is None and known is None:
            raise UserError(
                f"{self.root}: unknown GEO-Bench task {task_key(self.root)!r}; pass num_classes "
                f"(known: {sorted(GEOBENCH_TASKS)})"
            )
        self.num_classes = num_classes or known[0]
        first = self.root / f"{self.partition['train'][0]}.hdf5"
        _, label, _ = read_sample(first)
        label = np.asarray(label)
        self.task = "segmentation" if label.ndim == 2 else "classification"
        self.multilabel = label.ndim == 1
        self.ignore_index = ignore_index

    def split_keys(self) -> dict[str, list[Path]]:  # noqa: D102
        keys = {s: [self.root / f"{n}.hdf5" for n in names] for s, names in self.partition.items()}
        absent = [p.name for ps in keys.values() for p in ps if not p.is_file()]
        if absent:
            raise MissingInputError(
                f"{self.root}: {len(absent)} partition samples missing, e.g. {absent[:3]}"
            )
        return keys

    def load(self, key: Path) -> Sample:  # noqa: D102
        arrays, label, names = read_sample(key)
        image = np.stack([arrays[n] for n in names])
        bands = s2_band_names(names, str(key), self.key)
        sample = {m: self.prepare(image, m, bands, str(key)) for m in self.modalities}
        label = torch.as_tensor(np.asarray(label))
        sample["label"] = label.float() if self.multilabel else label.long()
        return sample
