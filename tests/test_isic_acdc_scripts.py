"""The ISIC and ACDC folders' scripts end to end on their sample data, the user's own labelled CSV
through the ISIC scripts, and pretraining on a plain folder of mixed image formats."""
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torchvision
from conftest import DATASET_OF_FOLDER, TINY, assert_one_line_error, run_in_process, script_folder
from PIL import Image
from pydicom.data import get_testdata_file

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts

PRETRAIN = {"moco": ("trainMoCo.py", ["--queue-size", "16"]), "mocov2": ("trainMoCoV2.py", ["--queue-size", "16"]),
            "simclr": ("trainSimCLR.py", [])}
DOWNSTREAM = {"moco": "MoCo_downstream.py", "mocov2": "MoCov2_downstream.py", "simclr": "SimCLR_downstream.py"}


@pytest.fixture(scope="module")
def pretrained(isic_root, acdc_root, tmp_path_factory):
    """Every pretraining script of both folders, once, at tiny size."""
    from mirl.cli import pretrain_script
    roots = {"ISIC": isic_root, "ACDC": acdc_root}
    runs = {}
    for folder, root in roots.items():
        out = tmp_path_factory.mktemp(folder)
        for method, (script, extra) in PRETRAIN.items():
            # the scripts' entry point in this process: six runs would otherwise each pay a torch start-up
            argv = [str(a) for a in ("--data-root", root, "--output-dir", out / method, "--split-dir", out / "splits",
                                     *TINY, *extra)]
            assert pretrain_script(DATASET_OF_FOLDER[folder], method, str(script_folder(folder) / script), argv) == 0
            runs[folder, method] = out / method
        runs[folder, "splits"] = out / "splits"
    return roots, runs


@pytest.mark.parametrize("folder", ["ISIC", "ACDC"])
@pytest.mark.parametrize("method", ["moco", "mocov2", "simclr"])
def test_pretraining_checkpoints_load_into_torchvision(pretrained, folder, method):
    checkpoint = torch.load(pretrained[1][folder, method] / "checkpoint.pth", weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(checkpoint["encoder"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert list(pretrained[1][folder, method].glob("events.out.tfevents.*"))


def test_acdc_pretraining_uses_the_cine_but_no_test_patient(pretrained):
    roots, runs = pretrained
    config = json.loads((runs["ACDC", "moco"] / "config.json").read_text())
    test_patients = {i.split("_")[0] for i in (runs["ACDC", "splits"] / "test.txt").read_text().split()}
    cine_slices = {p: np.prod(nib.load(str(roots["ACDC"] / "training" / p / f"{p}_4d.nii.gz")).shape[2:])
                   for p in (f"patient{n:03d}" for n in range(1, 11))}
    assert config["images"] == sum(v for p, v in cine_slices.items() if p not in test_patients)


@pytest.mark.parametrize("folder,method,mode", [
    ("ISIC", "moco", "--frozen"), ("ISIC", "mocov2", None), ("ISIC", "simclr", "--resnet"),
    ("ACDC", "moco", None), ("ACDC", "mocov2", "--frozen"), ("ACDC", "simclr", None),
])
def test_downstream_metrics(pretrained, tmp_path, folder, method, mode):
    roots, runs = pretrained
    result = run_in_process(folder, DOWNSTREAM[method], "--data-root", roots[folder], "--output-dir", tmp_path,
                        "--split-dir", runs[folder, "splits"], "--pretrained", runs[folder, method] / "checkpoint.pth",
                        *TINY, *([mode] if mode else []))
    assert result.returncode == 0, result.stderr[-2000:]
    test = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert 0 <= test["accuracy"] <= 1 and 0 <= test["balanced_accuracy"] <= 1
    if folder == "ISIC":
        assert test["recall"]["UNK"] is None and test["auc"]["UNK"] is None  # absent, not zero
    else:
        assert 0 <= test["patient_accuracy"] <= 1 and test["n_patients"] >= 1


def test_isic_scripts_train_on_a_users_csv_with_other_classes(isic_root, tmp_path):
    """A multi-label CSV with the user's own classes, over a mixed folder of PNG and DICOM."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,opacity,effusion,device"]
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(24):
        labels = rng.integers(0, 2, 3)
        if i % 4 == 0:
            ct.save_as(images / f"scan{i}.dcm")
        else:
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            pixels[:20] = 255 * labels[0]
            Image.fromarray(pixels).save(images / f"scan{i}.png")
        rows.append(f"scan{i},{labels[0]},{labels[1]},{labels[2]}")
    csv = tmp_path / "my_labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    common = ["--data-root", images, "--labels", csv, "--split-dir", tmp_path / "splits", *TINY]
    result = run_in_process("ISIC", "trainMoCoV2.py", *common, "--output-dir", tmp_path / "pre", "--queue-size", "8",
                        "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_in_process("ISIC", "MoCov2_downstream.py", *common, "--output-dir", tmp_path / "down",
                        "--pretrained", tmp_path / "pre" / "checkpoint.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    test = json.loads((tmp_path / "down" / "metrics.json").read_text())["test"]
    assert set(test["auc"]) == {"opacity", "effusion", "device"} and "weighted_log_loss" in test


def test_pretraining_on_a_plain_folder_of_mixed_formats(tmp_path):
    folder = tmp_path / "unlabelled"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(folder / f"photo{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(folder / "nested" / f"grey{i}.png")
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(folder / "ct.dcm")
    nib.save(nib.Nifti1Image(rng.random((20, 20, 4)).astype(np.float32), np.eye(4)), folder / "mr.nii.gz")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_in_process("ACDC", "trainMoCo.py", "--data-root", folder, "--output-dir", tmp_path / "out", *TINY,
                        "--batch-size", "4", "--queue-size", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["images"] == 3 + 3 + 1 + 4 + 1  # the broken file is listed, then skipped and counted
    assert "skipped 1 " in result.stdout  # the plain epoch line of a run whose output is not a terminal


def test_isic_csv_with_a_bad_value_is_one_line(tmp_path, isic_root):
    csv = tmp_path / "bad.csv"
    csv.write_text("image,MEL,NV\nISIC_0000001,1,yes\n")
    result = run_in_process("ISIC", "MoCo_downstream.py", "--data-root", isic_root, "--labels", csv, "--resnet", *TINY)
    assert_one_line_error(result, "bad.csv row 2", "NV")


def test_acdc_missing_root_is_one_line(tmp_path):
    result = run_in_process("ACDC", "trainSimCLR.py", "--data-root", tmp_path / "absent", *TINY)
    assert_one_line_error(result, "absent", "mirl.sample_data acdc")
