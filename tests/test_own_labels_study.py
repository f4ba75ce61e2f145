"""The label-efficiency study on a user's own labels: `--labels CSV --group-column NAME` gives
patient-grouped splits through the one-command study; a bad CSV stops it with one line."""
import csv
import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import assert_one_line_error

from mirl import study
from mirl.datasets import read_label_csv
from mirl.errors import DataError
from mirl.splits import read_split

SIZE = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--epochs", "1", "--downstream-epochs", "1"]


def own_labels(isic_root: Path, path: Path) -> Path:
    """The ISIC sample's images with a user's CSV: three of its classes, and the lesion as `patient` column."""
    truth = pd.read_csv(isic_root / "ISIC_2019_Training_GroundTruth.csv")
    lesions = pd.read_csv(isic_root / "ISIC_2019_Training_Metadata.csv").set_index("image")["lesion_id"]
    keep = truth[truth[["MEL", "NV", "BCC"]].sum(axis=1) == 1]
    table = pd.DataFrame({"image": keep["image"], "melanoma": keep["MEL"].astype(int), "naevus": keep["NV"].astype(int),
                          "patient": keep["image"].map(lesions), "carcinoma": keep["BCC"].astype(int)})
    table.to_csv(path, index=False)
    return path


def test_a_group_column_names_patients_and_is_not_a_class(isic_root, tmp_path):
    path = own_labels(isic_root, tmp_path / "labels.csv")
    records, classes, multilabel = read_label_csv(path, isic_root, group_column="patient")
    assert classes == ("melanoma", "naevus", "carcinoma") and not multilabel
    table = pd.read_csv(path).set_index("image")
    assert all(r.group == table.loc[r.image_id, "patient"] for r in records)


def test_a_missing_group_column_or_an_empty_patient_is_one_line(isic_root, tmp_path):
    path = own_labels(isic_root, tmp_path / "labels.csv")
    with pytest.raises(DataError, match=r"labels.csv row 1: no column subject \(--group-column\)"):
        read_label_csv(path, isic_root, group_column="subject")
    lines = path.read_text().splitlines()
    lines[3] = ",".join(value if column != 3 else "" for column, value in enumerate(lines[3].split(",")))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"labels.csv row 4: column patient is empty"):
        read_label_csv(path, isic_root, group_column="patient")


@pytest.mark.parametrize("problem", ["column", "image"])
def test_the_study_stops_on_a_bad_csv_before_training(isic_root, tmp_path, capsys, problem):
    path = own_labels(isic_root, tmp_path / "labels.csv")
    group = "patient"
    if problem == "column":
        group = "subject"
    else:
        path.write_text(path.read_text() + "ISIC_9999999,1,0,p1,0\n")
    capsys.readouterr()
    code = study.main(["isic", "--data-root", str(isic_root), "--output-dir", str(tmp_path / "out"),
                       "--labels", str(path), "--group-column", group, *SIZE])
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess("study", code, captured.out, captured.err),
                          "subject" if problem == "column" else "ISIC_9999999")
    assert not (tmp_path / "out" / "pretrain").exists()


@pytest.mark.slow
def test_the_study_runs_on_own_labels_with_patients_kept_together(isic_root, tmp_path):
    path = own_labels(isic_root, tmp_path / "labels.csv")
    out = tmp_path / "out"
    assert study.main(["isic", "--data-root", str(isic_root), "--output-dir", str(out), "--labels", str(path),
                       "--group-column", "patient", "--fractions", "100", "--methods", "mocov2", "supervised",
                       "--modes", "finetune", "--queue-size", "8", *SIZE]) == 0
    patient = pd.read_csv(path).set_index("image")["patient"]
    sides = {name: {patient[i] for i in read_split(out / "splits" / f"{name}.txt")} for name in ("test", "val",
                                                                                                  "train100F")}
    assert not (sides["test"] & sides["train100F"]) and not (sides["val"] & sides["train100F"])
    assert not (sides["test"] & sides["val"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["column"] for r in rows} == {"MoCo v2 finetune", "Supervised"}
    metrics = json.loads((out / "runs" / "supervised_100F_seed0" / "metrics.json").read_text())
    assert set(metrics["test"]["recall"]) == {"melanoma", "naevus", "carcinoma"}
