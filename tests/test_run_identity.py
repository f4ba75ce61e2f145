"""One run identity, checked everywhere, and the promises that came with it (issue 22): a relaunch from
config.json goes through the flags' checks, a save that fails on a full disk leaves the previous state, the
cache does not move the seeded streams, and what cannot be used is refused in one line or listed."""
import errno
import io
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from conftest import assert_one_line_error, run_entry, run_in_process
from PIL import Image

from mirl import cache, checkpoints, study
from mirl.checkpoints import CheckpointStore, check_same_run, load_checkpoint
from mirl.config import PretrainConfig, identity_differences
from mirl.datasets import ISIC, ImageDataset, find_images, read_info_cfg, read_label_csv
from mirl.encoders import build_encoder, check_input_size
from mirl.errors import CheckpointError, DataError, InputError, OutputError, UnreadableImageError
from mirl.imaging import read_dicom_image
from mirl.run_files import open_run, release_output_dirs
from mirl.sample_data import write_acdc
from mirl.splits import load_splits

TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--device", "cpu"]


def stopped_by_parser(capsys, folder: str, script: str, *args) -> str:
    """The one line a flag (or a recorded flag) error prints, checked to be one line with exit code 2."""
    with pytest.raises(SystemExit) as stopped:
        run_entry(capsys, folder, script, *args)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------- the identity itself

def test_the_identity_holds_what_changes_training_and_leaves_out_where_and_how_fast():
    config = PretrainConfig(method="mocov2", data_root=Path("d"), output_dir=Path("o"), split_dir=Path("s"),
                            options={"temperature": 0.2})
    identity = config.identity()
    assert {"seed", "lr", "image_size", "augment", "data_root", "precision", "temperature"} <= set(identity)
    assert not {"output_dir", "workers", "device", "cache", "resume", "keep", "save_every"} & set(identity)
    moved = PretrainConfig(method="mocov2", data_root=Path("d"), output_dir=Path("elsewhere"), split_dir=Path("s"),
                           options={"temperature": 0.2}, workers=0, device="cpu", cache=Path("c"))
    assert identity_differences(identity, moved.identity()) == []
    other = PretrainConfig(method="mocov2", data_root=Path("d"), output_dir=Path("o"), split_dir=Path("s"),
                           options={"temperature": 0.5}, seed=1)
    assert identity_differences(identity, other.identity()) == ["seed", "temperature"]


def test_a_state_that_does_not_record_a_field_cannot_vouch_for_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"seed \(not recorded\) -> 0"):
        check_same_run({"run": {"method": "moco"}}, {"method": "moco", "seed": 0}, tmp_path / "state.pth")


# ---------------------------------------------------------------- a save that fails on a full disk

class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 50_000

    def write(self, data) -> int:
        FullDisk.room -= len(data)
        if FullDisk.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_state_stays(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep=2, publish=True)
    store.save({"weights": torch.ones(4)}, 0, 1)
    monkeypatch.setattr(FullDisk, "room", 50_000)
    monkeypatch.setattr(checkpoints, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))
    with pytest.raises(OutputError) as error:
        store.save({"weights": torch.zeros(100_000)}, 0, 2)  # torch.save raises RuntimeError here, not OSError
    assert "no space left" in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.rglob("*.tmp"))  # the partial file does not keep the disk full
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint.pth")["weights"], torch.ones(4))
    assert [p.name for p in store.states()] == ["state-e0000-b000001.pth"]


def test_leftovers_of_an_interrupted_write_are_removed_when_the_run_opens_its_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    leftover = tmp_path / "checkpoints" / "state-e0000-b000002.pth.12345.tmp"
    leftover.write_bytes(bytes(1000))
    open_run(tmp_path, keep=2, publish=True, resume="auto")
    release_output_dirs()
    assert not leftover.exists()


# ---------------------------------------------------------------- the cache and the seeded streams

def test_building_the_cache_leaves_the_seeded_random_streams_alone(isic_root, tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    cache.open_cache(ISIC, isic_root, 32, tmp_path / "cache", workers=0)
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()


# ---------------------------------------------------------------- --config relaunches

def write_config(path: Path, script: str, **flags) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"script": script, "flags": flags}))
    return path


