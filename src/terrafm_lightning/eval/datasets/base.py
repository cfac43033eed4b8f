"""Shared machinery of the benchmark datamodules: splits, band mapping, resizing, loaders.

Every datamodule yields batches ``{modality: float32 (B, C, S, S) normalised, "label": ...}``
and exposes ``num_classes``, ``multilabel``, ``task`` (``"classification"`` or
``"segmentation"``) and ``ignore_index`` so the CLI can link them into the probe. Its
``detect(folder)`` classmethod says whether a folder is its dataset (``make eval`` asks each).

Input size: the backbone needs multiples of 16. ``img_size=None`` rounds the native size to the
nearest multiple of 16 (EuroSAT / GEO-Bench 64 -> 64, BigEarthNet 120 -> 128, Sen1Floods11
512 -> 512); images are resized bilinearly (antialiased). Segmentation labels keep their native
grid: the probe upsamples its logits to it.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from terrafm_lightning.bands import BandMapping, MissingBands, file_bands, map_bands
from terrafm_lightning.errors import MissingInputError, UserError
from terrafm_lightning.modalities import check_modality

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
Sample = dict[str, Tensor]
Task = Literal["classification", "segmentation"]
SPLIT_SEED_HINT = (
    "pass a split seed (make eval: SPLIT_SEED=<int> / --split-seed <int>; terrafm: "
    "--data.init_args.split_seed <int>)"
)


@dataclass(frozen=True)
class Detection:
    """A folder recognised as a dataset of a datamodule (:meth:`EvalDataModule.detect`).

    Attributes:
        kwargs: datamodule arguments besides ``root`` (e.g. a Copernicus-Bench ``task``).
        suffix: appended to the folder's name in tables when one folder holds several tasks.
        paper_key: the row of ``paper_results.json`` this dataset matches, if any.
        problem: why the folder looks like the dataset but cannot be evaluated (None: it can).
    """

    kwargs: dict[str, Any] = field(default_factory=dict)
    suffix: str = ""
    paper_key: str | None = None
    problem: str | None = None


def input_size(native: int, img_size: int | None) -> int:
    """The model input size: ``img_size`` or ``native`` rounded to a multiple of 16 (>= 16)."""
    size = img_size if img_size is not None else max(16, int(native / 16 + 0.5) * 16)
    if size % 16 or size <= 0:
        raise UserError(f"img_size must be a positive multiple of 16, got {size}")
    return size


def resize(x: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased) resize of (C, H, W) to (C, size, size); no-op when equal."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]


def _open_tif(path: Path) -> tuple[np.ndarray, list[str], str]:
    try:
        with rasterio.open(path) as src:
            data = src.read(masked=src.nodata is not None)
            descriptions = [d.strip() if d else "" for d in src.descriptions]
            dtype = src.dtypes[0]
    except rasterio.RasterioIOError as err:
        raise UserError(f"{path}: unreadable GeoTIFF ({err})") from err
    return np.ma.filled(data.astype(np.float32), np.nan), descriptions, dtype


def read_tif(path: Path) -> np.ndarray:
    """All bands of a GeoTIFF as (C, H, W) float32, nodata values as NaN.

    Raises:
        ValueError: naming the file when rasterio cannot read it.
    """
    return _open_tif(path)[0]


def read_tif_bands(
    path: Path, documented: Sequence[str], dtypes: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """A GeoTIFF as (C, H, W) float32 (nodata as NaN) and its band names.

    Band names come from the file's band descriptions when every band has one, else from
    ``documented`` (the dataset's published order). A band count that does not match, or a
    dtype outside ``dtypes``, is an error naming the file and the numbers.

    Raises:
        ValueError: unreadable file, wrong band count or dtype.
    """
    data, descriptions, dtype = _open_tif(path)
    if dtypes is not None and dtype not in dtypes:
        raise UserError(f"{path}: dtype {dtype}, expected one of {list(dtypes)}")
    return data, file_bands(descriptions, documented, str(path))


def read_split_file(path: Path) -> list[str]:
    """Non-empty lines (first comma-separated field) of a split file, extension-less."""
    names = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
    names = [Path(n).name for n in names]
    names = [Path(n).stem if n.lower().endswith((".tif", ".jpg", ".png")) else n for n in names]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"{path}: empty split file")
    return names


def layout_error(root: Path, expected: str) -> MissingInputError:
    """The error of a root without the expected layout: what was expected, what is there."""
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12]
    return MissingInputError(f"{root}: expected {expected}; found {found or 'nothing'}")


def fallback_split(
    names: Sequence[str],
    seed: int | None,
    source: str,
    expected: str,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> dict[str, list[str]]:
    """Seeded random 60/20/20 split, only on the user's opt-in (``split_seed``), with a warning.

    Raises:
        MissingInputError: naming the ``expected`` official split files when ``seed`` is None.
    """
    if seed is None:
        raise MissingInputError(
            f"{source}: official split files {expected} not found; put them there, or "
            f"{SPLIT_SEED_HINT} for a seeded random 60/20/20 split (not comparable with "
            "published results)"
        )
    warnings.warn(
        f"{source}: no official split files ({expected}); using a seeded {tuple(fractions)} "
        f"split (split_seed={seed})",
        stacklevel=2,
    )
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_train = int(len(order) * fractions[0])
    n_val = int(len(order) * fractions[1])
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


class SampleDataset(Dataset):
    """A list of sample keys and a function loading one sample dict."""

    def __init__(self, keys: Sequence[Any], load: Callable[[Any], Sample]) -> None:
        self.keys = list(keys)
        self.load = load

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Sample:
        return self.load(self.keys[index])


class AdaptedDataset(Dataset):
    """A dataset of another library (torchgeo) whose samples ``convert`` maps to ours.

    ``sources`` are the files that define the split (split files, metadata tables): what the
    feature cache key records of it.
    """

    def __init__(
        self,
        dataset: Dataset,
        convert: Callable[[dict[str, Tensor]], Sample],
        sources: Sequence[Path] = (),
    ) -> None:
        self.dataset = dataset
        self.convert = convert
        self.sources = list(sources)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        return self.convert(self.dataset[index])


class EvalDataModule(LightningDataModule):
    """Base of the benchmark datamodules.

    Subclasses set ``num_classes``, ``multilabel``, ``task``, ``ignore_index`` in ``__init__``
    and implement :meth:`split_keys` and :meth:`load`, or :meth:`split_datasets` (torchgeo).

    Args:
        root: dataset folder.
        modalities: the modalities to feed the backbone (several -> fusion).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        img_size: model input size (multiple of 16); None rounds the native size.
        missing_bands: ``"error"`` or ``"fill"`` for stem bands the data lacks (see
            :mod:`~terrafm_lightning.bands`).
        stats: per-modality ``{"mean", "std"}`` in stem band order (default: SSL4EO-S12, the
            pretraining default; pass the pretraining store's statistics when they differ).
        seed: seed of the training loader's shuffling.
        split_seed: opt-in seeded random split when a dataset that ships split files has none
            at ``root`` (default None: that is an error).
    """

    task: Task = "classification"
    num_classes: int
    multilabel: bool = False
    ignore_index: int | None = None
    supported: tuple[str, ...] = ()

    @classmethod
    def detect(cls, root: Path) -> list[Detection]:
        """The datasets of this class that ``root`` is (several tasks, one, or none)."""
        return []

    @property
    def metric(self) -> str:
        """The headline metric: mIoU, micro-F1 (multilabel) or top-1."""
        if self.task == "segmentation":
            return "miou"
        return "f1_micro" if self.multilabel else "top1"

    def __init__(
        self,
        root: str | Path,
        modalities: Sequence[str],
        batch_size: int = 32,
        num_workers: int = 0,
        img_size: int | None = None,
        missing_bands: MissingBands = "error",
        stats: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
        seed: int = 0,
        split_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingInputError(f"{type(self).__name__}: dataset folder not found: {root}")
        if not modalities:
            raise UserError(f"{type(self).__name__}: give at least one modality")
        for m in modalities:
            check_modality(m)
            if m not in self.supported:
                raise UserError(
                    f"{type(self).__name__}: modality {m!r} not in this dataset "
                    f"(has {list(self.supported)})"
                )
        self.modalities = list(modalities)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.img_size = img_size
        self.missing_bands = missing_bands
        self.stats = dict(stats or {})
        self.seed = seed
        self.split_seed = split_seed
        self.datasets: dict[str, Dataset] = {}
        self._mappings: dict[tuple[str, tuple[str, ...]], BandMapping] = {}

    @property
    def filled_bands(self) -> list[str]:
        """Stem bands mean-filled so far (``missing_bands="fill"``), as ``modality:band``."""
        return sorted({f"{m.modality}:{b}" for m in self._mappings.values() for b in m.missing})

    def band_mapping(self, modality: str, bands: Sequence[str], source: str) -> BandMapping:
        """The (cached) :class:`BandMapping` of ``bands`` onto ``modality``'s stem."""
        key = (modality, tuple(bands))
        if key not in self._mappings:
            self._mappings[key] = map_bands(
                bands,
                modality,
                missing=self.missing_bands,
                stats=self.stats.get(modality),
                source=source,
            )
        return self._mappings[key]

    def prepare(self, x: np.ndarray, modality: str, bands: Sequence[str], source: str) -> Tensor:
        """Map bands, normalise and resize one (C, H, W) image to the model input."""
        image = self.band_mapping(modality, bands, source)(x)
        return resize(image, input_size(image.shape[-1], self.img_size))

    def split_keys(self) -> dict[str, list[Any]]:
        """Sample keys of the ``train``, ``val`` and ``test`` splits."""
        raise NotImplementedError

    def load(self, key: Any) -> Sample:
        """One sample: ``{modality: (C, S, S), "label": ...}``."""
        raise NotImplementedError

    def split_datasets(self) -> dict[str, Dataset]:
        """The ``train``, ``val``, ``test`` datasets (default: :meth:`split_keys`, :meth:`load`)."""
        return {split: SampleDataset(keys, self.load) for split, keys in self.split_keys().items()}

    def setup(self, stage: str | None = None) -> None:
        """Resolve the splits (once) and check none is empty."""
        if self.datasets:
            return
        for split, dataset in self.split_datasets().items():
            if not len(dataset):
                raise UserError(f"{type(self).__name__}: split {split!r} of {self.root} is empty")
            self.datasets[split] = dataset
        log.info("%s: %s", type(self).__name__, {s: len(d) for s, d in self.datasets.items()})

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order (``terrafm predict`` returns its embeddings)."""
        return self._loader("test")
