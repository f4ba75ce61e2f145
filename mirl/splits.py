"""Patient-grouped, stratified, nested label-fraction splits, written once as text files.

`python -m mirl.splits rsna --data-root DIR --out DIR` writes `test.txt`, `val.txt` and
`train100F.txt` ... `train1F.txt` (one image id per line). Test and val are fixed; each smaller
training fraction is drawn from the one above it (1 % inside 5 % inside 10 % ...), so every method at
every fraction sees the same images. Slices of one patient always stay on one side of every split.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from mirl.config import FRACTIONS, SPATIAL_DIMS
from mirl.datasets import DATASETS, DatasetDescription, ImageRecord
from mirl.errors import DataError, InputError
from mirl.run_files import atomic_write_text, progress, prove_writable

TEST_PROPORTION = 0.2
VAL_PROPORTION = 0.1
SPLIT_SEED = 0


def split_file_names() -> list[str]:
    return ["test.txt", "val.txt"] + [f"train{f}F.txt" for f in FRACTIONS]


def stratified_group_partition(group_counts: np.ndarray, group_sizes: np.ndarray, proportions: list[float],
                               rng: np.random.Generator) -> np.ndarray:
    """Assign each group to one of len(proportions) subsets so every class is spread in proportion.

    Iterative stratification (Sechidis et al. 2011) over groups instead of samples: take the class
    with the fewest examples still unassigned, hand each group holding it to the subset that most
    lacks that class, and repeat. `group_counts` is groups x classes (positive images per group).
    """
    proportions_arr = np.asarray(proportions, dtype=np.float64)
    wanted = proportions_arr[:, None] * group_counts.sum(axis=0)[None, :]
    wanted_total = proportions_arr * group_sizes.sum()
    assignment = np.full(len(group_counts), -1)
    jitter = rng.random(len(proportions))  # random but fixed tie-break between subsets

    def best_subset(scores: np.ndarray) -> int:
        return int(np.lexsort((jitter, wanted_total, scores))[-1])

    def assign(group: int, subset: int) -> None:
        assignment[group] = subset
        wanted[subset] -= group_counts[group]
        wanted_total[subset] -= group_sizes[group]

    while True:
        open_groups = np.flatnonzero(assignment < 0)
        remaining = group_counts[open_groups].sum(axis=0)
        if not (remaining > 0).any():
            break
        rarest = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
        holders = open_groups[group_counts[open_groups, rarest] > 0]
        for group in rng.permutation(holders):
            assign(int(group), best_subset(wanted[:, rarest]))
    for group in rng.permutation(np.flatnonzero(assignment < 0)):
        assign(int(group), best_subset(wanted_total))
    # on small data a subset's share can round to nothing: give it one group from the largest subset
    for subset in np.flatnonzero(proportions_arr > 0):
        counts = np.bincount(assignment, minlength=len(proportions))
        if counts[subset] == 0 and counts.max() > 1:
            donor = rng.choice(np.flatnonzero(assignment == int(np.argmax(counts))))
            assignment[donor] = subset
    return assignment


def label_fraction_split(labels: np.ndarray, groups: list[str], seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Indices of test, val and each nested training fraction (`train100F` ... `train1F`)."""
    group_ids, first_seen, group_of_image = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    # number groups by first appearance, not by (salted, per-process) name, so splits are reproducible
    group_of_image = np.argsort(np.argsort(first_seen))[group_of_image]
    # "no finding" is a class of its own, so negatives are spread in proportion too
    with_none = np.concatenate([labels, (labels.sum(axis=1) == 0)[:, None]], axis=1).astype(np.float64)
    counts = np.zeros((len(group_ids), with_none.shape[1]))
    np.add.at(counts, group_of_image, with_none)
    sizes = np.bincount(group_of_image, minlength=len(group_ids)).astype(np.float64)
    rng = np.random.default_rng(seed)
    if len(group_ids) < 3:
        raise DataError(f"splitting needs at least 3 patients, found {len(group_ids)}")
    first = stratified_group_partition(counts, sizes, [1 - TEST_PROPORTION - VAL_PROPORTION, VAL_PROPORTION,
                                                      TEST_PROPORTION], rng)
    chosen = {"train100F": np.flatnonzero(first == 0), "val": np.flatnonzero(first == 1),
              "test": np.flatnonzero(first == 2)}
    previous, previous_fraction = chosen["train100F"], 100
    for fraction in FRACTIONS[1:]:
        keep = fraction / previous_fraction
        inner = stratified_group_partition(counts[previous], sizes[previous], [keep, 1 - keep], rng)
        subset = previous[inner == 0] if (inner == 0).any() else previous[:1]
        chosen[f"train{fraction}F"] = subset
        previous, previous_fraction = subset, fraction
    in_group = {name: np.isin(group_of_image, g) for name, g in chosen.items()}
    return {name: np.flatnonzero(mask) for name, mask in in_group.items()}


def read_split(path: Path) -> list[str]:
    """The image ids of a split file, one per line, exactly as written (an id may begin with a space)."""
    text = path.read_text(encoding="utf-8", errors="surrogateescape")  # ids from file names that are not UTF-8
    return [line for line in text.splitlines() if line.strip()]


