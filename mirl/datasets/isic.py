"""ISIC 2019: dermoscopy JPEGs, the ground-truth CSV and the lesion metadata."""
from __future__ import annotations

from pathlib import Path

from mirl.datasets.csv_files import read_csv_checked, read_label_csv
from mirl.datasets.records import DatasetDescription, ImageRecord
from mirl.errors import DataError

ISIC_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ISIC_LABEL_FILE = "ISIC_2019_Training_GroundTruth.csv"
ISIC_METADATA_FILES = ("ISIC_2019_Training_Metadata.csv", "HAM10000_metadata.csv")


def isic_lesions(root: Path) -> dict[str, str]:
    """Image name to lesion id from HAM10000-style metadata, so one lesion's images stay together.

    An image listed twice with two lesion ids is an error: its lesion's images could not be kept together.
    """
    for name in ISIC_METADATA_FILES:
        path = root / name
        if path.is_file():
            table = read_csv_checked(path, "an image and a lesion_id column", dtype=str)
            image_column = "image" if "image" in table.columns else "image_id"
            if "lesion_id" in table.columns and image_column in table.columns:
                known = table.dropna(subset=[image_column, "lesion_id"])
                lesions: dict[str, tuple[str, int]] = {}  # image to its lesion and the row saying so
                for row, image, lesion in zip(known.index + 2, known[image_column], known["lesion_id"]):
                    first, first_row = lesions.setdefault(image, (lesion, row))
                    if first != lesion:
                        raise DataError(f"{path} row {row}: image {image} is in lesion {lesion} here but in "
                                        f"{first} in row {first_row}")
                return {image: lesion for image, (lesion, _) in lesions.items()}
    return {}


def find_isic_labelled(root: Path) -> list[ImageRecord]:
    csv_path = root / ISIC_LABEL_FILE
    if not csv_path.is_file():
        raise DataError(f"no {ISIC_LABEL_FILE} in {root}; pass --labels CSV for other labels")
    records, classes, _ = read_label_csv(csv_path, root, isic_lesions(root))
    if classes != ISIC_CLASSES:
        raise DataError(f"{csv_path} row 1: expected the classes {','.join(ISIC_CLASSES)}, found {','.join(classes)}; "
                        "pass it with --labels to use its own classes")
    return records


ISIC = DatasetDescription(
    name="isic",
    classes=ISIC_CLASSES,
    multilabel=False,
    augment="paper",
    find_labelled=find_isic_labelled,
    has_labels=lambda root: (root / ISIC_LABEL_FILE).is_file(),
    data_hint="download the ISIC 2019 training data (images and ground truth CSV), or write sample data with "
              "`python -m mirl.sample_data isic --out DIR` and pass --data-root DIR",
)
