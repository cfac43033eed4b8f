"""The Python snippets of docs/use_elsewhere.md run as written (one session, in order)."""

import re
from pathlib import Path

import pytest

from tests.conftest import shared_path
from tests.generators.weights import write_released

DOC = Path(__file__).resolve().parents[2] / "docs" / "use_elsewhere.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_use_elsewhere_snippets_run(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 4
    write_released(
        shared_path("reference", "terrafm_checkpoint_keys.json"),
        tmp_path / "TerraFM-B.pth",
        tiny=False,
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["logits"].shape == (2, 10)
    assert namespace["masks"].shape == (1, 5, 64, 64)
    assert namespace["fused"].output.shape == (1, 5, 64, 64)