def split_digest(image_ids: list[str]) -> str:
    """A fingerprint of a split's images, in any order: what a pretraining checkpoint records of the test
    split it held out, so a downstream run can tell whether its own test images were held out too."""
    joined = "\n".join(sorted(image_ids)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(joined).hexdigest()


def split_files_digest(split_dir: Path) -> str | None:
    """A fingerprint of every split file in `split_dir` (each one's name and image ids, in any order), None
    while they are not all there: what a run identity holds of its splits, so that the same splits in another
    folder are the same run and other splits under the same folder name are not."""
    paths = [split_dir / name for name in split_file_names()]
    if not all(path.is_file() for path in paths):
        return None
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\n{split_digest(read_split(path))}\n".encode())
    return digest.hexdigest()


def make_splits(description: DatasetDescription, records: list[ImageRecord], split_dir: Path) -> None:
    """Read each image's patient, split, and write the split files.

    The split is deterministic and each file is replaced atomically, so several torchrun processes that
    all find the files missing write the same bytes and none of them can read a half-written file."""
    prove_writable(split_dir, "--split-dir")  # before reading every file's patient
    groups = [description.patient_group(r) for r in progress(records, desc="reading patients for splits", unit="img")]
    nameless = sum(group is None for group in groups)
    if nameless:
        print(f"warning: {nameless} of {len(records)} images name no patient (no PatientID, StudyInstanceUID or "
              "SeriesInstanceUID); each of them is its own patient in the splits", file=sys.stderr)
    groups = [group if group is not None else f"image:{r.image_id}" for group, r in zip(groups, records)]
    labels = np.stack([r.labels for r in records])
    for name, indices in label_fraction_split(labels, groups).items():
        atomic_write_text(split_dir / f"{name}.txt", "".join(f"{records[i].image_id}\n" for i in indices))


def splits_like(description: DatasetDescription, records: list[ImageRecord], like_description: DatasetDescription,
                like_records: list[ImageRecord], like: Path, split_dir: Path) -> None:
    """Split files for `records` that put each patient where the split files in `like` (made for the same data
    read the other way: its slices for its volumes, or back) put it: the same test and val patients and the
    same nested fractions, so that a 2-D and a 3-D run compare on the same patients. A patient the `like` files
    put in two places, or do not name, is an error naming one of its images."""
    prove_writable(split_dir, "--out")
    like_splits = load_splits(like_description, like_records, like)
    by_id = {r.image_id: r for r in like_records}
    places: dict[str, set[str]] = {}  # patient: the split files naming its images
    patient_of: dict[str, str] = {}  # a patient's first image, for messages
    for name, ids in like_splits.items():
        for image_id in ids:
            patient = like_description.patient_group(by_id[image_id]) or f"image:{image_id}"
            places.setdefault(patient, set()).add(name)
            patient_of.setdefault(patient, image_id)
    named = {patient: frozenset(names) for patient, names in places.items()}
    for patient, names in named.items():
        sides = names & {"test", "val", "train100F"}
        fractions = sorted(int(n.removeprefix("train").removesuffix("F")) for n in names if n.startswith("train"))
        if len(sides) != 1 or (fractions and fractions != sorted(f for f in FRACTIONS if f >= fractions[0])):
            raise DataError(f"{like} puts the patient of {patient_of[patient]} in {', '.join(sorted(names))}: not "
                            "one side of a nested split (split files made by MIRL keep a patient in one place)")
    files: dict[str, list[str]] = {name: [] for name in like_splits}
    for record in progress(records, desc="reading patients for splits", unit="img"):
        patient = description.patient_group(record) or f"image:{record.image_id}"
        if patient not in named:
            raise DataError(f"{like} names no image of the patient of {record.image_id}: made for other data")
        for name in named[patient]:
            files[name].append(record.image_id)
    for name, ids in files.items():
        atomic_write_text(split_dir / f"{name}.txt", "".join(f"{image_id}\n" for image_id in ids))


# what str.splitlines breaks a line at: an image id holding one cannot be one line of a split file
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def check_one_line_ids(records: list[ImageRecord]) -> None:
    """Refuse, before any split is made, an image whose id (its file name) holds a line break: its split files
    would not read back as written."""
    for record in records:
        if LINE_BREAKS.intersection(record.image_id):
            raise DataError(f"the image file {ascii(str(record.path))} has a line break in its name, which a split "
                            "file (one image per line) cannot hold; rename it")


def load_splits(description: DatasetDescription, records: list[ImageRecord], split_dir: Path) -> dict[str, list[str]]:
    """The split files in `split_dir`, made from `records` on first use, checked against the data."""
    check_one_line_ids(records)
    if not all((split_dir / name).is_file() for name in split_file_names()):
        make_splits(description, records, split_dir)
    known = {r.image_id for r in records}
    splits = {}
    for name in split_file_names():
        ids = read_split(split_dir / name)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DataError(f"{split_dir / name} names {len(unknown)} images that are not in the data "
                            f"(first: {unknown[0]}); these splits belong to other data: pass another --split-dir")
        splits[name.removesuffix(".txt")] = ids
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirl.splits", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the split files")
    parser.add_argument("--dims", type=int, choices=SPATIAL_DIMS, default=2,
                        help="3: split the dataset's volumes (RSNA series, ACDC ED/ES) for --dims 3 runs")
    parser.add_argument("--like", type=Path, default=None, metavar="SPLIT_DIR",
                        help="put each patient where these split files, made for the same data read the other way "
                             "(slices for volumes, or back), put it: 2-D and 3-D runs then share their patients")
    args = parser.parse_args(argv)
    try:
        description = DATASETS[args.dataset].in_dims(args.dims)
        description.check_root(args.data_root)
        records = description.find_labelled(args.data_root)
        if args.like is None:
            make_splits(description, records, args.out)
        else:
            other = DATASETS[args.dataset].in_dims({2: 3, 3: 2}[args.dims])  # the same data read the other way
            splits_like(description, records, other, other.find_labelled(args.data_root), args.like, args.out)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name in split_file_names():
        print(f"{name:16s} {len(read_split(args.out / name)):7d} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
