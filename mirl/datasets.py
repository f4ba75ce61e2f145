"""Datasets: how each one is laid out on disk, what its labels mean, and one torch Dataset to read them.

A dataset is described once by a `DatasetDescription`: its classes, whether it is multi-label, a
function that lists the labelled images under a data root, one that lists the images pretraining
may use, and one that says which patient (or lesion) an image belongs to. Pixels of every format
are decoded by the one `decode_record`. Splits, pretraining, downstream training and metrics all
work from the description, so a new dataset is a reader, a sample writer and a description.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mirl.errors import DataError, UnreadableImageError
from mirl.imaging import DICOM_SUFFIXES, NIFTI_SUFFIXES, PHOTO_SUFFIXES, dicom_patient_group, image_suffix, \
    nifti_slice_count, read_dicom_image, read_nifti_slice, read_photo

if TYPE_CHECKING:
    from mirl.cache import DecodedImageCache


@dataclass(frozen=True)
class ImageRecord:
    """One 2-D image: a stable id (what split files list), its file, the slice/frame inside the file
    for volumes, its label vector, and its patient or lesion when the reader knows it."""

    image_id: str
    path: Path
    labels: np.ndarray | None = None
    group: str | None = None
    index: tuple[int, ...] = field(default=())


def decode_record(record: ImageRecord) -> np.ndarray:
    """The record's pixels as H x W x 3 uint8, whatever the file format."""
    suffix = image_suffix(record.path)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti_slice(record.path, *record.index)
    if suffix in DICOM_SUFFIXES:
        return read_dicom_image(record.path)
    return read_photo(record.path)


def record_group(record: ImageRecord) -> str:
    """The patient or lesion of a record when its reader knew it, else the image itself."""
    return record.group or record.image_id


