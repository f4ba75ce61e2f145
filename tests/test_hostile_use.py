"""The Guarantees under hostile use: each case ends with the promise kept. The run continues with the file
skipped and listed, or stops with one line and exit code 2 before training, or saves its state and exits
130; nothing trained is overwritten or lost; no identifying tag reaches the console or a file."""
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import TINY, assert_one_line_error, run_entry, run_script, script_folder
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from mirl.imaging import dicom_patient_group, read_dicom_image, read_nifti_slice, read_photo
from mirl.sample_data import write_isic

PRETRAIN = [*TINY, "--knn-images", "0", "--keep-states"]


def png_folder(root: Path, count: int = 24) -> Path:
    """A folder of small grey PNGs, as a user's own unlabelled images."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def pretrained(rsna_root: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return run_script("RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--split-dir", out.parent / "splits",
                      "--output-dir", out, *PRETRAIN, *extra)


def assert_error_line(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2 and one `error:` line, after whatever progress bars came before it; no traceback."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), result.stderr[-2000:]


@pytest.fixture(scope="module")
def finished(rsna_root, tmp_path_factory) -> Path:
    """A finished one-epoch MoCo v2 pretraining."""
    out = tmp_path_factory.mktemp("finished") / "mocov2"
    result = pretrained(rsna_root, out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run's output dir that a test may damage."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


# ---------------------------------------------------------------- pre-emption

@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves_the_state(rsna_root, tmp_path):
    """What SLURM sends before pre-empting a job: SIGTERM to every process of the job, data workers too."""
    out = tmp_path / "run"
    command = [sys.executable, "trainMoCoV2.py", "--data-root", str(rsna_root), "--split-dir", str(tmp_path / "s"),
               "--output-dir", str(out), *TINY, "--epochs", "50", "--workers", "2", "--knn-images", "0",
               "--save-minutes", "0"]
    process = subprocess.Popen(command, cwd=script_folder("RSNA_MoCo"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("state-*.pth")):  # training is under way, workers running
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-2000:]
    assert "SIGTERM received: saved the state" in stderr
    saved = Path(stderr.split(" to ", 1)[1].split(";")[0])
    assert torch.load(saved, weights_only=True)["run"]["method"] == "mocov2"


# ---------------------------------------------------------------- odd files

@pytest.mark.slow
def test_a_corrupt_file_whose_name_is_not_utf8_is_skipped_and_listed(tmp_path, capsys):
    root = png_folder(tmp_path / "images")
    bad = root / os.fsdecode(b"bad\xff.png")
    bad.write_bytes(b"x")
    common = ["--data-root", root, "--split-dir", tmp_path / "splits", "--output-dir", tmp_path / "out", *PRETRAIN,
              "--batch-size", "8", "--queue-size", "8"]
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    listed = (tmp_path / "out" / "skipped.csv").read_text(encoding="utf-8")  # valid UTF-8 for a person to read
    assert "bad\\xff.png" in listed
    again = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", *common, "--resume", "auto")
    assert again.returncode == 0, again.stderr[-2000:]
    from mirl.cache import main as cache_main
    assert cache_main(["rsna", "--data-root", str(root), "--cache", str(tmp_path / "cache"), "--image-size", "32",
                       "--workers", "0"]) == 0


def test_a_nan_voxel_does_not_blank_its_volume(tmp_path):
    volume = np.random.default_rng(0).uniform(0, 500, (16, 16, 4)).astype(np.float32)
    volume[3, 3, 1] = np.nan
    path = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    slices = [read_nifti_slice(path, z) for z in range(4)]
    assert all(s.std() > 20 for s in slices)  # before: every slice came out black
    assert slices[1][3, 3, 0] == 0  # the missing voxel shows as the low end


def test_a_volume_of_nan_only_is_unreadable_not_black(tmp_path):
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 2), np.nan, dtype=np.float32), np.eye(4)), path)
    from mirl.errors import UnreadableImageError
    with pytest.raises(UnreadableImageError, match="empty.nii.gz: no finite pixel value"):
        read_nifti_slice(path, 0)


def float_mr_dicom(path: Path, pixels: np.ndarray) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
    ds.FloatPixelData = pixels.astype(np.float32).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_nan_in_a_float_mr_dicom_does_not_blank_it(tmp_path):
    pixels = np.random.default_rng(1).uniform(0, 900, (16, 16)).astype(np.float32)
    pixels[0, 0] = np.nan
    image = read_dicom_image(float_mr_dicom(tmp_path / "mr.dcm", pixels))
    assert image.std() > 20


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_grey_image_keeps_its_contrast(tmp_path, suffix):
    ramp = np.tile(np.linspace(1000, 40000, 64, dtype=np.uint16), (8, 1))  # a 16-bit X-ray export
    path = tmp_path / f"xray{suffix}"
    Image.fromarray(ramp).save(path)
    image = read_photo(path)
    assert image.shape == (8, 64, 3) and image.dtype == np.uint8
    assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255 and len(np.unique(image[0, :, 0])) > 50  # not 0/255
    assert image.flags.writeable  # no non-writable-array warning from torch.from_numpy


def test_an_image_id_beginning_with_a_space_survives_the_split_files(tmp_path, isic_root):
    from mirl.datasets import DATASETS, with_label_csv
    from mirl.splits import load_splits
    root = tmp_path / "photos"
    root.mkdir()
    photos = sorted(isic_root.rglob("*.jpg"))[:12]
    names = [f" {p.stem}" if i == 0 else p.stem for i, p in enumerate(photos)]
    for name, photo in zip(names, photos):
        shutil.copy(photo, root / f"{name}.jpg")
    rows = ["image,a,b"] + [f"{n},{i % 2},{1 - i % 2}" for i, n in enumerate(names)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    description = with_label_csv(DATASETS["isic"], tmp_path / "labels.csv", root, None)
    records = description.find_labelled(root)
    for _ in range(2):  # made, then read back
        splits = load_splits(description, records, tmp_path / "splits")
    assert names[0] in {i for ids in splits.values() for i in ids}


# ---------------------------------------------------------------- unreadable evaluation images

@pytest.mark.slow
def test_unreadable_validation_and_test_images_are_listed_and_counted(rsna_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(rsna_root, data)
    first = run_entry(capsys, "RSNA_MoCo", "MoCo_downstream.py", "--resnet", "--data-root", data, "--split-dir",
                      tmp_path / "splits", "--output-dir", tmp_path / "probe", *TINY, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    test_ids = (tmp_path / "splits" / "test.txt").read_text().split()
    (data / "stage_2_train" / f"{test_ids[0]}.dcm").write_bytes(b"not a DICOM")
    result = run_entry(capsys, "RSNA_MoCo", "MoCo_downstream.py", "--resnet", "--data-root", data, "--split-dir",
                       tmp_path / "splits", "--output-dir", tmp_path / "out", *TINY, "--epochs", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test"]["unreadable_images"] == 1 and metrics["val"]["unreadable_images"] == 0
    assert test_ids[0] in (tmp_path / "out" / "skipped.csv").read_text()


# ---------------------------------------------------------------- patients

def ct_header(path: Path, **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_series_groups_slices_when_patient_and_study_are_missing(tmp_path):
    series = generate_uid()
    a, b = (dicom_patient_group(ct_header(tmp_path / f"{n}.dcm", SeriesInstanceUID=series)) for n in "ab")
    c = dicom_patient_group(ct_header(tmp_path / "c.dcm", SeriesInstanceUID=generate_uid()))
    assert a == b != c
    assert dicom_patient_group(ct_header(tmp_path / "d.dcm", Modality="CT")) is None


def test_no_identifying_tag_reaches_a_warning(tmp_path, capfd):
    secret = "1.2.840.SECRET-STUDY"
    path = ct_header(tmp_path / "x.dcm", StudyInstanceUID=secret, PatientName="Doe^Jane")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        dicom_patient_group(path)
        pydicom.dcmread(path)
    out, err = capfd.readouterr()
    assert not any(secret in str(w.message) for w in caught)
    assert secret not in out + err and "Doe" not in out + err


# ---------------------------------------------------------------- nothing trained is lost

@pytest.mark.slow
def test_a_finished_model_is_not_retrained_when_its_states_were_deleted(finished, tmp_path, capsys):
    copy = copy_of(finished, tmp_path)
    shutil.rmtree(copy / "checkpoints")
    before = (copy / "checkpoint.pth").read_bytes()
    args = ["--data-root", tmp_path / "unused", "--output-dir", copy, *PRETRAIN]
    assert_one_line_error(run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", *args), "finished run", "checkpoint.pth")
    assert (copy / "checkpoint.pth").read_bytes() == before


@pytest.mark.slow
def test_resume_auto_continues_from_the_published_checkpoint(finished, rsna_root, tmp_path):
    copy = copy_of(finished, tmp_path)
    shutil.rmtree(copy / "checkpoints")
    result = pretrained(rsna_root, copy, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {copy / 'checkpoint.pth'}" in result.stderr


def test_a_downstream_result_is_not_overwritten(rsna_root, tmp_path, capsys):
    out = tmp_path / "down"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    for extra in ([], ["--resume", "auto"]):
        result = run_entry(capsys, "RSNA_MoCo", "MoCo_downstream.py", "--resnet", "--data-root", rsna_root,
                           "--output-dir", out, *TINY, *extra)
        assert_one_line_error(result, "finished run", "metrics.json")
    assert (out / "metrics.json").read_text() == "{}"


@pytest.mark.slow
@pytest.mark.parametrize("flag,value", [("--lr", "0.5"), ("--epochs", "3")])
def test_resuming_with_another_schedule_is_refused(finished, tmp_path, capsys, flag, value):
    copy = copy_of(finished, tmp_path)
    args = ["--data-root", tmp_path / "unused", "--output-dir", copy, *PRETRAIN, flag, value, "--resume", "auto"]
    assert_one_line_error(run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", *args), flag[2:])


@pytest.mark.slow
def test_a_damaged_newest_state_falls_back_to_the_older_one(finished, rsna_root, tmp_path):
    copy = copy_of(finished, tmp_path)
    newest = sorted((copy / "checkpoints").iterdir())[-1]
    older = newest.with_name("state-e0000-b000001.pth")
    shutil.copy(newest, older)  # an older intact state beside it
    newest.write_bytes(newest.read_bytes()[:1000])
    result = pretrained(rsna_root, copy, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"trying the older {older.name}" in result.stderr


def test_a_second_run_on_the_same_output_dir_stops_at_once(rsna_root, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # the first run, as another process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--output-dir", out,
                           *PRETRAIN)
    assert_one_line_error(result, "another run", str(out))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ---------------------------------------------------------------- full disks

def test_a_disk_without_room_for_the_states_is_refused_before_training(rsna_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10 ** 12, used=10 ** 12, free=10 ** 6))
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--split-dir",
                       tmp_path / "splits", "--output-dir", tmp_path / "out", *PRETRAIN)
    # after the progress bar of reading the patients (the state's size is known once the model is built)
    assert_error_line(result, "MiB free", "--keep")
    assert not list((tmp_path / "out").glob("checkpoint*"))


@pytest.mark.slow
def test_a_disk_filling_up_during_a_save_leaves_no_partial_file(rsna_root, tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save_until_full(payload, f, *args, **kwargs):
        real_save({"part": torch.zeros(1000)}, f)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save_until_full)
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--split-dir",
                       tmp_path / "splits", "--output-dir", tmp_path / "out", *PRETRAIN)
    assert_error_line(result, "No space left on device", "state-e")
    assert not list((tmp_path / "out").rglob("*.tmp"))


# ---------------------------------------------------------------- one line, not a traceback

@pytest.mark.parametrize("flag,value,words", [
    ("--batch-size", "1", ("--batch-size", "at least 2")),
    ("--seed", "-1", ("--seed",)),
    ("--image-size", "1", ("--image-size", "at least 32")),
    ("--lr", "inf", ("--lr", "finite")),
])
def test_impossible_numbers_are_one_line(rsna_root, tmp_path, capsys, flag, value, words):
    with pytest.raises(SystemExit) as stopped:
        run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--output-dir", tmp_path / "o",
                  *PRETRAIN, flag, value)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words)


def test_a_batch_larger_than_the_data_is_one_line(tmp_path, capsys):
    root = png_folder(tmp_path / "images", count=6)
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", root, "--split-dir",
                       tmp_path / "splits", "--output-dir", tmp_path / "out", *PRETRAIN, "--queue-size", "1")
    assert_one_line_error(result, "--batch-size 16", "6 pretraining images")


@pytest.mark.parametrize("change,words", [
    (lambda c: c.update(arch="resnet9000"), ("no known architecture", "resnet9000")),
    (lambda c: c.pop("arch"), ("no known architecture",)),
    (lambda c: c.update(encoder=[1, 2, 3]), ("not a mapping of names to tensors",)),
])
@pytest.mark.slow
def test_a_pretraining_checkpoint_with_a_bad_field_is_one_line(finished, rsna_root, tmp_path, capsys, change,
                                                               words):
    checkpoint = torch.load(finished / "checkpoint.pth", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "bad.pth")
    result = run_entry(capsys, "RSNA_MoCo", "MoCov2_downstream.py", "--pretrained", tmp_path / "bad.pth",
                       "--data-root", rsna_root, "--output-dir", tmp_path / "out", *TINY)
    assert_one_line_error(result, *words)


@pytest.mark.parametrize("change", [
    lambda c: c.update(arch=["resnet18"]),
    lambda c: c.update(encoder=[1, 2, 3]),
    lambda c: c["encoder"].update(extra=torch.zeros(1)),
])
@pytest.mark.slow
def test_embed_of_a_checkpoint_with_a_bad_field_is_one_line(finished, rsna_root, tmp_path, capsys, change):
    from mirl.embed import main as embed_main
    checkpoint = torch.load(finished / "checkpoint.pth", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "bad.pth")
    assert embed_main([str(tmp_path / "bad.pth"), "--data-root", str(rsna_root), "--split-dir", str(tmp_path / "s"),
                       "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "bad.pth" in lines[0]


@pytest.mark.parametrize("change", [
    lambda s: s["model"].update(extra=torch.zeros(1)),
    lambda s: s["model"].pop(next(iter(s["model"]))),
    lambda s: s.pop("optimizer"),
])
@pytest.mark.slow
def test_a_training_state_with_missing_or_extra_keys_is_one_line(finished, rsna_root, tmp_path, capsys, change):
    copy = copy_of(finished, tmp_path)
    newest = sorted((copy / "checkpoints").iterdir())[-1]
    state = torch.load(newest, weights_only=True)
    change(state)
    torch.save(state, newest)
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root,
                       "--split-dir", finished.parent / "splits", "--output-dir", copy, *PRETRAIN, "--resume",
                       str(newest))
    assert_one_line_error(result, newest.name, "not a complete training state")


@pytest.mark.parametrize("flag", ["--cache", "--split-dir"])
def test_a_cache_or_split_dir_that_cannot_be_written_is_one_line(rsna_root, tmp_path, capsys, flag):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = {"--cache": tmp_path / "s", "--split-dir": tmp_path / "s"}
    args[flag] = blocker / "inside"
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--output-dir",
                       tmp_path / "out", *PRETRAIN, *[str(a) for kv in args.items() for a in kv])
    assert_error_line(result, flag, "cannot be written")  # --cache: once the data is listed (a built cache may be
    # read-only)


@pytest.mark.parametrize("damage", [
    lambda folder: (folder / "images.npy").write_bytes((folder / "images.npy").read_bytes()[:5000]),
    lambda folder: (folder / "readable.npy").unlink(),
])
def test_a_damaged_cache_is_built_again(rsna_root, tmp_path, capsys, damage):
    from mirl.cache import main as cache_main
    args = ["rsna", "--data-root", str(rsna_root), "--cache", str(tmp_path / "cache"), "--image-size", "32",
            "--workers", "0"]
    assert cache_main(args) == 0
    damage(next((tmp_path / "cache").iterdir()))
    capsys.readouterr()
    assert cache_main(args) == 0
    err = capsys.readouterr().err
    assert "is damaged" in err and "building it again" in err


def test_a_cache_sees_a_file_rewritten_with_the_same_size_and_time(tmp_path, capsys):
    from mirl.cache import main as cache_main
    root = write_isic(tmp_path / "isic", patients=8, size=32, seed=2)
    args = ["isic", "--data-root", str(root), "--cache", str(tmp_path / "cache"), "--image-size", "32",
            "--workers", "0"]
    assert cache_main(args) == 0
    photo = sorted(root.rglob("*.jpg"))[0]
    stat = photo.stat()
    data = bytearray(photo.read_bytes())
    data[-10] ^= 0xFF
    photo.write_bytes(bytes(data))
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and modification time as before
    assert cache_main(args) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2  # a new cache, not the stale one



# ---------------------------------------------------------------- relaunching a run from its record

@pytest.mark.slow
def test_config_json_relaunches_the_same_run(rsna_root, tmp_path):
    """`--config OUTPUT/config.json` with a new output dir trains the same weights as the recorded run."""
    first = tmp_path / "first"
    result = run_script("RSNA_MoCo", "trainMoCoV2.py", "--data-root", rsna_root, "--split-dir", tmp_path / "splits",
                        "--output-dir", first, *PRETRAIN, "--deterministic", "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    again = run_script("RSNA_MoCo", "trainMoCoV2.py", "--config", first / "config.json", "--output-dir",
                       tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    recorded = json.loads((first / "config.json").read_text())["flags"]
    relaunched = json.loads((tmp_path / "again" / "config.json").read_text())["flags"]
    assert {k: v for k, v in relaunched.items() if k not in ("output_dir", "config")} == \
        {k: v for k, v in recorded.items() if k not in ("output_dir", "config")}
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True)["model"] for d in (first, tmp_path / "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_config_of_another_script_is_one_line(finished, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_entry(capsys, "RSNA_MoCo", "trainSimCLR.py", "--config", finished / "config.json")
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "written by rsna/trainMoCoV2.py" in lines[0] and "trainSimCLR.py" in lines[0]


@pytest.mark.slow
def test_a_run_assembled_in_a_notebook_keeps_its_config_and_records_what_it_settled(rsna_root, tmp_path):
    """Configs are built without any parser, are frozen, and the run records what it settled on its own
    (MoCo's queue size from the data, the learning rate, the checkpoint's architecture) in config.json, not in
    the caller's config."""
    import dataclasses

    from mirl.config import DownstreamConfig, PretrainConfig
    from mirl.datasets import RSNA
    from mirl.downstream import downstream
    from mirl.pretrain import pretrain
    shared = dict(data_root=rsna_root, split_dir=tmp_path / "splits", image_size=32, batch_size=16, workers=0,
                  device="cpu", arch="resnet18")
    config = PretrainConfig(method="mocov2", output_dir=tmp_path / "p", epochs=1, knn_images=0, **shared)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 2
    pretrain(RSNA, config)
    assert config.options == {} and config.lr is None
    recorded = json.loads((tmp_path / "p" / "config.json").read_text())
    assert recorded["queue_size"] > 0 and recorded["temperature"] == 0.2 and recorded["lr"] == 0.03 * 16 / 256
    assert recorded["flags"]["lr"] is None and "queue_size" not in recorded["flags"]
    probe = DownstreamConfig(method="mocov2", output_dir=tmp_path / "d", frozen=True, fraction=50, epochs=1,
                             pretrained=tmp_path / "p" / "checkpoint.pth", **{**shared, "arch": None})
    downstream(RSNA, probe)
    assert probe.arch is None and json.loads((tmp_path / "d" / "config.json").read_text())["arch"] == "resnet18"