@pytest.mark.parametrize("flags,words", [
    ({"batch_size": 1}, ["batch-size", "at least 2"]),
    ({"image_size": 8}, ["image-size", "at least 32"]),
    ({"seed": -1}, ["seed"]),
    ({"epochs": [1, 2]}, ["epochs", "expected one value"]),
    ({"batch_sise": 16}, ["'batch_sise' is not a flag"]),
    ({"deterministic": "yes"}, ["deterministic", "true or false"]),
    ({"moco_momentum": "nan"}, ["moco-momentum"]),
])
def test_recorded_values_pass_the_same_checks_as_flags(tmp_path, capsys, flags, words):
    config = write_config(tmp_path / "run" / "config.json", "rsna/trainMoCoV2.py", **flags)
    line = stopped_by_parser(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--config", config)
    assert f"--config {config}" in line and all(word in line for word in words), line


@pytest.mark.parametrize("written_by,script", [("rsna/MoCov2_downstream.py", "trainSimCLR.py"),
                                               ("rsna/trainSimCLR.py", "SimCLR_downstream.py"),
                                               ("isic/trainSimCLR.py", "trainSimCLR.py")])
def test_a_config_names_its_script_and_no_other_script_takes_it(tmp_path, capsys, written_by, script):
    config = write_config(tmp_path / "run" / "config.json", written_by, resnet=True)
    line = stopped_by_parser(capsys, "RSNA_MoCo", script, "--config", config)
    assert f"written by {written_by}" in line and f"rsna/{script}" in line


@pytest.mark.slow
def test_an_own_labels_run_relaunches_from_its_config(isic_root, tmp_path):
    labels = tmp_path / "labels.csv"
    truth = pd.read_csv(isic_root / "ISIC_2019_Training_GroundTruth.csv")
    truth[["image", "MEL", "NV"]].assign(MEL=lambda t: t.MEL.astype(int), NV=lambda t: 1 - t.MEL.astype(int)) \
        .to_csv(labels, index=False)
    first = run_in_process("ISIC", "trainSimCLR.py", "--data-root", isic_root, "--labels", labels, *TINY, "--epochs",
                           "1", "--knn-images", "0", "--output-dir", tmp_path / "first",
                           "--split-dir", tmp_path / "splits")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_in_process("ISIC", "trainSimCLR.py", "--config", tmp_path / "first" / "config.json",
                           "--output-dir", tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    recorded = json.loads((tmp_path / "again" / "config.json").read_text())
    assert recorded["labels"] == str(labels) and recorded["dataset"] == "isic:labels.csv"
    assert recorded["run_id"] == json.loads((tmp_path / "first" / "config.json").read_text())["run_id"]


# ---------------------------------------------------------------- one-line errors before heavy work

@pytest.mark.parametrize("flag,value", [("--seed", "4294967296"), ("--moco-momentum", "nan"),
                                        ("--moco-momentum", "inf"), ("--temperature", "nan"), ("--lr", "inf"),
                                        ("--workers", "-1")])
def test_out_of_range_and_non_finite_flags_are_one_line(capsys, flag, value):
    line = stopped_by_parser(capsys, "RSNA_MoCo", "trainMoCoV2.py", flag, value)
    assert flag in line


def test_the_study_and_the_cache_refuse_negative_workers_and_repeated_seeds(tmp_path, capsys):
    for main, argv in ((study.main, ["rsna", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                                     "--workers", "-1"]),
                       (study.main, ["rsna", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                                     "--seeds", "0", "0"]),
                       (cache.main, ["rsna", "--data-root", str(tmp_path), "--cache", str(tmp_path / "c"),
                                     "--workers", "-1"])):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and len(lines) == 1 and ("--workers" in lines[0] or "--seeds: 0" in lines[0])


def test_init_weights_of_another_architecture_are_refused_before_the_cache_is_built(rsna_root, tmp_path, capsys):
    torch.save(build_encoder("resnet18")[0].state_dict(), tmp_path / "resnet18.pth")
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, *TINY, "--arch", "resnet50",
                       "--init-weights", tmp_path / "resnet18.pth", "--cache", tmp_path / "cache",
                       "--output-dir", tmp_path / "run", "--split-dir", tmp_path / "splits")
    assert_one_line_error(result, "resnet18.pth", "does not fit")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("arch", ["timm:maxvit_pico_rw_256", "timm:coatnet_nano_rw_224"])
def test_a_model_that_cannot_take_the_image_size_is_refused_by_a_forward_pass(arch):
    with pytest.raises(InputError, match=rf"--arch {arch} cannot take 32 px images"):
        check_input_size(arch, 32)


def test_a_transformer_that_takes_any_size_passes_the_check():
    check_input_size("timm:twins_svt_small", 32)


def test_a_cache_folder_that_cannot_be_read_is_one_line(isic_root, tmp_path, monkeypatch):
    real_is_dir = Path.is_dir

    def denied(path: Path) -> bool:
        if path.parent == tmp_path / "cache":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_is_dir(path)
    monkeypatch.setattr(Path, "is_dir", denied)
    with pytest.raises(OutputError, match=r"--cache .* cannot be written or read \(Permission denied\)"):
        cache.open_cache(ISIC, isic_root, 32, tmp_path / "cache", workers=0)


def test_an_acdc_info_cfg_with_a_byte_order_mark_reads(tmp_path):
    root = write_acdc(tmp_path / "acdc", patients=3, size=16)
    info = next(root.rglob("Info.cfg"))
    info.write_bytes(b"\xef\xbb\xbf" + info.read_bytes())
    assert read_info_cfg(info)["ED"].isdigit()


# ---------------------------------------------------------------- silent data choices made visible

def photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(path)
    return path


def test_one_image_under_two_patients_is_refused(tmp_path):
    for name in ("a", "b", "c"):
        photo(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text("image,x,y,patient\na,1,0,p1\nb,0,1,p2\nc,1,0,p3\na,1,0,p9\n")
    with pytest.raises(DataError, match=r"row 5: image a is in patient 'p9' here but 'p1' in row 2"):
        read_label_csv(tmp_path / "labels.csv", tmp_path, group_column="patient")


def test_one_name_for_two_files_in_two_folders_is_refused(tmp_path):
    for name in ("one/a", "two/a", "b", "c"):
        photo(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text("image,x,y\na,1,0\nb,0,1\nc,1,0\n")
    with pytest.raises(DataError, match=r"row 2: image a names 2 files .*one/a.png, two/a.png"):
        read_label_csv(tmp_path / "labels.csv", tmp_path)


@pytest.mark.parametrize("line_break", ["\n", "\u2028"])
def test_a_file_name_with_a_line_break_is_refused_before_any_split(tmp_path, line_break):
    for name in (f"a{line_break}b", "c", "d", "e"):
        photo(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text(f'image,x,y\n"a{line_break}b",1,0\nc,0,1\nd,1,0\ne,0,1\n')
    records, _, _ = read_label_csv(tmp_path / "labels.csv", tmp_path)
    with pytest.raises(DataError, match="line break in its name"):
        load_splits(ISIC, records, tmp_path / "splits")
    assert not (tmp_path / "splits").exists()


def test_an_unreadable_volume_in_an_unlabelled_folder_is_listed_not_left_out(tmp_path):
    photo(tmp_path / "a.png")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 2), dtype=np.float32), np.eye(4)), tmp_path / "good.nii.gz")
    records = find_images(tmp_path)
    assert [r.image_id for r in records] == ["a", "broken_t00_s00", "good_t00_s00", "good_t00_s01"]
    dataset = ImageDataset(records, 32, 0)
    assert [bool(dataset[i][2]) for i in range(len(records))] == [True, False, True, True]
    assert "not a readable NIfTI volume" in dataset.why_unreadable(1)


