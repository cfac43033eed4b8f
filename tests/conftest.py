"""Shared fixtures: the real samples in ../shared and small synthetic inputs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("TERRAFM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REQUIRE_SHARED = os.environ.get("TERRAFM_REQUIRE_SHARED_DATA") == "1"


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips (or fails when CI requires it) if it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"real sample {path} absent (set TERRAFM_SHARED to the shared folder)"
        if REQUIRE_SHARED:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only 32-tile, 64 px synthetic store (all modalities, WorldCover), made once."""
    from tests.generators.stores import make_synthetic_store

    return make_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic.zarr")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_options(port: int) -> dict:
    """fsspec/s3fs storage options for the loopback S3 server on ``port``."""
    return {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        # Fail fast once the server is gone (the unreachable-store check).
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }


def create_bucket(port: int, name: str = "bucket") -> None:
    """Create bucket ``name`` on the loopback S3 server."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=name)


@pytest.fixture
def s3_server() -> Iterator[int]:
    """A real S3 API server (moto in server mode) on loopback; yields its port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield port
    finally:
        server.stop()


ROOT = Path(__file__).resolve().parents[1]


def run_rank_script(script: str, out: Path, devices: int) -> None:
    """Run ``tests/scripts/<script> OUT DEVICES`` in a fresh interpreter (it spawns the ranks)."""
    # This tree's src/ first, so a checkout whose venv installs another tree tests its own code.
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / script), str(out), str(devices)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
