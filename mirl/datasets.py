"""Datasets: how each one is laid out on disk, what its labels mean, and one torch Dataset to read them.

A dataset is described once by a `DatasetDescription`: its classes, whether it is multi-label, a
function that lists the labelled images under a data root, one that lists unlabelled images, one
that decodes a file into an H x W x 3 uint8 array and one that says which patient an image belongs to.
Everything else (splits, pretraining, downstream training, metrics) works from that description.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mirl.errors import DataError, UnreadableImageError
from mirl.imaging import dicom_patient_group, read_ct_slice


@dataclass(frozen=True)
class ImageRecord:
    """One image: a stable id (what split files list), where its pixels are, and its label vector."""

    image_id: str
    path: Path
    labels: np.ndarray | None = None


@dataclass(frozen=True)
class DatasetDescription:
    """Everything MIRL needs to know about one dataset."""

    name: str
    classes: tuple[str, ...]
    multilabel: bool
    grayscale: bool
    find_labelled: Callable[[Path], list[ImageRecord]]
    find_unlabelled: Callable[[Path], list[ImageRecord]]
    decode: Callable[[Path], np.ndarray]
    patient_group: Callable[[ImageRecord], str]
    data_hint: str

    def check_root(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist; {self.data_hint}")


# ---------------------------------------------------------------- RSNA Intracranial Hemorrhage

RSNA_CLASSES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
RSNA_LABEL_FILES = ("stage_2_train.csv", "stage_1_train.csv")
RSNA_IMAGE_DIRS = ("stage_2_train", "stage_1_train_images", "stage_2_train_images")


def _rsna_label_csv(root: Path) -> Path | None:
    return next((root / name for name in RSNA_LABEL_FILES if (root / name).is_file()), None)


def _rsna_image_dir(root: Path) -> Path:
    return next((root / name for name in RSNA_IMAGE_DIRS if (root / name).is_dir()), root)


def read_rsna_labels(csv_path: Path) -> pd.DataFrame:
    """Pivot RSNA's long label CSV (`ID_<img>_<subtype>,Label`) to one row per image id, one column per class."""
    try:
        long = pd.read_csv(csv_path, dtype={"ID": str, "Label": "Int64"})
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path} is empty; it should hold RSNA's `ID,Label` rows") from None
    except (ValueError, TypeError) as error:
        raise DataError(f"{csv_path}: Label values must be 0 or 1 ({error})") from None
    if list(long.columns[:2]) != ["ID", "Label"]:
        raise DataError(f"{csv_path}: expected the columns ID,Label, found {','.join(map(str, long.columns))}")
    if long.empty:
        raise DataError(f"{csv_path} has a header but no label rows")
    long = long.drop_duplicates()
    bad = long[~long["Label"].isin([0, 1])]
    if len(bad):
        raise DataError(f"{csv_path} row {bad.index[0] + 2}: Label {bad['Label'].iloc[0]} is not 0 or 1")
    conflicting = long[long["ID"].duplicated(keep=False)]
    if len(conflicting):
        raise DataError(f"{csv_path} row {conflicting.index[0] + 2}: {conflicting['ID'].iloc[0]} "
                        "appears with different labels")
    parts = long["ID"].str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or not parts[1].isin(RSNA_CLASSES).all():
        row = int(np.flatnonzero(~parts.iloc[:, -1].isin(RSNA_CLASSES))[0])
        raise DataError(f"{csv_path} row {row + 2}: {long['ID'].iloc[row]} does not end in one of {RSNA_CLASSES}")
    wide = (pd.DataFrame({"image_id": parts[0], "subtype": parts[1], "label": long["Label"].astype(np.int8)})
            .pivot(index="image_id", columns="subtype", values="label"))
    missing = [c for c in RSNA_CLASSES if c not in wide.columns]
    if missing or wide.isna().any().any():
        image_id = wide.index[wide.isna().any(axis=1)][0] if not missing else wide.index[0]
        raise DataError(f"{csv_path}: image {image_id} lacks a label for some of {RSNA_CLASSES}")
    return wide[list(RSNA_CLASSES)].astype(np.float32)


def find_rsna_labelled(root: Path) -> list[ImageRecord]:
    csv_path = _rsna_label_csv(root)
    if csv_path is None:
        raise DataError(f"no {' or '.join(RSNA_LABEL_FILES)} in {root}; downstream training needs RSNA's label CSV")
    labels = read_rsna_labels(csv_path)
    image_dir = _rsna_image_dir(root)
    paths = {p.stem: p for p in image_dir.glob("*.dcm")}
    absent = [image_id for image_id in labels.index if image_id not in paths]
    if absent:
        raise DataError(f"{csv_path}: {len(absent)} labelled images have no file in {image_dir} "
                        f"(first: {absent[0]}.dcm)")
    values = labels.to_numpy()
    return [ImageRecord(image_id, paths[image_id], values[i]) for i, image_id in enumerate(labels.index)]


def find_dicoms(root: Path) -> list[ImageRecord]:
    """Every DICOM under a folder (unlabelled), identified by its path relative to the folder."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".dcm", ".dicom") and p.is_file())
    return [ImageRecord(p.relative_to(root).with_suffix("").as_posix(), p) for p in files]


def find_rsna_unlabelled(root: Path) -> list[ImageRecord]:
    """RSNA's images when the label CSV is there (so the test split can be held out), else any DICOM folder."""
    if _rsna_label_csv(root) is not None:
        return find_rsna_labelled(root)
    return find_dicoms(root)


RSNA = DatasetDescription(
    name="rsna",
    classes=RSNA_CLASSES,
    multilabel=True,
    grayscale=True,
    find_labelled=find_rsna_labelled,
    find_unlabelled=find_rsna_unlabelled,
    decode=read_ct_slice,
    patient_group=lambda record: dicom_patient_group(record.path),
    data_hint="download RSNA Intracranial Hemorrhage Detection from Kaggle, or write sample data with "
              "`python -m mirl.sample_data rsna --out DIR` and pass --data-root DIR",
)

DATASETS: dict[str, DatasetDescription] = {"rsna": RSNA}


# ---------------------------------------------------------------- reading pixels

class ImageDataset(Dataset):
    """Decodes records into C x S x S uint8 tensors; an unreadable file yields `ok=False`, not an error.

    Augmentation is not done here: the training loop augments whole batches on the device.
    """

    def __init__(self, records: list[ImageRecord], decode: Callable[[Path], np.ndarray], image_size: int,
                 num_classes: int) -> None:
        self.records = records
        self.decode = decode
        self.image_size = image_size
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        record = self.records[index]
        labels = torch.zeros(self.num_classes) if record.labels is None else torch.tensor(record.labels)
        try:
            array = self.decode(record.path)
        except UnreadableImageError:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), labels, False
        return resize_uint8(array, self.image_size), labels, True


def resize_uint8(array: np.ndarray, size: int) -> torch.Tensor:
    """H x W x C uint8 array to a C x size x size uint8 tensor (antialiased bilinear)."""
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if image.shape[1:] == (size, size):
        return image.contiguous()
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)