def test_a_ct_slice_with_rescale_slope_zero_is_unreadable(rsna_root, tmp_path):
    source = next(rsna_root.rglob("*.dcm"))
    ds = pydicom.dcmread(source)
    ds.RescaleSlope = 0
    ds.save_as(tmp_path / "flat.dcm")
    with pytest.raises(UnreadableImageError, match="RescaleSlope 0"):
        read_dicom_image(tmp_path / "flat.dcm")


def test_the_study_refuses_a_damaged_pretraining_only_when_no_intact_state_is_left(tmp_path):
    states = tmp_path / "checkpoints"
    states.mkdir()
    torch.save({"run": {"seed": 0}, "epoch": 1}, states / "state-e0001-b000000.pth")
    (states / "state-e0002-b000000.pth").write_bytes(b"cut short")
    assert study.recorded_pretraining(tmp_path) == ({"seed": 0}, 1)
    (states / "state-e0001-b000000.pth").write_bytes(b"cut short too")
    with pytest.raises(CheckpointError, match="not a loadable MIRL checkpoint"):
        study.recorded_pretraining(tmp_path)


def test_a_finished_run_that_cannot_vouch_for_its_settings_is_not_reused(tmp_path, capsys):
    # an unfinished study folder whose finished run was made by an older MIRL (no identity): refused, one line
    run = tmp_path / "out" / "runs" / "supervised_100F_seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"best_epoch": 1, "test": {}, "val": {}}))
    root = tmp_path / "data"
    for i in range(6):
        photo(root / f"i{i}.png")
    (tmp_path / "labels.csv").write_text("image,x,y\n" + "".join(f"i{i},{i % 2},{1 - i % 2}\n" for i in range(6)))
    code = study.main(["isic", "--data-root", str(root), "--labels", str(tmp_path / "labels.csv"),
                       "--output-dir", str(tmp_path / "out"), "--methods", "supervised", "--fractions", "100",
                       *TINY[:4], "--workers", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess("study", code, captured.out, captured.err),
                          "other settings", "(not recorded)")