@dataclass(frozen=True)
class DatasetDescription:
    """Everything MIRL needs to know about one dataset."""

    name: str
    classes: tuple[str, ...]
    multilabel: bool
    grayscale: bool
    find_labelled: Callable[[Path], list[ImageRecord]]
    has_labels: Callable[[Path], bool]
    data_hint: str
    patient_group: Callable[[ImageRecord], str] = record_group
    patient_vote: bool = False  # also report patient-level accuracy from the slices' votes

    def check_root(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist; {self.data_hint}")

    def pretraining_images(self, root: Path, labelled: list[ImageRecord] | None) -> list[ImageRecord]:
        """Images for pretraining: the labelled set when there is one (its test split is then held
        out), else every image in the folder."""
        return labelled if labelled is not None else find_images(root)


# ---------------------------------------------------------------- any folder of images

def find_images(root: Path) -> list[ImageRecord]:
    """Every PNG, JPEG, DICOM and NIfTI slice under a folder, unlabelled; ids are relative paths."""
    records = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = image_suffix(path)
        stem = path.relative_to(root).as_posix()[:-len(suffix)] if suffix else path.relative_to(root).as_posix()
        if suffix in PHOTO_SUFFIXES or suffix in DICOM_SUFFIXES:
            records.append(ImageRecord(stem, path))
        elif suffix in NIFTI_SUFFIXES:
            try:
                slices, frames = nifti_slice_count(path)
            except UnreadableImageError:
                continue  # an unreadable volume is skipped like any unreadable image
            records += [ImageRecord(f"{stem}_t{t:02d}_s{z:02d}", path, index=(z, t))
                        for t in range(frames) for z in range(slices)]
    return records


def image_files_by_stem(root: Path) -> dict[str, Path]:
    """PNG/JPEG/DICOM files under `root` by file name without suffix (the first one if repeated)."""
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and image_suffix(path) in PHOTO_SUFFIXES + DICOM_SUFFIXES:
            files.setdefault(path.name[:-len(image_suffix(path))], path)
    return files


def read_label_csv(csv_path: Path, root: Path,
                   groups: dict[str, str] | None = None) -> tuple[list[ImageRecord], tuple[str, ...], bool]:
    """An ISIC-shaped CSV: an image column, then one 0/1 column per class (1.0/0.0 accepted).

    Returns the records, the class names in column order, and whether the labels are multi-label
    (some row with several ones). Images are looked up by name under `root`.
    """
    try:
        table = pd.read_csv(csv_path, dtype={0: str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path} is empty; it should hold an image column and one 0/1 column per class") from None
    if table.shape[1] < 3 or table.empty:
        raise DataError(f"{csv_path} needs an image column, at least two class columns and one row")
    image_column, classes = table.columns[0], tuple(str(c) for c in table.columns[1:])
    values = table[list(table.columns[1:])].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(~np.isin(values, [0.0, 1.0]))
    if len(bad):
        row, column = bad[0]
        raise DataError(f"{csv_path} row {row + 2}: column {classes[column]} is "
                        f"{str(table.iloc[row, column + 1])!r}, not 0 or 1")
    files = image_files_by_stem(root)
    records = []
    for row, (name, labels) in enumerate(zip(table[image_column].astype(str), values.astype(np.float32))):
        if name not in files:
            raise DataError(f"{csv_path} row {row + 2}: image {name} has no PNG, JPEG or DICOM file under {root}")
        records.append(ImageRecord(name, files[name], labels, (groups or {}).get(name)))
    multilabel = bool((values.sum(axis=1) != 1).any())
    return records, classes, multilabel


# ---------------------------------------------------------------- RSNA Intracranial Hemorrhage

RSNA_CLASSES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
RSNA_LABEL_FILES = ("stage_2_train.csv", "stage_1_train.csv")
RSNA_IMAGE_DIRS = ("stage_2_train", "stage_1_train_images", "stage_2_train_images")


def _rsna_label_csv(root: Path) -> Path | None:
    return next((root / name for name in RSNA_LABEL_FILES if (root / name).is_file()), None)


def _rsna_image_dir(root: Path) -> Path:
    return next((root / name for name in RSNA_IMAGE_DIRS if (root / name).is_dir()), root)


def read_rsna_labels(csv_path: Path) -> pd.DataFrame:
    """Pivot RSNA's long label CSV (`ID_<img>_<subtype>,Label`) to one row per image id, one column per class.

    The full CSV has 4.5 million rows, so every step is a whole-array numpy operation: no Python-level
    string split per row (pandas' `str.rsplit` alone takes tens of seconds at that size). Rows that repeat
    exactly are allowed (the real file has some); rows that disagree are an error. Images come out sorted
    by id, so the same CSV in any row order gives the same records and the same splits.
    """
    try:
        long = pd.read_csv(csv_path, dtype={"ID": object, "Label": "Int64"})
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path} is empty; it should hold RSNA's `ID,Label` rows") from None
    except (ValueError, TypeError) as error:
        raise DataError(f"{csv_path}: Label values must be 0 or 1 ({error})") from None
    if list(long.columns[:2]) != ["ID", "Label"]:
        raise DataError(f"{csv_path}: expected the columns ID,Label, found {','.join(map(str, long.columns))}")
    if long.empty:
        raise DataError(f"{csv_path} has a header but no label rows")
    labels = long["Label"].to_numpy(dtype=np.int64, na_value=-1)
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise DataError(f"{csv_path} row {bad[0] + 2}: Label {long['Label'].iloc[bad[0]]} is not 0 or 1")
    ids = long["ID"].fillna("").to_numpy(dtype=str)
    subtype = np.full(len(ids), -1)
    for index, name in enumerate(RSNA_CLASSES):
        subtype[np.strings.endswith(ids, "_" + name)] = index
    unknown = np.flatnonzero(subtype < 0)
    if unknown.size:
        raise DataError(f"{csv_path} row {unknown[0] + 2}: {ids[unknown[0]]} does not end in one of {RSNA_CLASSES}")
    image_ids = _strip_suffixes(ids, np.array([len(name) + 1 for name in RSNA_CLASSES])[subtype])
    codes, unique_ids = pd.factorize(image_ids)
    cell = codes * len(RSNA_CLASSES) + subtype
    cells = len(unique_ids) * len(RSNA_CLASSES)
    rows_per_cell = np.bincount(cell, minlength=cells)
    ones_per_cell = np.bincount(cell, weights=labels, minlength=cells)
    conflicting = (ones_per_cell > 0) & (ones_per_cell < rows_per_cell)
    if conflicting.any():
        same_cell = np.flatnonzero(cell == cell[np.flatnonzero(conflicting[cell])[0]])
        row = int(same_cell[labels[same_cell] != labels[same_cell[0]]][0])  # the first row that disagrees
        raise DataError(f"{csv_path} row {row + 2}: {ids[row]} appears with different labels")
    if (rows_per_cell == 0).any():
        image_id = unique_ids[np.flatnonzero(rows_per_cell == 0)[0] // len(RSNA_CLASSES)]
        raise DataError(f"{csv_path}: image {image_id} lacks a label for some of {RSNA_CLASSES}")
    wide = (ones_per_cell > 0).reshape(len(unique_ids), len(RSNA_CLASSES)).astype(np.float32)
    order = np.argsort(unique_ids, kind="stable")
    return pd.DataFrame(wide[order], index=pd.Index(unique_ids[order], name="image_id"), columns=list(RSNA_CLASSES))


def _strip_suffixes(strings: np.ndarray, suffix_lengths: np.ndarray) -> np.ndarray:
    """Cut `suffix_lengths[i]` characters off the end of `strings[i]`, for a fixed-width numpy unicode array.

    Zeroing the cut characters in the UCS-4 code-point view does it for all rows at once; numpy reads a
    trailing NUL as the end of the string.
    """
    width = strings.dtype.itemsize // 4
    code_points = np.ascontiguousarray(strings).view(np.uint32).reshape(len(strings), width).copy()
    keep = np.strings.str_len(strings) - suffix_lengths
    code_points[np.arange(width)[None, :] >= keep[:, None]] = 0
    return code_points.view(strings.dtype).reshape(len(strings))


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


RSNA = DatasetDescription(
    name="rsna",
    classes=RSNA_CLASSES,
    multilabel=True,
    grayscale=True,
    find_labelled=find_rsna_labelled,
    has_labels=lambda root: _rsna_label_csv(root) is not None,
    patient_group=lambda record: dicom_patient_group(record.path),
    data_hint="download RSNA Intracranial Hemorrhage Detection from Kaggle, or write sample data with "
              "`python -m mirl.sample_data rsna --out DIR` and pass --data-root DIR",
)


# ---------------------------------------------------------------- ISIC 2019

ISIC_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ISIC_LABEL_FILE = "ISIC_2019_Training_GroundTruth.csv"
ISIC_METADATA_FILES = ("ISIC_2019_Training_Metadata.csv", "HAM10000_metadata.csv")


def isic_lesions(root: Path) -> dict[str, str]:
    """Image name to lesion id from HAM10000-style metadata, so one lesion's images stay together."""
    for name in ISIC_METADATA_FILES:
        path = root / name
        if path.is_file():
            table = pd.read_csv(path, dtype=str)
            image_column = "image" if "image" in table.columns else "image_id"
            if "lesion_id" in table.columns and image_column in table.columns:
                known = table.dropna(subset=["lesion_id"])
                return dict(zip(known[image_column], known["lesion_id"]))
    return {}


def find_isic_labelled(root: Path) -> list[ImageRecord]:
    csv_path = root / ISIC_LABEL_FILE
    if not csv_path.is_file():
        raise DataError(f"no {ISIC_LABEL_FILE} in {root}; pass --labels CSV for other labels")
    records, classes, _ = read_label_csv(csv_path, root, isic_lesions(root))
    if classes != ISIC_CLASSES:
        raise DataError(f"{csv_path}: expected the columns {','.join(ISIC_CLASSES)}, found {','.join(classes)}; "
                        "pass it with --labels to use its own classes")
    return records


ISIC = DatasetDescription(
    name="isic",
    classes=ISIC_CLASSES,
    multilabel=False,
    grayscale=False,
    find_labelled=find_isic_labelled,
    has_labels=lambda root: (root / ISIC_LABEL_FILE).is_file(),
    data_hint="download the ISIC 2019 training data (images and ground truth CSV), or write sample data with "
              "`python -m mirl.sample_data isic --out DIR` and pass --data-root DIR",
)


def with_label_csv(description: DatasetDescription, csv_path: Path, root: Path) -> DatasetDescription:
    """The user's own labelled data under `root`: classes and multi-label-ness read from an ISIC-shaped CSV."""
    if not csv_path.is_file():
        raise DataError(f"label CSV {csv_path} does not exist")
    description.check_root(root)
    records, classes, multilabel = read_label_csv(csv_path, root)
    return replace(description, name=f"{description.name}:{csv_path.name}", classes=classes, multilabel=multilabel,
                   find_labelled=lambda _: records, has_labels=lambda _: True)


# ---------------------------------------------------------------- ACDC

ACDC_CLASSES = ("NOR", "MINF", "DCM", "HCM", "RV")


def read_info_cfg(path: Path) -> dict[str, str]:
    """ACDC's `Info.cfg` (`Key: value` lines), checked to name a known Group and ED/ES frames."""
    info = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    if info.get("Group") not in ACDC_CLASSES:
        raise DataError(f"{path}: Group is {info.get('Group')!r}, expected one of {', '.join(ACDC_CLASSES)}")
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit():
            raise DataError(f"{path}: {key} must be a 1-based frame number, found {info.get(key)!r}")
    return info


def acdc_patients(root: Path) -> list[Path]:
    base = root / "training" if (root / "training").is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name))


