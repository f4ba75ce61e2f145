"""Shared fixtures: one small RSNA-format sample dataset for the whole session."""
import subprocess
import sys
from pathlib import Path

import pytest

from mirl.sample_data import write_acdc, write_isic, write_rsna

REPO = Path(__file__).resolve().parent.parent
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--epochs", "1",
        "--device", "cpu"]


def run_script(folder: str, script: str, *args) -> subprocess.CompletedProcess:
    """Run one of the dataset folders' scripts the way a user does: from its folder."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO / folder, capture_output=True,
                          text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture(scope="session")
def rsna_root(tmp_path_factory) -> Path:
    """16 patients of 64-pixel CT slices, written by the project's own sample writer."""
    return write_rsna(tmp_path_factory.mktemp("rsna"), patients=16, size=64, seed=1)


@pytest.fixture(scope="session")
def isic_root(tmp_path_factory) -> Path:
    """24 lesions (three per class, UNK none) of 2-3 JPEGs each at 48 pixels."""
    return write_isic(tmp_path_factory.mktemp("isic"), patients=24, size=48, seed=1)


@pytest.fixture(scope="session")
def acdc_root(tmp_path_factory) -> Path:
    """10 patients (two per group) of 32-pixel cine MRI."""
    return write_acdc(tmp_path_factory.mktemp("acdc"), patients=10, size=32, seed=1)
