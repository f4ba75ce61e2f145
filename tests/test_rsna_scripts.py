"""Every RSNA_MoCo script end to end on sample data at tiny size, run the way a user runs them."""
import csv
import json
import shutil
from functools import partial

import pytest
import torch
import torchvision
from conftest import TINY, assert_one_line_error, run_entry, run_in_process
from conftest import run_script as run_in_folder

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts

run_script = partial(run_in_folder, "RSNA_MoCo")  # a subprocess, as a user runs it: the pretraining fixture
run_here = partial(run_in_process, "RSNA_MoCo")  # the other runs, without a torch start-up each


@pytest.fixture(scope="module")
def pretrained(rsna_root, tmp_path_factory):
    """One tiny pretraining run of each method, sharing the split files."""
    out = tmp_path_factory.mktemp("pretrain")
    splits = out / "splits"
    runs = {}
    for method, script, extra in (("moco", "trainMoCo.py", ["--queue-size", "16"]),
                                  ("mocov2", "trainMoCoV2.py", ["--queue-size", "16"]),
                                  ("simclr", "trainSimCLR.py", [])):
        result = run_script(script, "--data-root", rsna_root, "--output-dir", out / method, "--split-dir", splits,
                            *TINY, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[method] = out / method
    return runs, splits


@pytest.mark.parametrize("method", ["moco", "mocov2", "simclr"])
def test_pretraining_writes_a_torchvision_loadable_encoder_and_logs(pretrained, method):
    run = pretrained[0][method]
    checkpoint = torch.load(run / "checkpoint.pth", weights_only=True)
    assert checkpoint["method"] == method and checkpoint["epoch"] == 1
    missing, unexpected = torchvision.models.resnet18().load_state_dict(checkpoint["encoder"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert json.loads((run / "config.json").read_text())["method"] == method
    assert list(run.glob("events.out.tfevents.*"))


def test_pretraining_never_sees_the_test_split(pretrained):
    config = json.loads((pretrained[0]["moco"] / "config.json").read_text())
    splits = pretrained[1]
    n_test = len((splits / "test.txt").read_text().split())
    n_all = sum(len((splits / f).read_text().split()) for f in ("test.txt", "val.txt", "train100F.txt"))
    assert config["images"] == n_all - n_test


@pytest.mark.parametrize("script,method,mode", [
    ("MoCo_downstream.py", "moco", "--frozen"),
    ("MoCo_downstream.py", "moco", None),
    ("MoCov2_downstream.py", "mocov2", "--frozen"),
    ("MoCov2_downstream.py", "mocov2", None),
    ("MoCov2_downstream.py", "mocov2", "--resnet"),
    ("SimCLR_downstream.py", "simclr", None),
])
def test_downstream_writes_metrics(pretrained, rsna_root, tmp_path, script, method, mode):
    runs, splits = pretrained
    args = ["--data-root", rsna_root, "--output-dir", tmp_path, "--split-dir", splits, "--fraction", "50",
            "--pretrained", runs[method] / "checkpoint.pth", *TINY, "--epochs", "2"]
    result = run_here(script, *args, *([mode] if mode else []))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for split in ("test", "val"):
        assert set(metrics[split]["auc"]) == {"epidural", "intraparenchymal", "intraventricular", "subarachnoid",
                                              "subdural", "any"}
        assert metrics[split]["weighted_log_loss"] > 0
        assert metrics[split]["auc_macro"] is None or 0 <= metrics[split]["auc_macro"] <= 1
    assert list(tmp_path.glob("events.out.tfevents.*")) and (tmp_path / "config.json").is_file()
    classifier = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    if mode == "--frozen":  # no encoder weight, BN statistic included, may change in the linear protocol
        encoder = torch.load(runs[method] / "checkpoint.pth", weights_only=True)["encoder"]
        for name, value in encoder.items():
            assert torch.equal(classifier[name], value), name


def test_supervised_baseline_starts_from_local_torchvision_weights(rsna_root, pretrained, tmp_path):
    weights = tmp_path / "resnet18_imagenet_like.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    result = run_here("MoCo_downstream.py", "--resnet", "--init-weights", weights, "--data-root", rsna_root,
                        "--output-dir", tmp_path / "run", "--split-dir", pretrained[1], *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mode"] == "resnet"


def test_missing_data_root_is_one_line(tmp_path):
    result = run_here("trainMoCo.py", "--data-root", tmp_path / "nowhere", "--output-dir", tmp_path, *TINY)
    assert_one_line_error(result, "nowhere", "sample_data")
    assert not (tmp_path / "checkpoint.pth").exists()


def test_empty_label_csv_is_one_line(tmp_path, pretrained):
    (tmp_path / "stage_2_train.csv").write_text("")
    result = run_here("MoCo_downstream.py", "--data-root", tmp_path, "--output-dir", tmp_path / "out",
                        "--pretrained", pretrained[0]["moco"] / "checkpoint.pth", *TINY)
    assert_one_line_error(result, "stage_2_train.csv", "empty")


def test_checkpoint_of_the_wrong_method_is_one_line(rsna_root, pretrained, tmp_path):
    result = run_here("MoCo_downstream.py", "--data-root", rsna_root, "--output-dir", tmp_path,
                        "--pretrained", pretrained[0]["simclr"] / "checkpoint.pth", *TINY)
    assert_one_line_error(result, "SimCLR", "trainMoCo.py")
    assert not (tmp_path / "metrics.json").exists()


def test_bad_flag_is_one_line(tmp_path):
    result = run_here("MoCo_downstream.py", "--fraction", "3")
    assert_one_line_error(result, "--fraction")


def test_a_file_that_is_not_dicom_is_skipped_listed_and_the_run_goes_on(rsna_root, tmp_path, capsys):
    root = tmp_path / "rsna"
    shutil.copytree(rsna_root, root)
    slices = sorted((root / "stage_2_train").glob("*.dcm"))
    slices[0].write_bytes(b"not a DICOM file")  # neither its patient nor its pixels can be read
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", root, "--output-dir", tmp_path / "run",
                       "--split-dir", tmp_path / "splits", "--queue-size", "16", "--knn-images", "0", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "run" / "skipped.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image_id"], "not a readable DICOM file" in r["reason"]) for r in rows] == [(slices[0].stem, True)]


def test_a_dataset_of_only_bad_files_stops_with_one_line(rsna_root, tmp_path, capsys):
    root = tmp_path / "rsna"
    shutil.copytree(rsna_root, root)
    for path in (root / "stage_2_train").glob("*.dcm"):
        path.write_bytes(b"garbage")
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCoV2.py", "--data-root", root, "--output-dir", tmp_path / "run",
                       "--split-dir", tmp_path / "splits", "--queue-size", "16", "--knn-images", "0", *TINY)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "could be read" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pth").exists()
