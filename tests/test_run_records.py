"""Run folders that keep runs on different data apart, checkpoints refused on other data, and run records
complete enough to rerun a run: defaults in --help, the code version, package versions, readable logs."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, assert_one_line_error, run_entry, run_in_process, script_folder

from mirl.cli import data_folder_name, pretrain_parser
from mirl.config import DownstreamConfig
from mirl.datasets import ImageRecord
from mirl.downstream import check_pretraining_data
from mirl.errors import CheckpointError
from mirl.run_files import provenance
from mirl.sample_data import write_isic
from mirl.splits import split_digest


def test_each_data_folder_has_its_own_default_run_folder(tmp_path, monkeypatch):
    scripts = tmp_path / "ISIC"
    assert data_folder_name(scripts, scripts / "data", None) is None  # the scripts' own data/: plain runs/
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path)
    a = data_folder_name(scripts, tmp_path / "a", None)
    assert a.startswith("a-") and a == data_folder_name(scripts, Path("a"), None) == \
        data_folder_name(scripts, Path("b") / ".." / "a", None)
    assert len({a, data_folder_name(scripts, tmp_path / "b", None),
                data_folder_name(scripts, tmp_path / "a", tmp_path / "labels.csv")}) == 3


def probe(tmp_path: Path, transfer: bool = False) -> DownstreamConfig:
    return DownstreamConfig(method="mocov2", data_root=tmp_path / "a", split_dir=tmp_path / "s",
                            output_dir=tmp_path / "o", pretrained=tmp_path / "p.pth", transfer=transfer)


def test_an_encoder_pretrained_with_another_test_split_held_out_is_refused_unless_a_transfer(tmp_path):
    test = [ImageRecord(f"img{i}", tmp_path / f"img{i}.png", np.zeros(2)) for i in range(3)]
    check_pretraining_data(probe(tmp_path), {"root": "/elsewhere", "test_split": split_digest(
        [r.image_id for r in reversed(test)])}, test)  # the same test images: accepted wherever they lay
    other = {"root": str(tmp_path / "a"), "test_split": split_digest(["img0", "img1"])}
    with pytest.raises(CheckpointError, match="may have seen these test images"):
        check_pretraining_data(probe(tmp_path), other, test)
    check_pretraining_data(probe(tmp_path, transfer=True), other, test)
    with pytest.raises(CheckpointError, match="pretrained on /elsewhere"):  # pretrained on a folder without labels
        check_pretraining_data(probe(tmp_path), {"root": "/elsewhere", "test_split": None}, test)
    check_pretraining_data(probe(tmp_path), {"root": str(tmp_path / "a"), "test_split": None}, test)
    check_pretraining_data(probe(tmp_path), None, test)  # an older MIRL's checkpoint says nothing


def test_help_shows_the_defaults():
    text = pretrain_parser("rsna", "mocov2", REPO / "RSNA_MoCo").format_help()
    assert "(default: 256)" in text and "(default: 0.999)" in text and "(default: views)" in text


def test_a_run_records_the_code_version_and_the_packages():
    import numpy
    import torch
    record = provenance()
    assert record["torch"] == torch.__version__ and record["numpy"] == numpy.__version__
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        assert record["git_commit"] == head and isinstance(record["git_uncommitted_changes"], bool)


@pytest.mark.slow
def test_own_data_runs_apart_and_a_checkpoint_of_other_data_is_refused(isic_root, tmp_path, capsys):
    """The README's own-data commands after the sample's: each lands in its own run folder, and downstream
    on other data does not silently take the sample's checkpoint."""
    other = write_isic(tmp_path / "other", patients=16, size=48, seed=7)
    for data in (isic_root, other):
        assert run_entry(capsys, "ISIC", "trainMoCoV2.py", "--data-root", data, *TINY, "--knn-images", "0",
                         "--batch-size", "8").returncode == 0
    runs = script_folder("ISIC") / "runs"
    assert {p.parent.parent.name for p in runs.glob("*/mocov2/checkpoint.pth")} == {
        data_folder_name(script_folder("ISIC"), d, None) for d in (isic_root, other)}
    sample_checkpoint = runs / data_folder_name(script_folder("ISIC"), isic_root, None) / "mocov2" / "checkpoint.pth"
    refused = run_entry(capsys, "ISIC", "MoCov2_downstream.py", "--data-root", other, "--pretrained",
                        sample_checkpoint, "--frozen", *TINY, "--batch-size", "8")
    assert_one_line_error(refused, "other data", "--transfer")
    result = run_in_process("ISIC", "MoCov2_downstream.py", "--data-root", other, "--frozen", *TINY, "--batch-size",
                            "8")
    assert result.returncode == 0, result.stderr
    record = json.loads(next((runs / data_folder_name(script_folder("ISIC"), other, None)).glob(
        "mocov2_frozen_100F/config.json")).read_text())
    assert record["pretrained"].startswith(str(runs)) and Path(record["data_root"]).is_absolute()
    assert record["software"]["torch"] and record["precision"] in ("fp32", "bf16")
    assert "epoch 1/1  loss " in result.stdout and "\r" not in result.stdout and "\x1b" not in result.stdout