def find_acdc_labelled(root: Path) -> list[ImageRecord]:
    """Every short-axis slice of each patient's ED and ES volumes, labelled with the patient's group."""
    patients = acdc_patients(root)
    if not patients:
        raise DataError(f"no patientXXX folders under {root} (or {root / 'training'})")
    records = []
    for folder in patients:
        info = read_info_cfg(folder / "Info.cfg")
        labels = np.eye(len(ACDC_CLASSES), dtype=np.float32)[ACDC_CLASSES.index(info["Group"])]
        for phase in ("ED", "ES"):
            path = folder / f"{folder.name}_frame{int(info[phase]):02d}.nii.gz"
            if not path.is_file():
                raise DataError(f"{folder / 'Info.cfg'}: {phase} is frame {info[phase]} but {path.name} is missing")
            slices, _ = nifti_slice_count(path)
            records += [ImageRecord(f"{folder.name}_{phase}_s{z:02d}", path, labels, folder.name, (z,))
                        for z in range(slices)]
    return records


def find_acdc_cine(root: Path, labelled: list[ImageRecord]) -> list[ImageRecord]:
    """For pretraining: every slice of every frame of each patient's 4-D cine (ED/ES when it is absent)."""
    records = []
    for folder in acdc_patients(root):
        cine = folder / f"{folder.name}_4d.nii.gz"
        if not cine.is_file():
            records += [r for r in labelled if r.group == folder.name]
            continue
        slices, frames = nifti_slice_count(cine)
        records += [ImageRecord(f"{folder.name}_t{t:02d}_s{z:02d}", cine, None, folder.name, (z, t))
                    for t in range(frames) for z in range(slices)]
    return records


