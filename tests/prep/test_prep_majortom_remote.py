"""``terrafm-data majortom-remote`` against a loopback HTTP server serving real-sample fixtures.

The fixture is the Major-TOM Core layout written from the five real locations of
``../shared/data/terramind_examples`` (tests/generators/majortom_real.py); the server counts
every request and byte range, so the tests see exactly what was fetched.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import xarray as xr
import zarr

from terrafm_lightning.prep import fetch
from terrafm_lightning.prep.cli import main
from terrafm_lightning.prep.errors import InputError, PrepError
from terrafm_lightning.prep.sources.majortom import prepare_majortom
from terrafm_lightning.prep.sources.majortom_remote import (
    Selection,
    plan_remote,
    prepare_majortom_remote,
)
from terrafm_lightning.store.schema import Encoding
from tests.conftest import create_bucket, free_port, shared_path
from tests.generators.http_server import serve
from tests.generators.majortom_real import (
    CLOUD_COVER,
    DATASETS,
    grid_cell,
    locations,
    write_real_fixture,
)

TILE, CELL = 112, 224
RUN = {"tile_size": TILE, "cell_size": CELL, "scheduler": "sync", "progress": False}
MODALITIES = ["s1", "s2_l1c", "s2_l2a"]


@pytest.fixture(scope="module")
def samples() -> Path:
    return shared_path("data", "terramind_examples")


@pytest.fixture(scope="module")
def fixture_root(samples, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("majortom") / "mt"
    write_real_fixture(samples, root)
    return root


@pytest.fixture(scope="module")
def local_store(fixture_root, tmp_path_factory) -> str:
    """The store ``terrafm-data majortom`` makes from the same files on disk."""
    out = str(tmp_path_factory.mktemp("local") / "local.zarr")
    roots = {m: str(fixture_root / DATASETS[m]) for m in MODALITIES}
    prepare_majortom(roots, out, **RUN)
    return out


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(fetch, "FIRST_DELAY", 0.01)
    fetch.remote_footer.cache_clear()  # every test counts its own footer reads


@pytest.fixture
def server(fixture_root):
    with serve(fixture_root) as srv:
        yield srv


def stores_equal(a: str, b: str) -> None:
    xr.testing.assert_identical(xr.open_zarr(a).drop_attrs(), xr.open_zarr(b).drop_attrs())


def cells_of(samples: Path) -> list[str]:
    return [grid_cell(s) for s in locations(samples)]


def column_span(column) -> tuple[int, int]:
    """[start, end) bytes of a column chunk."""
    start = min(column.data_page_offset, column.dictionary_page_offset or column.data_page_offset)
    return start, start + column.total_compressed_size


def row_group_spans(file: Path) -> list[tuple[int, int]]:
    """[start, end) bytes of each row group (all its column chunks)."""
    meta = pq.read_metadata(file)
    spans = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        columns = [column_span(rg.column(k)) for k in range(rg.num_columns)]
        spans.append((min(lo for lo, _ in columns), max(hi for _, hi in columns)))
    return spans


def groups_touched(server, fixture_root: Path) -> dict[tuple[str, int], int]:
    """(image path, row group) -> bytes served inside it; fails on a whole-file image read."""
    touched: dict[tuple[str, int], int] = {}
    for s in server.requests():
        if "/images/" not in s.path or s.method == "HEAD":
            continue
        assert s.status == 206, f"{s.path} read without a range ({s.status})"
        for g, (lo, hi) in enumerate(row_group_spans(fixture_root / s.path.lstrip("/"))):
            overlap = min(hi, s.end) - max(lo, s.start)
            if overlap > 0:
                touched[(s.path, g)] = touched.get((s.path, g), 0) + overlap
    return touched


def test_selection_filters_join_and_count(server, samples):
    cells = cells_of(samples)  # sorted: Brazil, Tanzania, Chile, Hudson Bay, Denmark
    base = server.url

    def chosen(**kw):
        return [c["_cell"] for c in plan_remote(base, MODALITIES, Selection(**kw))[0]]

    assert chosen() == sorted(cells)
    assert chosen(grid_cells=(cells[3], cells[1])) == sorted([cells[1], cells[3]])
    assert chosen(start="2021-01-01") == sorted(cells[2:])
    assert chosen(end="2020-07-15") == sorted(cells[:2])  # a date includes the whole day
    assert chosen(start="2020-07-15T10:10:31", end="2021-01-20T10:10:30") == [cells[1]]
    clear = [c for c, cover in zip(cells, CLOUD_COVER, strict=True) if cover <= 12.0]
    assert chosen(max_cloud=12.0) == sorted(clear)
    assert chosen(cells=2) == sorted(cells)[:2]
    assert chosen(bbox=(5.0, 50.0, 15.0, 60.0)) == ["637U_59R"]  # Denmark alone
    assert chosen(max_nodata=0.0) == sorted(cells)
    with pytest.raises(InputError, match=r"matches no cell with every modality .* widen"):
        plan_remote(base, MODALITIES, Selection(start="2030-01-01"))


def test_remote_store_equals_local_store(server, local_store, tmp_path):
    out = str(tmp_path / "remote.zarr")
    report = prepare_majortom_remote(server.url, MODALITIES, out, Selection(), **RUN)
    assert report.done == 20
    stores_equal(out, local_store)
    assert xr.open_zarr(out).attrs["source"].startswith("terrafm-data majortom-remote http://")


def test_only_the_selected_row_groups_are_fetched(server, fixture_root, samples, tmp_path):
    cells = sorted(cells_of(samples))
    chosen = (cells[1], cells[3])  # row 1 of part 0, row 0 of part 1 (sorted stems)
    prepare_majortom_remote(
        server.url, MODALITIES, str(tmp_path / "r.zarr"), Selection(grid_cells=chosen), **RUN
    )
    touched = groups_touched(server, fixture_root)
    expected = {
        (f"/{DATASETS[m]}/images/part_{p:05d}.parquet", g)
        for m in MODALITIES
        for p, g in ((0, 1), (1, 0))
    }
    assert set(touched) == expected
    # Inside those row groups: every band, product_id and grid_cell column in full; other
    # columns (thumbnail, cloud_mask, B10) only where pyarrow bridges a hole under 8 KiB
    # between wanted columns rather than make another request.
    served = {
        path: [(s.start, s.end) for s in server.requests(path, "GET")] for path, _ in expected
    }
    for path, g in expected:
        rg = pq.read_metadata(fixture_root / path.lstrip("/")).row_group(g)
        for k in range(rg.num_columns):
            col = rg.column(k)
            lo, hi = column_span(col)
            got = sum(max(0, min(hi, b) - max(lo, a)) for a, b in served[path])
            name = col.path_in_schema
            if name in ("product_id", "grid_cell", "vv", "vh") or (
                name[0] == "B" and name != "B10"
            ):
                assert got == hi - lo, f"{path} {name}"
            elif hi - lo >= 8192:
                assert got == 0, f"{path} {name} fetched"
    # Outside row groups: each image file's 8-byte tail and its footer, once.
    for path in {p for p, _ in expected}:
        file = fixture_root / path.lstrip("/")
        last = row_group_spans(file)[-1][1]
        footer = int.from_bytes(file.read_bytes()[-8:-4], "little")
        outside = [s for s in server.requests(path, "GET") if s.start >= last]
        assert sorted(s.sent for s in outside) == sorted([8, footer])


def test_dry_run_prints_selection_and_fetches_no_rows(server, fixture_root, samples, capsys):
    cells = sorted(cells_of(samples))
    code = main(["majortom-remote", "unused.zarr", "--base-url", server.url, "--dry-run",
                 "--grid-cells", cells[0], "--tile-size", "112", "--cell-size", "224"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "1 cells -> 4 tiles"
    for line, m in zip(out[1:4], MODALITIES, strict=True):
        rg = pq.read_metadata(fixture_root / DATASETS[m] / "images/part_00000.parquet").row_group(0)
        names = {rg.column(k).path_in_schema: k for k in range(rg.num_columns)}
        bands = ("vv", "vh") if m == "s1" else [n for n in names if n[0] == "B" and n != "B10"]
        read = ("grid_cell", "product_id", *bands)
        size = sum(rg.column(names[n]).total_compressed_size for n in read)
        assert line == f"{DATASETS[m]}: 1 products, {size / 1e6:.1f} MB to fetch"
    assert out[5].startswith(f"{cells[0]}: S1A_IW_GRDH_1SDV_20200302")
    assert groups_touched(server, fixture_root) == {}


def test_transient_server_error_is_retried(server, local_store, tmp_path):
    path = f"/{DATASETS['s2_l2a']}/images/part_00001.parquet"
    server.fail[path] = 2
    out = str(tmp_path / "retry.zarr")
    prepare_majortom_remote(server.url, MODALITIES, out, Selection(), **RUN)
    answers = server.requests(path)
    assert [s.status for s in answers[:2]] == [503, 503]
    assert {s.status for s in answers[2:] if s.method == "GET"} == {206}
    stores_equal(out, local_store)


def test_persistent_server_error_is_named_and_nothing_marked_done(server, tmp_path):
    path = f"/{DATASETS['s1']}/images/part_00001.parquet"
    server.fail[path] = 1000
    out = str(tmp_path / "fail.zarr")
    with pytest.raises(PrepError, match=rf"cannot read {server.url}{path}: HTTP 503 \(after 5"):
        prepare_majortom_remote(
            server.url, MODALITIES, out, Selection(), encoding=Encoding(samples_per_shard=4), **RUN
        )
    written = zarr.open_group(out, mode="r")["written"][:]
    assert written[:12].all() and not written[12:].any()  # cells 3, 4 live in part 1


def test_killed_run_resumes_fetching_only_what_is_missing(
    server, fixture_root, local_store, tmp_path
):
    out = str(tmp_path / "kill.zarr")
    args = ["majortom-remote", out, "--base-url", server.url, "--tile-size", "112",
            "--cell-size", "224", "--scheduler", "sync", "--no-progress",
            "--samples-per-shard", "4"]  # fmt: skip
    server.delay = 0.15  # ~1.5 s per cell: the kill lands between flushes of the driver
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "import sys; from terrafm_lightning.prep.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if Path(out, "written").exists() and zarr.open_group(out, mode="r")["written"][:].any():
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    written = zarr.open_group(out, mode="r")["written"][:]
    assert 0 < written.sum() < 20, "the kill must land mid-run"
    done_cells = {k for k in range(5) if written[4 * k : 4 * k + 4].all()}
    server.delay = 0.0
    server.clear()
    assert main(args) == 0
    stores_equal(out, local_store)
    # The rerun fetched the row groups of the unfinished cells only.
    fetched_rows = {(p, g) for p, g in groups_touched(server, fixture_root)}
    cells_rows = {k: (k // 3, k % 3) for k in range(5)}  # cell k -> (part, row)
    expected = {
        (f"/{DATASETS[m]}/images/part_{cells_rows[k][0]:05d}.parquet", cells_rows[k][1])
        for m in MODALITIES for k in range(5) if k not in done_cells
    }  # fmt: skip
    assert fetched_rows == expected


@pytest.mark.parametrize(
    "case, message, bad_cell",
    [
        ("unreachable", r"read http://127.0.0.1:\d+/Core-S1RTC/metadata\.parquet:.*--base", None),
        ("columns", r"metadata\.parquet lacks columns \['parquet_row'\]: not a Major-TOM", None),
        ("nothing", r"the selection \(grid_cells=\('1U_1R',\)\) matches no cell", None),
        ("row", r"part_00001\.parquet has no row 7 \(it holds 2", 4),
        ("bands", r"part_00000\.parquet has no columns \['B05'\]", 0),
        ("product", r"row 0 holds product S2A_MSIL2A_20200302.*the metadata says WRONG", 0),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_nothing_marked_done(
    case, message, bad_cell, fixture_root, tmp_path, capsys
):
    root = tmp_path / "mt"
    shutil.copytree(fixture_root, root)
    l2a = root / DATASETS["s2_l2a"]
    meta = pq.read_table(l2a / "metadata.parquet").to_pandas()
    extra = []
    if case == "columns":
        meta.drop(columns="parquet_row").to_parquet(l2a / "metadata.parquet")
    elif case == "nothing":
        extra = ["--grid-cells", "1U_1R"]
    elif case == "row":
        meta.loc[4, "parquet_row"] = 7
        meta.to_parquet(l2a / "metadata.parquet")
    elif case == "bands":
        part = l2a / "images" / "part_00000.parquet"
        pq.write_table(pq.read_table(part).drop_columns(["B05"]), part, row_group_size=1)
    elif case == "product":
        meta.loc[0, "product_id"] = "WRONG"
        meta.to_parquet(l2a / "metadata.parquet")
    out = tmp_path / "bad.zarr"
    with serve(root) as srv:
        url = f"http://127.0.0.1:{free_port()}" if case == "unreachable" else srv.url
        args = ["majortom-remote", str(out), "--base-url", url, "--tile-size", "112",
                "--cell-size", "224", "--scheduler", "sync", "--no-progress"]  # fmt: skip
        code = main([*args, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.search(message, err[0]), err[0]
    if bad_cell is None:
        assert not out.exists()  # refused before anything is written
    else:
        written = zarr.open_group(str(out), mode="r")["written"][:]
        assert not written[4 * bad_cell : 4 * bad_cell + 4].any()


def test_local_folder_base_url_gives_the_same_store(fixture_root, local_store, tmp_path):
    out = str(tmp_path / "folder.zarr")
    prepare_majortom_remote(str(fixture_root), MODALITIES, out, Selection(), **RUN)
    stores_equal(out, local_store)


def test_s3_base_url_gives_the_same_store(
    s3_server, fixture_root, local_store, tmp_path, monkeypatch
):
    import fsspec

    create_bucket(s3_server)
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_server}",
                        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(fixture_root), "bucket/mt", recursive=True)
    fsspec.filesystem("s3").invalidate_cache()
    out = str(tmp_path / "s3.zarr")
    prepare_majortom_remote("s3://bucket/mt", MODALITIES, out, Selection(), **RUN)
    stores_equal(out, local_store)
