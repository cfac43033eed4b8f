"""S3 request counts of the batch reader, counted by the (real, loopback) moto server itself."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
from moto.moto_server.threaded_moto_server import MotoRequestHandler
from moto.server import DomainDispatcherApplication, create_backend_app
from torch.utils.data import DataLoader
from werkzeug.serving import make_server

from terrafm_lightning.data.dataset import SampleMetadata, StoreTileDataset, collate_tile_batch
from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.store.format import open_store
from tests.conftest import create_bucket, free_port, s3_options
from tests.generators.stores import make_synthetic_store

SHARD = re.compile(r"/bucket/store\.zarr/(s1|s2_l1c|s2_l2a)/c/(\d+)/0/0/0$")


@pytest.fixture
def counted_s3() -> Iterator[tuple[int, list[tuple[str, str, str]]]]:
    """moto's S3 app on loopback behind a WSGI wrapper logging (method, path, Range) per request."""
    requests: list[tuple[str, str, str]] = []
    app = DomainDispatcherApplication(create_backend_app)

    def counting(environ: dict[str, Any], start_response: Callable) -> Any:
        requests.append(
            (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("HTTP_RANGE", ""))
        )
        return app(environ, start_response)

    port = free_port()
    server = make_server("127.0.0.1", port, counting, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port, requests
    finally:
        server.shutdown()
        thread.join()


def test_one_get_per_modality_per_tile_once_the_shard_index_is_cached(
    tmp_path: Path, counted_s3: tuple[int, list[tuple[str, str, str]]]
) -> None:
    port, requests = counted_s3
    local = make_synthetic_store(tmp_path / "store.zarr", n_samples=8, tile_size=32)
    options = s3_options(port)
    create_bucket(port)
    s3fs.S3FileSystem(**options).put(str(local), "bucket/store.zarr", recursive=True)
    meta = SampleMetadata(open_store(str(local)))
    dataset = StoreTileDataset(
        "s3://bucket/store.zarr",
        np.arange(8),
        meta.available,
        meta.worldcover_hist,
        meta.dominant_class,
        MODALITIES,
        storage_options=options,
    )
    batches = [[5, 1, 6, 2], [0, 7, 3, 5], [1, 5, 0, 6]]  # shards 0 and 1 (4 tiles each)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_tile_batch,
        num_workers=1,
        multiprocessing_context="spawn",
    )
    requests.clear()
    read = list(loader)
    reference = open_store(str(local))
    for batch in read:  # the bytes really came from S3
        for row, index in enumerate(batch["index"].tolist()):
            np.testing.assert_array_equal(batch["s2_l2a"][row].numpy(), reference["s2_l2a"][index])
    pixel = [(method, SHARD.search(path), rng) for method, path, rng in requests]
    pixel = [(method, match.groups(), rng) for method, match, rng in pixel if match]
    assert {method for method, _, _ in pixel} == {"GET"}
    index_reads = Counter(key for _, key, rng in pixel if rng.startswith("bytes=-"))
    chunk_reads = Counter(key for _, key, rng in pixel if not rng.startswith("bytes=-"))
    # One index read per (modality, shard) for the whole run: the worker caches it.
    assert index_reads == Counter({(m, s): 1 for m in MODALITIES for s in ("0", "1")})
    # Exactly one ranged GET per modality the tile has, per tile read.
    expected: Counter = Counter()
    for index in (i for batch in batches for i in batch):
        for column, m in enumerate(MODALITIES):
            if meta.available[index, column]:
                expected[(m, str(index // 4))] += 1
    assert chunk_reads == expected
    assert all(rng.startswith("bytes=") for _, _, rng in pixel)
