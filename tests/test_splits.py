"""Label-fraction splits: nested, disjoint by patient, stratified, written once and reused."""
import numpy as np
import pytest

from mirl.datasets import RSNA
from mirl.errors import DataError
from mirl.splits import FRACTIONS, label_fraction_split, load_splits, read_split


@pytest.fixture(scope="module")
def cohort():
    """400 patients with 1-12 slices each and patient-correlated multi-labels of varied rarity."""
    rng = np.random.default_rng(0)
    groups, labels = [], []
    prevalence = np.array([0.05, 0.15, 0.3, 0.5])
    for patient in range(400):
        patient_labels = rng.random(4) < prevalence
        for _ in range(rng.integers(1, 13)):
            groups.append(f"patient{patient}")
            labels.append(patient_labels & (rng.random(4) < 0.7))
    return np.array(labels, dtype=float), groups


def test_fractions_are_nested_and_disjoint_from_val_and_test(cohort):
    labels, groups = cohort
    splits = label_fraction_split(labels, groups)
    test, val = set(splits["test"]), set(splits["val"])
    assert not test & val
    previous = None
    for fraction in FRACTIONS:
        current = set(splits[f"train{fraction}F"])
        assert not current & (test | val)
        if previous is not None:
            assert current <= previous and len(current) < len(previous)
        previous = current
    assert len(test | val | set(splits["train100F"])) == len(labels)


def test_no_patient_on_both_sides(cohort):
    labels, groups = cohort
    splits = label_fraction_split(labels, groups)
    patients = {name: {groups[i] for i in idx} for name, idx in splits.items()}
    assert not patients["test"] & patients["val"]
    assert not patients["test"] & patients["train100F"]
    assert not patients["val"] & patients["train100F"]
    for fraction in FRACTIONS[1:]:  # a patient in a fraction brings all its training slices
        chosen = set(splits[f"train{fraction}F"])
        assert all(i in chosen for i in splits["train100F"] if groups[i] in patients[f"train{fraction}F"])


def test_sizes_and_class_balance_follow_the_proportions(cohort):
    labels, groups = cohort
    splits = label_fraction_split(labels, groups)
    overall = labels.mean(axis=0)
    n = len(labels)
    assert abs(len(splits["test"]) / n - 0.2) < 0.03
    assert abs(len(splits["train10F"]) / len(splits["train100F"]) - 0.1) < 0.03
    for name in ("test", "train100F", "train20F"):
        prevalence = labels[splits[name]].mean(axis=0)
        assert np.all(np.abs(prevalence - overall) < 0.35 * overall + 0.01), name
    rare = labels[:, 0].sum()
    assert labels[splits["test"], 0].sum() == pytest.approx(0.2 * rare, rel=0.3)


def test_split_files_are_made_on_first_use_and_reused(rsna_root, tmp_path):
    records = RSNA.find_labelled(rsna_root)
    first = load_splits(RSNA, records, tmp_path / "splits")
    assert (tmp_path / "splits" / "train1F.txt").is_file()
    assert read_split(tmp_path / "splits" / "test.txt") == first["test"]
    assert load_splits(RSNA, records, tmp_path / "splits") == first
    assert min(len(v) for v in first.values()) >= 1


def test_splits_of_other_data_are_refused(rsna_root, tmp_path):
    records = RSNA.find_labelled(rsna_root)
    load_splits(RSNA, records, tmp_path)
    (tmp_path / "val.txt").write_text("ID_000000000\n")
    with pytest.raises(DataError, match="other data"):
        load_splits(RSNA, records, tmp_path)
