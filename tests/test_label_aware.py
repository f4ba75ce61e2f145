"""Issue 7: label-aware MoCo (supervised contrastive loss over the momentum queue) and EfficientNet
encoders, checked against direct formulas and end to end from every dataset folder."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import run_in_process

from mirl import study
from mirl.config import PretrainConfig
from mirl.datasets import DATASETS, ImageRecord
from mirl.models import MoCo, jaccard_overlap, label_aware_infonce
from mirl.pretrain import label_aware_records, pretraining_records, usable_labels

T = 0.2


def direct_loss(q, batch_keys, queue_keys, labels, batch_labels, queue_labels, own, temperature):
    """Khosla et al.'s L_out written out per query with python sets: positives weighted by Jaccard,
    the own key weight 1, an unlabelled query sees only its own key and the queue."""
    candidates = [(k, set(np.flatnonzero(l)), True, j) for j, (k, l) in enumerate(zip(batch_keys, batch_labels))]
    candidates += [(k, set(np.flatnonzero(l)), False, j) for j, (k, l) in enumerate(zip(queue_keys, queue_labels))]
    losses = []
    for i in range(len(q)):
        mine = set(np.flatnonzero(labels[i]))
        allowed = [c for c in candidates if mine or not c[2] or c[3] == own[i]]
        denominator = sum(math.exp(float(q[i] @ k) / temperature) for k, _, _, _ in allowed)
        weighted, total = 0.0, 0.0
        for key, theirs, in_batch, j in allowed:
            if in_batch and j == own[i]:
                weight = 1.0
            else:
                weight = len(mine & theirs) / len(mine | theirs) if mine | theirs else 0.0
            if weight:
                weighted += weight * math.log(math.exp(float(q[i] @ key) / temperature) / denominator)
                total += weight
        losses.append(-weighted / total)
    return sum(losses) / len(losses)


def unit(n: int, seed: int, dim: int = 8) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def test_jaccard_overlap_by_hand():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    b = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    expected = torch.tensor([[1 / 3, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(jaccard_overlap(a, b), expected)


@pytest.mark.parametrize("queue_size", [0, 5])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_label_aware_loss_matches_the_direct_formula(kind, queue_size):
    n = 6
    if kind == "single":  # one-hot over 3 classes + "no finding"; rows 4 and 5 unlabelled
        labels = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
        queue_labels = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    else:  # RSNA-like: 'any' plus subtypes, the last column "no finding"
        labels = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
        queue_labels = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]])
    queue_labels = queue_labels[:queue_size].double()
    q, keys, queue = unit(n, 0), unit(n, 1), unit(queue_size, 2)
    own = torch.arange(n)
    got, _ = label_aware_infonce(q, keys, queue, labels.double(), labels.double(), queue_labels, own, T)
    want = direct_loss(q, keys, queue, labels.numpy(), labels.numpy(), queue_labels.numpy(), own.numpy(), T)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_without_shared_labels_it_is_plain_infonce():
    q, keys, queue = unit(4, 3), unit(4, 4), unit(6, 5)
    labels = torch.eye(4, 5, dtype=torch.float64)  # every image its own class
    queue_labels = torch.zeros(6, 5, dtype=torch.float64)
    got, _ = label_aware_infonce(q, keys, queue, labels, labels, queue_labels, torch.arange(4), T)
    logits = q @ torch.cat([keys, queue]).t() / T
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(4)).item(), rel=1e-9)
    # unlabelled queries: exactly MoCo's loss, their own key against the queue
    nobody = torch.zeros(4, 5, dtype=torch.float64)
    got, _ = label_aware_infonce(q, keys, queue, nobody, nobody, queue_labels, torch.arange(4), T)
    moco = torch.cat([(q * keys).sum(1, keepdim=True), q @ queue.t()], dim=1) / T
    assert got.item() == pytest.approx(F.cross_entropy(moco, torch.zeros(4, dtype=torch.long)).item(), rel=1e-9)


def test_the_queue_keeps_each_keys_labels():
    torch.manual_seed(0)
    model = MoCo("resnet18", head="mlp", queue_size=6, label_dim=3, bn_splits=2)
    images = torch.rand(4, 3, 32, 32)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]])
    model(images, images, labels)
    model(images, images, labels.flip(0))
    assert torch.equal(model.queue.negative_labels(), torch.cat([labels, labels.flip(0)])[-6:].roll(2, 0))
    loss, _ = model(images, images, labels)
    assert torch.isfinite(loss)


def test_only_the_fraction_split_is_labelled_and_no_finding_is_a_class():
    labelled = [ImageRecord(name, Path(f"{name}.dcm"), np.array(labels, dtype=np.float32), group)
                for name, labels, group in (("a", [1, 1, 0], "p1"), ("b", [0, 0, 0], "p2"), ("c", [1, 0, 1], "p3"),
                                            ("val", [1, 1, 1], "p4"), ("test", [0, 1, 1], "p5"))]
    # images in no split (like ACDC's cine frames) take their patient's label when the patient is labelled
    cine = [ImageRecord("p1_cine", Path("p1.nii.gz"), None, "p1"), ImageRecord("p4_cine", Path("p4.nii.gz"), None, "p4")]
    splits = {"train50F": ["a", "b", "c"], "train100F": ["a", "b", "c"], "val": ["val"], "test": ["test"]}
    records = labelled[:4] + cine
    usable = usable_labels(labelled, records, splits, 50)
    got = {r.image_id: r.labels.tolist() for r in label_aware_records(records, usable, 3)}
    assert got == {"a": [1, 1, 0, 0], "b": [0, 0, 0, 1], "c": [1, 0, 1, 0], "val": [0, 0, 0, 0],
                   "p1_cine": [1, 1, 0, 0], "p4_cine": [0, 0, 0, 0]}


def test_efficientnet_encoder_loads_into_plain_torchvision(tmp_path):
    model = MoCo("efficientnet_b0", head="mlp", queue_size=8)
    assert model.head_q[0].in_features == 1280  # the head is sized from the encoder's feature width
    missing, unexpected = torchvision.models.efficientnet_b0().load_state_dict(
        model.feature_encoder().state_dict(), strict=False)
    assert sorted(missing) == ["classifier.1.bias", "classifier.1.weight"] and not unexpected


TINY = ["--image-size", "32", "--batch-size", "32", "--workers", "0", "--epochs", "1", "--device", "cpu"]


@pytest.mark.slow
def test_label_aware_and_efficientnet_pretraining_then_fine_tuning(rsna_root, tmp_path):
    """Both of issue 7's pretrainings end to end on multi-label RSNA, and their checkpoints fine-tune."""
    common = ["--data-root", rsna_root, "--split-dir", tmp_path / "splits", *TINY]
    runs = [("trainMoCoV2.py", ["--supervised", "--fraction", "10", "--arch", "resnet18", "--queue-size", "16",
                                "--knn-images", "0"], "super"),
            ("MoCov2_downstream.py", ["--fraction", "10", "--pretrained", tmp_path / "super" / "checkpoint.pth"],
             "super_finetune"),
            ("trainMoCo.py", ["--arch", "efficientnet_b0", "--queue-size", "16", "--knn-images", "0"], "efficient"),
            ("MoCo_downstream.py", ["--frozen", "--pretrained", tmp_path / "efficient" / "checkpoint.pth"],
             "efficient_frozen")]
    for script, flags, name in runs:
        result = run_in_process("RSNA_MoCo", script, *common, *flags, "--output-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
    split = len((tmp_path / "splits" / "train10F.txt").read_text().split())
    assert json.loads((tmp_path / "super" / "config.json").read_text())["labelled_images"] == split
    for name in ("super_finetune", "efficient_frozen"):
        assert (tmp_path / name / "metrics.json").is_file()


@pytest.mark.parametrize("dataset,root", [("isic", "isic_root"), ("acdc", "acdc_root")])
def test_label_aware_pretraining_sees_only_the_fractions_labels(dataset, root, request, tmp_path):
    """ISIC: the split's images keep their one-hot class. ACDC pretrains on the cine, which is in no
    split: its frames take the diagnosis of the fraction's patients, and no other patient's."""
    data = request.getfixturevalue(root)
    description = DATASETS[dataset]
    config = PretrainConfig(method="moco", data_root=data, split_dir=tmp_path / "splits", output_dir=tmp_path,
                            batch_size=16, supervised=True, fraction=10)
    records, _, _ = pretraining_records(description, config)
    labelled = description.find_labelled(data)
    train = set((tmp_path / "splits" / "train10F.txt").read_text().split())
    by_patient = {r.group: r.labels for r in labelled if r.image_id in train}
    with_labels = [r for r in records if r.labels.any()]
    assert with_labels and {r.group for r in with_labels} == set(by_patient)
    assert all(np.array_equal(r.labels, np.append(by_patient[r.group], 0)) for r in with_labels)
    if dataset == "isic":
        assert {r.image_id for r in with_labels} == train


@pytest.mark.slow
def test_study_runs_the_published_tables_extra_columns(rsna_root, tmp_path):
    out = tmp_path / "study"
    assert study.main(["rsna", "--data-root", str(rsna_root), "--output-dir", str(out), "--fractions", "50",
                       "--methods", "moco_efficient", "mocov2_super", "--modes", "finetune", "--arch", "resnet18",
                       "--epochs", "1", "--downstream-epochs", "1", "--queue-size", "16", *TINY[:6], "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["column"] for r in rows} == {"MoCo EfficientNet-B0 finetune", "MoCo v2 super finetune"}
    assert torch.load(out / "pretrain" / "moco_efficient" / "checkpoint.pth", weights_only=True)["arch"] == \
        "efficientnet_b0"
    assert torch.load(out / "pretrain" / "mocov2_super_50F" / "checkpoint.pth",
                      weights_only=True)["supervised_fraction"] == 50
