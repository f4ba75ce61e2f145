"""Evaluation metrics, each computed once here: ROC AUC, the RSNA weighted log loss, accuracy and
balanced accuracy. A class with no positive (or no negative) example in a split has no AUC and no
recall: it is reported as absent (None), never as 0 and never as a crash.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import rankdata

PROBABILITY_FLOOR = 1e-15  # Kaggle's clip for the RSNA competition's log loss


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half); None if one class is absent."""
    y_true = np.asarray(y_true).astype(bool)
    positives, negatives = int(y_true.sum()), int((~y_true).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(score)
    u = ranks[y_true].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def weighted_log_loss(y_true: np.ndarray, probability: np.ndarray, weights: np.ndarray) -> float:
    """Per image, the class-weighted binary cross-entropy divided by the weights' sum; mean over images.

    With RSNA's weights (2 for `any`, 1 per subtype) this is the Kaggle competition metric,
    normalised by 7, not by the 6 classes a plain weighted BCE mean would divide by.
    """
    # float64: in float32, 1 - 1e-15 rounds to 1 and a confident wrong answer would cost log(0)
    p = np.clip(np.asarray(probability, dtype=np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    per_class = -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))
    return float(((per_class * weights).sum(axis=1) / weights.sum()).mean())


def multilabel_metrics(y_true: np.ndarray, probability: np.ndarray, classes: tuple[str, ...]) -> dict:
    """AUC per class, their macro mean over classes present, and the weighted log loss."""
    auc = {c: roc_auc(y_true[:, i], probability[:, i]) for i, c in enumerate(classes)}
    present = [v for v in auc.values() if v is not None]
    weights = np.array([2.0 if c == "any" else 1.0 for c in classes])
    return {
        "auc_macro": float(np.mean(present)) if present else None,
        "auc": auc,
        "weighted_log_loss": weighted_log_loss(y_true, probability, weights),
        "n_images": int(len(y_true)),
    }


def singlelabel_metrics(y_true: np.ndarray, probability: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Accuracy, balanced accuracy (mean recall over classes present) and one-vs-rest AUC per class."""
    truth = y_true.argmax(axis=1)
    predicted = probability.argmax(axis=1)
    recall = {}
    for i, c in enumerate(classes):
        members = truth == i
        recall[c] = float((predicted[members] == i).mean()) if members.any() else None
    present = [v for v in recall.values() if v is not None]
    auc = {c: roc_auc(truth == i, probability[:, i]) for i, c in enumerate(classes)}
    present_auc = [v for v in auc.values() if v is not None]
    return {
        "accuracy": float((predicted == truth).mean()),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "recall": recall,
        "auc": auc,
        "auc_macro": float(np.mean(present_auc)) if present_auc else None,
        "n_images": int(len(y_true)),
    }


def patient_vote_accuracy(y_true: np.ndarray, probability: np.ndarray, patients: list[str]) -> float:
    """Accuracy over patients: each patient's class is the one most of its slices predict (a tie goes
    to the tied class with the larger summed probability)."""
    predicted, truth = probability.argmax(axis=1), y_true.argmax(axis=1)
    patients_arr = np.asarray(patients)
    correct = []
    for patient in np.unique(patients_arr):
        mine = patients_arr == patient
        votes = np.bincount(predicted[mine], minlength=probability.shape[1])
        tied = votes == votes.max()
        choice = int(np.argmax(np.where(tied, probability[mine].sum(axis=0), -np.inf)))
        correct.append(choice == truth[mine][0])
    return float(np.mean(correct))


def evaluate(y_true: np.ndarray, probability: np.ndarray, classes: tuple[str, ...], multilabel: bool,
             patients: list[str] | None = None) -> dict:
    """The dataset's metrics: multi-label AUCs and log loss, or single-label accuracies, plus the
    patient-level vote when `patients` names each row's patient."""
    if multilabel:
        return multilabel_metrics(y_true, probability, classes)
    metrics = singlelabel_metrics(y_true, probability, classes)
    if patients is not None:
        metrics["patient_accuracy"] = patient_vote_accuracy(y_true, probability, patients)
        metrics["n_patients"] = len(set(patients))
    return metrics


def primary_metric(multilabel: bool) -> str:
    """The number model selection maximises: macro AUC (multi-label) or balanced accuracy."""
    return "auc_macro" if multilabel else "balanced_accuracy"


def reported_metrics(multilabel: bool) -> tuple[str, ...]:
    """The headline metrics of a dataset's results tables (for RSNA also the Kaggle challenge's weighted log loss)."""
    return ("auc_macro", "weighted_log_loss") if multilabel else ("balanced_accuracy", "auc_macro", "accuracy")


def bootstrap_interval(y_true: np.ndarray, probability: np.ndarray, patients: list[str],
                       statistic: Callable[[np.ndarray, np.ndarray], float | None], resamples: int = 1000,
                       seed: int = 0) -> list[float] | None:
    """95 % percentile interval of `statistic` over resamples of whole patients with replacement.

    Slices of one patient are not independent, so resampling slices would make the interval too
    narrow; each resample draws patients and takes all of their rows. The same rows in the same order give
    the same interval whatever the patients are called.
    """
    rng = np.random.default_rng(seed)
    # patients numbered in order of their first row, not of their names: an RSNA patient's name is a hash
    # salted per process, and numbering by it would draw other resamples, so another interval, at every run
    _, first, owner = np.unique(np.asarray(patients), return_index=True, return_inverse=True)
    owner = np.argsort(np.argsort(first))[owner.reshape(-1)]
    rows_of = [np.flatnonzero(owner == p) for p in range(len(first))]
    values = []
    for _ in range(resamples):
        rows = np.concatenate([rows_of[p] for p in rng.integers(0, len(rows_of), len(rows_of))])
        value = statistic(y_true[rows], probability[rows])
        if value is not None:
            values.append(value)
    if len(values) < resamples // 2:  # too few resamples hold every class the metric needs
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def paired_difference(y_true: np.ndarray, probability_a: np.ndarray, probability_b: np.ndarray,
                      patients: list[str], statistic: Callable[[np.ndarray, np.ndarray], float | None],
                      resamples: int = 1000, seed: int = 0) -> tuple[float | None, list[float] | None]:
    """`statistic` of model a minus that of model b on the same images, and its 95 % interval over resamples
    of whole patients: paired, so both models are scored on each resample's same patients, and the interval
    holds only the variance of their difference (not of each test set draw twice)."""
    both = np.stack([probability_a, probability_b], axis=-1)

    def difference(y: np.ndarray, p: np.ndarray) -> float | None:
        a, b = statistic(y, p[..., 0]), statistic(y, p[..., 1])
        return None if a is None or b is None else a - b
    return difference(y_true, both), bootstrap_interval(y_true, both, patients, difference, resamples, seed)
