"""Each metric against scikit-learn or the competition's formula written out by hand."""
import numpy as np
from sklearn.metrics import balanced_accuracy_score, log_loss, roc_auc_score

from mirl.metrics import bootstrap_interval, multilabel_metrics, roc_auc, singlelabel_metrics, weighted_log_loss

RSNA = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    assert abs(roc_auc(y, score) - roc_auc_score(y, score)) < 1e-12


def test_auc_of_a_class_without_positives_is_absent():
    assert roc_auc(np.zeros(5), np.arange(5.0)) is None


def test_weighted_log_loss_is_the_kaggle_metric():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (50, 6)).astype(float)
    p = rng.random((50, 6))
    weights = np.array([1, 1, 1, 1, 1, 2.0])
    by_hand = sum(w * log_loss(y[:, c], p[:, c], labels=[0, 1]) for c, w in enumerate(weights)) / 7
    assert abs(weighted_log_loss(y, p, weights) - by_hand) < 1e-9
    assert abs(multilabel_metrics(y, p, RSNA)["weighted_log_loss"] - by_hand) < 1e-9


def test_macro_auc_averages_present_classes():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (80, 6)).astype(float)
    y[:, 0] = 0  # epidural absent from this split
    p = rng.random((80, 6))
    metrics = multilabel_metrics(y, p, RSNA)
    assert metrics["auc"]["epidural"] is None
    expected = np.mean([roc_auc_score(y[:, c], p[:, c]) for c in range(1, 6)])
    assert abs(metrics["auc_macro"] - expected) < 1e-12


def test_balanced_accuracy_matches_sklearn_and_skips_absent_classes():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, 120)  # class 4 of 5 never occurs, like ISIC's UNK
    p = rng.random((120, 5))
    metrics = singlelabel_metrics(np.eye(5)[truth], p, ("a", "b", "c", "d", "unk"))
    predicted = p.argmax(1)
    assert metrics["recall"]["unk"] is None
    # sklearn averages recall over the classes present in y_true, as MIRL does
    assert abs(metrics["balanced_accuracy"] - balanced_accuracy_score(truth, predicted)) < 1e-12
    assert abs(metrics["accuracy"] - (predicted == truth).mean()) < 1e-12


def _cohort(patients: int, seed: int):
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(patients), 4)  # four slices per patient
    y = np.repeat(rng.integers(0, 2, patients), 4)
    score = y * 0.6 + rng.random(len(y))
    return y, score, [f"p{i}" for i in owner]


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_patients():
    def auc(y, p):
        return roc_auc(y, p)

    widths = []
    for patients in (20, 320):
        y, score, owners = _cohort(patients, seed=patients)
        low, high = bootstrap_interval(y, score, owners, auc, resamples=400)
        assert low <= roc_auc(y, score) <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(16) as wide with 16 times the patients


def test_bootstrap_resamples_whole_patients():
    seen = []
    y = np.array([0, 0, 1, 1, 1, 1])
    owners = ["a", "a", "b", "b", "b", "b"]

    def rows(y_sample, _):
        seen.append(len(y_sample))
        return float(y_sample.mean())

    bootstrap_interval(y, y.astype(float), owners, rows, resamples=50)
    assert set(seen) <= {4, 6, 8}  # 2+2, 2+4 or 4+4 rows: never a patient split apart
