"""Shared fixtures: small sample datasets for the whole session, and the dataset folders' scripts run from
copies, so that a user's own `data/`, `splits/` and `runs/` beside the real scripts neither change a test's
outcome nor get written to."""
import io
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from functools import cache
from pathlib import Path

import pytest
import torch

from mirl.sample_data import write_acdc, write_isic, write_rsna

REPO = Path(__file__).resolve().parent.parent
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--epochs", "1",
        "--device", "cpu"]


_COPIES: list[Path] = []


@cache
def script_folder(folder: str) -> Path:
    """A copy of a dataset folder's scripts (without its data, splits or runs), shared by the session: their
    default data, split and output folders are beside the copy."""
    _COPIES.append(Path(tempfile.mkdtemp(prefix=f"mirl-{folder}-")))
    copy = _COPIES[-1] / folder
    copy.mkdir()
    for script in (REPO / folder).glob("*.py"):
        shutil.copy2(script, copy)
    return copy


@pytest.fixture(scope="session", autouse=True)
def _remove_script_copies():
    yield
    for root in _COPIES:
        shutil.rmtree(root, ignore_errors=True)


def run_script(folder: str, script: str, *args) -> subprocess.CompletedProcess:
    """Run one of the dataset folders' scripts the way a user does: from its folder (a copy of it)."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=script_folder(folder), capture_output=True,
                          text=True, timeout=600)


SCRIPTS = {"trainMoCo.py": ("pretrain", "moco"), "trainMoCoV2.py": ("pretrain", "mocov2"),
           "trainSimCLR.py": ("pretrain", "simclr"), "MoCo_downstream.py": ("downstream", "moco"),
           "MoCov2_downstream.py": ("downstream", "mocov2"), "SimCLR_downstream.py": ("downstream", "simclr"),
           "trainBYOL.py": ("pretrain", "byol"), "BYOL_downstream.py": ("downstream", "byol"),
           "trainDINO.py": ("pretrain", "dino"), "DINO_downstream.py": ("downstream", "dino")}
DATASET_OF_FOLDER = {"RSNA_MoCo": "rsna", "ISIC": "isic", "ACDC": "acdc"}


def call_entry_point(folder: str, script: str, args: tuple) -> int:
    """A script's entry point called in this process, with the script's own file and folder. What
    `--deterministic` switches on stays with its run: later tests get the setting they had."""
    from mirl.cli import downstream_script, pretrain_script
    kind, method = SCRIPTS[script]
    entry = pretrain_script if kind == "pretrain" else downstream_script
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return entry(DATASET_OF_FOLDER[folder], method, str(script_folder(folder) / script), [str(a) for a in args])
    finally:
        torch.use_deterministic_algorithms(deterministic)


def run_entry(capsys, folder: str, script: str, *args) -> subprocess.CompletedProcess:
    """A script run in this process, its output read from capsys; a flag the parser refuses raises SystemExit:
    for runs that must stop before training, which would otherwise each pay a python and torch start-up."""
    capsys.readouterr()
    code = call_entry_point(folder, script, args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(script, code, captured.out, captured.err)


def run_in_process(folder: str, script: str, *args) -> subprocess.CompletedProcess:
    """A script run in this process with its output captured, as `run_script` reports it (a refused flag is
    exit code 2): a successful run that would otherwise pay a python and torch start-up (about 3 s). `run_script`
    stays where the process itself is under test (signals, torchrun, the README's commands, the first pretraining
    of a method)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = call_entry_point(folder, script, args)
    except SystemExit as stopped:
        code = stopped.code
    return subprocess.CompletedProcess(script, code, out.getvalue(), err.getvalue())


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
