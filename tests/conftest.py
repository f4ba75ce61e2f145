"""Shared fixtures: one small RSNA-format sample dataset for the whole session."""
from pathlib import Path

import pytest

from mirl.sample_data import write_rsna

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def rsna_root(tmp_path_factory) -> Path:
    """16 patients of 64-pixel CT slices, written by the project's own sample writer."""
    return write_rsna(tmp_path_factory.mktemp("rsna"), patients=16, size=64, seed=1)
