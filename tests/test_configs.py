"""Every YAML in ``experiments/`` parses and prints, as documented in its header, with no data.

One test over all configs (torchgeo's ``tests/conf`` idea): each file's header names the
``terrafm <subcommand> --config ...`` line that runs it; that line with ``--print_config`` must
succeed from an empty folder (no store, no dataset, no checkpoint on disk).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from terrafm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").glob("*.yaml"))
COMMAND = re.compile(r"^#\s+(?:srun\s+)?terrafm\s+(fit|validate|test|predict)\s+(.*)$", re.M)


def documented_command(config: Path) -> list[str]:
    """Subcommand and ``--config`` files of the first command line in the config's header."""
    found = COMMAND.search(config.read_text())
    assert found, f"{config.name}: header documents no `terrafm <subcommand> --config` line"
    configs = re.findall(r"--config\s+(\S+)", found.group(2))
    assert f"experiments/{config.name}" in configs, f"{config.name}: header runs another file"
    args = [found.group(1)]
    for path in configs:
        args += ["--config", str(ROOT / path)]
    return args


def test_every_config_is_covered() -> None:
    assert len(CONFIGS) >= 17


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_prints_without_data(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*documented_command(config), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err[-2000:]
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"].startswith("terrafm_lightning.")
    assert printed["data"]["class_path"].startswith("terrafm_lightning.")
    assert not any(tmp_path.iterdir()), "printing a config wrote files"