@dataclass(frozen=True)
class AcdcDescription(DatasetDescription):
    """ACDC pretrains on the whole cine, not only the labelled ED/ES volumes."""

    def pretraining_images(self, root: Path, labelled: list[ImageRecord] | None) -> list[ImageRecord]:
        return find_images(root) if labelled is None else find_acdc_cine(root, labelled)


ACDC = AcdcDescription(
    name="acdc",
    classes=ACDC_CLASSES,
    multilabel=False,
    grayscale=True,
    find_labelled=find_acdc_labelled,
    has_labels=lambda root: bool(acdc_patients(root)),
    data_hint="download the ACDC training set (patientXXX folders with Info.cfg and NIfTI volumes), or write "
              "sample data with `python -m mirl.sample_data acdc --out DIR` and pass --data-root DIR",
    patient_vote=True,
)

DATASETS: dict[str, DatasetDescription] = {"rsna": RSNA, "isic": ISIC, "acdc": ACDC}


# ---------------------------------------------------------------- reading pixels

class ImageDataset(Dataset):
    """Decodes records into C x S x S uint8 tensors; an unreadable file yields `ok=False`, not an error.

    With a decoded-image `cache` (mirl.cache), images are read from its memory map instead of decoded.
    Augmentation is not done here: the training loop augments whole batches on the device.
    """

    def __init__(self, records: list[ImageRecord], image_size: int, num_classes: int,
                 cache: DecodedImageCache | None = None) -> None:
        self.records = records
        self.image_size = image_size
        self.num_classes = num_classes
        self.cache = cache
        # cache rows as one array, not per-record objects, so workers share it copy-on-write
        self.cache_rows = np.array([-1 if (row := cache.row(r)) is None else row for r in records]) \
            if cache is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        record = self.records[index]
        labels = torch.zeros(self.num_classes) if record.labels is None else torch.tensor(record.labels)
        if self.cache_rows is not None and self.cache_rows[index] >= 0:
            image, readable = self.cache.read(self.cache_rows[index])
            return image, labels, readable
        try:
            array = decode_record(record)
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
