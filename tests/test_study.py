"""The label-efficiency study end to end, its resume, the kNN monitor and the t-SNE picture."""
import csv
import json

import numpy as np
import pytest
import torch

from mirl import demo, embed, study
from mirl.monitor import knn_scores

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts

SIZE = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--device", "cpu",
        "--epochs", "1", "--downstream-epochs", "1", "--queue-size", "16"]


def test_tiny_study_writes_tables_csv_and_plot_then_resumes(rsna_root, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["rsna", "--data-root", str(rsna_root), "--output-dir", str(out), "--fractions", "100", "50",
            "--methods", "mocov2", "supervised", "random", "--modes", "finetune", "--seeds", "0", *SIZE]
    assert study.main(argv) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["column"], r["fraction"]) for r in rows} == {
        ("MoCo v2 finetune", "100"), ("MoCo v2 finetune", "50"), ("Supervised", "100"), ("Supervised", "50"),
        ("Random encoder frozen", "100"), ("Random encoder frozen", "50")}
    # the control: a linear probe on a random encoder, which stays as it was built (checked by the run itself)
    control = json.loads((out / "runs" / "random_frozen_50F_seed0" / "config.json").read_text())
    assert control["mode"] == "random_frozen" and control["pretrained"] is None
    assert all(float(r["test_auc_macro_ci_low"]) <= float(r["test_auc_macro"]) <= float(r["test_auc_macro_ci_high"])
               for r in rows if r["test_auc_macro_ci_low"])
    table = (out / "results.md").read_text()
    assert "| 100 % |" in table and "| 50 % |" in table and "Supervised" in table
    assert "Cells: one seed [95 % patient-bootstrap interval" in table and "test weighted log loss" in table
    assert (out / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    # the verdict: each pretrained run against the supervised one of its fraction, paired on the same test images
    comparisons = list(csv.DictReader(open(out / "comparisons.csv")))
    assert {(c["column"], c["fraction"]) for c in comparisons} == {("MoCo v2 finetune", "100"),
                                                                   ("MoCo v2 finetune", "50")}
    for c in comparisons:
        assert abs(float(c["difference"]) - (float(c["pretrained"]) - float(c["supervised"]))) < 1e-9
        mine = {r["column"]: r for r in rows if r["fraction"] == c["fraction"]}
        assert float(c["pretrained"]) == pytest.approx(float(mine["MoCo v2 finetune"]["test_auc_macro"]))
        assert float(c["supervised"]) == pytest.approx(float(mine["Supervised"]["test_auc_macro"]))
    assert "### Did pretraining help?" in table and "At 50 % of labels (seed 0): " in table
    assert all(json.loads((out / "runs" / r / "metrics.json").read_text())["train_images"] > 0
               for r in ("supervised_50F_seed0", "mocov2_finetune_50F_seed0"))
    checkpoint = torch.load(out / "pretrain" / "mocov2" / "checkpoint.pth", weights_only=True)
    assert "knn_auc_macro" in checkpoint["monitor"]  # the online monitor ran during pretraining

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pth")}
    capsys.readouterr()
    assert study.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("done before, skipped") == 6
    assert "reusing" not in second  # every run is done: no pretraining is even looked at
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.pth")}  # nothing retrained

    # the same folder with other settings: refused in one line before any training, nothing mixed or changed
    other = [{"32": "48", "resnet18": "resnet50"}.get(a, a) for a in argv]
    assert study.main(other) == 2
    refusal = capsys.readouterr().err.strip().splitlines()
    assert len(refusal) == 1 and "other settings" in refusal[0] and "image_size 32 -> 48" in refusal[0]
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.pth")}
    # finished runs keep no training states; a damaged one (a copy cut short) is passed over for the intact
    # published checkpoint
    states = out / "pretrain" / "mocov2" / "checkpoints"
    assert not states.exists() and not (out / "runs" / "supervised_50F_seed0" / "checkpoints").exists()
    states.mkdir()
    published = out / "pretrain" / "mocov2" / "checkpoint.pth"
    (states / "state-e0009-b000000.pth").write_bytes(published.read_bytes()[:1000])
    assert study.main([*argv, "--fractions", "20", "--methods", "mocov2"]) == 0  # a new fraction needs the pretraining
    assert "trying the older" in capsys.readouterr().err

    picture = tmp_path / "tsne.png"
    assert embed.main([str(out / "pretrain" / "mocov2" / "checkpoint.pth"), "--data-root", str(rsna_root),
                       "--split-dir", str(out / "splits"), "--out", str(picture),  # at the checkpoint's 32 px
                       "--workers", "0", "--device", "cpu"]) == 0
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_pretrain_seeds_give_each_seed_its_own_pretraining(rsna_root, tmp_path):
    out = tmp_path / "study"
    assert study.main(["rsna", "--data-root", str(rsna_root), "--output-dir", str(out), "--fractions", "100",
                       "--methods", "mocov2", "--modes", "frozen", "--seeds", "3", "4", "--pretrain-seeds", *SIZE]) == 0
    seeds = {seed: json.loads((out / "pretrain" / f"mocov2_seed{seed}" / "config.json").read_text())["seed"]
             for seed in (3, 4)}
    assert seeds == {3: 3, 4: 4} and not (out / "pretrain" / "mocov2").exists()
    for seed in (3, 4):
        used = json.loads((out / "runs" / f"mocov2_frozen_100F_seed{seed}" / "config.json").read_text())["pretrained"]
        assert used == str(out / "pretrain" / f"mocov2_seed{seed}" / "checkpoint.pth")
    assert "each seed its own pretraining and downstream run" in (out / "results.md").read_text()


def test_knn_scores_by_hand():
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    query = np.array([[1.0, 0.0]])
    scores = knn_scores(bank, labels, query, k=2, temperature=1.0)
    # nearest two: bank 0 (cosine 1.0) and bank 2 (cosine 0.6)
    w0, w2 = np.exp(1.0), np.exp(0.6)
    np.testing.assert_allclose(scores, [[w0 / (w0 + w2), w2 / (w0 + w2)]])


def test_the_demo_says_in_one_line_whether_pretraining_helped(tmp_path):
    rng = np.random.default_rng(0)
    truth = (rng.random((60, 6)) < 0.4).astype(np.float32)
    ids = np.array([f"image{i}" for i in range(60)])

    def write(name: str, probability: np.ndarray) -> None:
        folder = tmp_path / "runs" / f"{name}_10F"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "test_predictions.npz", image_ids=ids, truth=truth, probability=probability)

    good, poor = np.clip(truth * 0.7 + rng.random((60, 6)) * 0.4, 0, 1), rng.random((60, 6))
    write("mocov2_frozen", poor)
    write("mocov2_finetune", good)
    write("resnet", poor)
    patient = {image_id: f"p{i // 3}" for i, image_id in enumerate(ids)}  # three images per patient
    line = demo.verdict(tmp_path, 10, patient.get)
    assert line.startswith("At 10 % of labels (seed 0): pretraining helped. Best pretrained, MoCo v2, fine-tuned:")
    assert "paired bootstrap over 20 test patients" in line and "\n" not in line
    write("resnet", good)
    line = demo.verdict(tmp_path, 10, patient.get)
    assert "no clear difference" in line and "difference +0.000" in line
