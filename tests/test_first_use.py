"""First use without surprises (issue 23): default folders that keep runs apart, intervals that stay in
their metric's range, a paired verdict, honest logs."""
import argparse

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mirl.cli import downstream_run_name
from mirl.datasets import ISIC, RSNA, with_label_csv
from mirl.metrics import paired_difference
from mirl.study import dataset_title, t_interval, verdict_lines


def flags(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"resnet": False, "frozen": False, "fraction": 10, "pretrained": None, **given})


def test_a_run_from_a_label_aware_checkpoint_never_shares_the_plain_runs_default_folder(tmp_path):
    plain = downstream_run_name("moco", flags())
    explicit = downstream_run_name("moco", flags(pretrained=tmp_path / "runs" / "moco" / "checkpoint.pth"))
    label_aware = downstream_run_name("moco", flags(pretrained=tmp_path / "runs" / "moco_super_10F" / "checkpoint.pth"))
    assert plain == explicit == "moco_finetune_10F"
    assert label_aware == "moco_super_10F_finetune_10F"
    assert downstream_run_name("moco", flags(frozen=True)) == "moco_frozen_10F"
    assert downstream_run_name("moco", flags(resnet=True)) == "resnet_10F"


def test_seed_intervals_stay_inside_the_metrics_range():
    values = np.array([0.2, 0.99])  # two seeds far apart: the raw t-interval is [-4.2, 5.4]
    low, high = t_interval(values, (0.0, 1.0))
    assert (low, high) == (0.0, 1.0)
    raw = t_interval(values)
    assert raw[0] < 0 and raw[1] > 1


def test_own_labels_are_titled_by_their_file(tmp_path):
    from PIL import Image
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "my_labels.csv").write_text("image,x,y\na,1,0\nb,0,1\nc,1,0\n")
    own = with_label_csv(ISIC, tmp_path / "my_labels.csv", tmp_path)
    assert dataset_title(own) == "my_labels.csv (your labels)" and dataset_title(RSNA) == "RSNA"


def test_the_paired_difference_is_the_difference_of_the_two_aucs_with_a_paired_interval():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 200).astype(float)[:, None]
    good = np.clip(truth * 0.6 + rng.random((200, 1)) * 0.5, 0, 1)
    poor = rng.random((200, 1))
    patients = [f"p{i // 2}" for i in range(200)]  # two images per patient

    def auc(y, p):
        return roc_auc_score(y[:, 0], p[:, 0])
    difference, (low, high) = paired_difference(truth, good, poor, patients, auc)
    assert difference == pytest.approx(roc_auc_score(truth[:, 0], good[:, 0]) - roc_auc_score(truth[:, 0], poor[:, 0]))
    assert 0 < low < difference < high
    same, interval = paired_difference(truth, good, good, patients, auc)
    assert same == 0 and interval == [0.0, 0.0]  # paired: the same model never differs from itself


def test_the_verdict_says_helped_worse_or_no_clear_difference():
    def comparison(fraction, difference, low, high):
        return {"fraction": fraction, "seed": 0, "column": "MoCo v2 finetune", "metric": "auc_macro",
                "pretrained": 0.5 + difference, "supervised": 0.5, "difference": difference, "ci_low": low,
                "ci_high": high, "test_patients": 30}
    few = {**comparison(5, 0.2, 0.1, 0.3), "test_patients": 3}
    lines = verdict_lines([comparison(100, 0.1, 0.02, 0.2), comparison(10, 0.01, -0.03, 0.05),
                           comparison(1, -0.1, -0.2, -0.04), few], [100, 10, 1, 5])
    assert lines[0].startswith("At 100 % of labels (seed 0): pretraining helped.")
    assert lines[1].startswith("At 10 % of labels (seed 0): no clear difference.")
    assert lines[2].startswith("At 1 % of labels (seed 0): pretraining did worse than supervised training.")
    assert "difference +0.100 [95 % paired bootstrap over 30 test patients: +0.020, +0.200]" in lines[0]
    assert lines[3].startswith("At 5 % of labels (seed 0): too few test patients (3) to tell.")


def test_the_bootstrap_interval_does_not_depend_on_what_the_patients_are_called():
    from mirl.metrics import bootstrap_interval
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 120).astype(float)
    probability = np.clip(truth * 0.3 + rng.random(120) * 0.7, 0, 1)
    names = [f"p{i // 3:02d}" for i in range(120)]
    salted = {name: f"{hash((name, 'salt')) & 0xffffffff:08x}" for name in set(names)}  # an RSNA patient hash

    def auc(y, p):
        return roc_auc_score(y, p)
    assert bootstrap_interval(truth, probability, names, auc) == \
        bootstrap_interval(truth, probability, [salted[n] for n in names], auc)


def test_a_busy_core_is_seen_and_said_in_one_line(capsys):
    import subprocess
    import sys
    import time

    from mirl.runtime import OtherProcessesLoad
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # the loop is running
        load = OtherProcessesLoad()
        time.sleep(1.0)
        assert load.cores() > 0.5
        load.warn_if_busy()
    finally:
        busy.kill()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: other processes kept")
