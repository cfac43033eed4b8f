"""Every command the README shows is run by a test, as written.

Commands run here from a fresh folder beside a link to ``../shared`` (as a clone sits beside it),
in README order, so each one starts from what the previous ones left. Two reach the internet in
the README; here the option that names the server points them at a loopback server serving a
fixture in the published layout (``--base-url``, ``--zenodo-api``). ``make`` lines run the command
``make -n`` expands them to. ``make demo`` and ``make test`` are the set-up commands: ``make -n``
must show the demo module (run at a small size by ``tests/demo/test_demo.py``) and pytest (what
CI runs). The GeoTIFF prep sequence is run by ``tests/prep/test_prep_readme.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from data_prep import benchmarks
from tests.conftest import shared_path
from tests.data_prep.test_benchmarks import zip_folder
from tests.generators.benchmarks import write_geobench
from tests.generators.http_server import serve
from tests.generators.majortom_real import write_real_fixture
from tests.prep.test_prep_readme import readme_sequence

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def fenced(language: str) -> list[str]:
    """The README's code blocks in ``language``."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def commands() -> list[str]:
    """Every command line of the README's bash blocks (comments dropped, continuations joined)."""
    lines = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(" ".join(line.split()))
    return lines


SETUP = ["make demo", "make test"]
REMOTE = [
    "terrafm-data majortom-remote data/denmark.zarr --bbox 8 54.5 13 58 --max-cloud 40 --dry-run",
    "make data-benchmarks DATA=data/benchmarks NAMES=geobench-m-eurosat",
]
PRETRAIN = [
    "terrafm-data synthetic data/synthetic_tiny.zarr --samples 32 --tile-size 64",
    "terrafm fit --config experiments/pretrain_tiny_cpu.yaml",
    "terrafm plan --config experiments/pretrain_terrafm_b.yaml --devices 8 --gpu-memory 80",
    "make eval CKPT=outputs/pretrain_tiny_cpu/runs/version_0/checkpoints/last.ckpt "
    "DATA=../shared/data SPLIT_SEED=0",
]


def test_every_readme_command_is_run_by_a_test() -> None:
    prep = [" ".join(shlex.split(c)) for c in readme_sequence()]
    assert commands() == [*SETUP, *prep, *REMOTE, *PRETRAIN]
    assert len(fenced("python")) == 1


def make_n(target: str, *variables: str) -> list[str]:
    """The recipe lines ``make -n`` prints for ``target`` (its ``install`` prerequisite skipped)."""
    # Under `make test` the parent make's variables would add "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", target, *variables],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in result.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def test_setup_commands_are_the_demo_module_and_pytest() -> None:
    assert make_n("demo")[-1].split() == [
        ".venv/bin/python", "-m", "terrafm_lightning.demo.run", "--out", "reports/demo",
    ]  # fmt: skip
    assert make_n("test")[-1].split() == [".venv/bin/pytest", "-q"]


@pytest.fixture
def clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder with the repo's experiments, beside a link to ``../shared``."""
    (tmp_path / "shared").symlink_to(shared_path("data").parent)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(repo)
    return repo


def run(line: str, *extra: str) -> subprocess.CompletedProcess:
    """A README command line, its program taken from this Python's environment."""
    program, *args = shlex.split(line)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / program), *args, *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_data_from_the_source(clone: Path, tmp_path: Path) -> None:
    # Major-TOM Core, the layout of its published datasets, written from the real samples.
    write_real_fixture(shared_path("data", "terramind_examples"), tmp_path / "majortom")
    with serve(tmp_path / "majortom") as server:
        out = run(REMOTE[0], "--base-url", server.url).stdout.splitlines()
    # The one location in Denmark (57.2 N, 9.8 E), its S2 cloud cover 30 %; nothing written.
    assert out[0] == "1 cells -> 4 tiles"
    assert [line.split(":")[0] for line in out[1:4]] == ["Core-S1RTC", "Core-S2L1C", "Core-S2L2A"]
    assert out[-1].startswith("637U_59R: S1A_IW_GRDH_1SDV_20210930")
    assert not (clone / "data").exists()

    # The GEO-Bench recipe: its Zenodo record served with a task archive.
    write_geobench(tmp_path / "task", n=6)
    served = tmp_path / "served"
    (served / "records").mkdir(parents=True)
    (served / "files").mkdir()
    archive = served / "files" / "m-eurosat.zip"
    checksum = zip_folder(tmp_path / "task", archive)
    record = benchmarks.GEOBENCH["m-eurosat"][1]
    with serve(served) as server:
        link = f"{server.url}/files/m-eurosat.zip"
        files = [{"key": archive.name, "checksum": checksum, "links": {"self": link}}]
        (served / "records" / record).write_text(json.dumps({"files": files}))
        line = make_n("data-benchmarks", *shlex.split(REMOTE[1])[2:])[-1]
        python, script, *args = line.split()
        assert (python, script) == (".venv/bin/python", "data_prep/benchmarks.py")
        assert benchmarks.main([*args, "--zenodo-api", f"{server.url}/records"]) == 0
    task = clone / "data" / "benchmarks" / "geobench" / "classification_v0.9.1" / "m-eurosat"
    assert len(list(task.glob("*.hdf5"))) == 6


@pytest.mark.slow
def test_pretrain_plan_and_evaluate(clone: Path) -> None:
    run(PRETRAIN[0])
    assert xr.open_zarr(clone / "data" / "synthetic_tiny.zarr")["written"].values.sum() == 32
    run(PRETRAIN[1])
    last = clone / "outputs" / "pretrain_tiny_cpu" / "runs" / "version_0" / "checkpoints"
    assert (last / "last.ckpt").is_file()

    plan = run(PRETRAIN[2]).stdout
    assert "terrafm_base, 141,412,096 parameters in the student" in plan
    assert "bf16-mixed; DDP over 8 devices" in plan

    line = make_n("eval", *shlex.split(PRETRAIN[3])[2:])[-1]
    python, *args = line.split()
    assert python == ".venv/bin/python"
    run(f"python {' '.join(args)}")
    results = json.loads((clone / "outputs" / "eval" / "results.json").read_text())
    assert sorted({row["dataset"] for row in results["rows"]}) == [
        "bigearthnet_examples",
        "geobench_v1/brick_kiln_v1.0",
    ]
    assert sorted(Path(n["path"]).name for n in results["not_evaluated"]) == [
        "s2_l1c_scene",
        "terramind_examples",
        "worldcover",
    ]


def test_python_example_runs() -> None:
    namespace: dict[str, object] = {}
    exec(compile(fenced("python")[0], "README.md", "exec"), namespace)  # noqa: S102
    assert tuple(namespace["logits"].shape) == (2, 10)
