"""The README's code blocks run as printed (issue 23), with the sizes a test can afford: a block that stops
working fails here, not in a reader's hands."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mirl.sample_data import write_rsna

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"
# what a test changes in a block: smaller images and fewer epochs, nothing else
AFFORDABLE = ((r"image_size=64", "image_size=32"), (r"--image-size 64", "--image-size 32"),
              (r"--epochs \d+", "--epochs 1"), (r"epochs=\d+", "epochs=1"))


def block_after(text: str, language: str, marker: str) -> str:
    """The first ```language block after `marker` in the README."""
    start = README.read_text().index(marker)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(README.read_text(), start)
    assert match is not None, marker
    block = match.group(1)
    for pattern, replacement in AFFORDABLE:
        block = re.sub(pattern, replacement, block)
    return block


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working folder laid out like the repository's root: the RSNA scripts and their sample data."""
    shutil.copytree(README.parent / "RSNA_MoCo", tmp_path / "RSNA_MoCo",
                    ignore=shutil.ignore_patterns("data", "runs", "splits", "__pycache__"))
    write_rsna(tmp_path / "RSNA_MoCo" / "data", patients=16, size=64, seed=1)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_python_blocks_run_as_printed(project):
    exec(block_after(README.read_text(), "python", "From Python (a notebook, a sweep)"), {})
    namespace: dict = {}
    exec(block_after(README.read_text(), "python", "The pretraining checkpoint's `encoder` entry loads"), namespace)
    encoder = namespace["encoder"]
    assert isinstance(encoder, torch.nn.Module) and encoder.fc.in_features == 512  # the resnet18 the run trained


def test_the_small_first_run_runs_as_printed(project):
    block = block_after(README.read_text(), "bash", "A first run on the sample data")
    for line in block.strip().splitlines():
        command = line.split()
        assert command[0] == "python"
        result = subprocess.run([sys.executable, *command[1:], "--workers", "0", "--device", "cpu"],
                                cwd=project / "RSNA_MoCo", capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    runs = project / "RSNA_MoCo" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["mocov2", "mocov2_frozen_10F", "resnet_10F"]
    assert all((runs / name / "metrics.json").is_file() for name in ("mocov2_frozen_10F", "resnet_10F"))
