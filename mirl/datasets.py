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

from mirl.augment import source_side
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
    patient_group: Callable[[ImageRecord], str | None] = record_group  # None: the image names no patient
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


# ---------------------------------------------------------------- CSV files
# Every message names the file and the row as a spreadsheet shows it: the header is row 1 and blank
# lines count, which is why blank lines are read as empty rows and dropped only after numbering.

_TOO_MANY_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_OPEN_QUOTE = re.compile(r"EOF inside string starting at row (\d+)")


def _read_csv(csv_path: Path, expected: str, **options) -> pd.DataFrame:
    """`pandas.read_csv` keeping blank lines as all-empty rows; each way it fails becomes one DataError.

    Only an empty cell is missing: pandas would also read NA, None, null, nan (a class, an image) as missing.
    """
    try:
        table = pd.read_csv(csv_path, skip_blank_lines=False, keep_default_na=False, na_values=[""], **options)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path} is empty; it should hold {expected}") from None
    except pd.errors.ParserError as error:
        message = " ".join(str(error).split())
        if match := _TOO_MANY_FIELDS.search(message):
            expected_fields, row, found = match.groups()
            raise DataError(f"{csv_path} row {row}: {found} values, but the header row has {expected_fields} "
                            "columns") from None
        if match := _OPEN_QUOTE.search(message):  # pandas counts this row from 0
            raise DataError(f"{csv_path} row {int(match.group(1)) + 1}: a quote opened here is never closed") from None
        raise DataError(f"{csv_path}: not a readable CSV file ({message})") from None
    except UnicodeDecodeError:
        raise DataError(f"{csv_path} row {_first_undecodable_line(csv_path)}: not UTF-8 text; save the file as "
                        "UTF-8 CSV") from None
    except OSError as error:
        raise DataError(f"{csv_path} cannot be read ({error.strerror or type(error).__name__})") from None
    if not isinstance(table.index, pd.RangeIndex):
        # pandas silently turns the first column into an index when the first data row has one value too many
        raise DataError(f"{csv_path} row 2: {table.shape[1] + 1} values, but the header row has "
                        f"{table.shape[1]} columns")
    return table


def _first_undecodable_line(path: Path) -> int:
    """The first line of a file that is not UTF-8 (pandas' error gives an offset within one chunk only).

    Splitting at newline bytes never cuts a character: no byte of a multi-byte UTF-8 character is one.
    """
    with open(path, "rb") as file:
        return next(number for number, line in enumerate(file, start=1) if not _is_utf8(line))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _shown(value: object) -> str:
    """A CSV cell as a message shows it."""
    return "empty" if pd.isna(value) else repr(str(value))


def read_label_csv(csv_path: Path, root: Path, groups: dict[str, str] | None = None,
                   group_column: str | None = None) -> tuple[list[ImageRecord], tuple[str, ...], bool]:
    """An ISIC-shaped CSV: an image column, then one 0/1 column per class (1.0/0.0 accepted), and with
    `group_column` one more column naming each image's patient (or lesion, or study), which keeps a
    patient's images on one side of every split.

    Returns the records, the class names in column order, and whether the labels are multi-label
    (some row with several ones). Images are looked up by name under `root`. An image listed twice
    with the same labels is kept once; with other labels it is an error.
    """
    # without a header, pandas neither renames repeated column names nor guesses an index column
    raw = _read_csv(csv_path, "an image column and one 0/1 column per class", header=None, dtype=str)
    if group_column is not None:
        header = list(raw.iloc[0])
        if group_column not in header[1:]:
            raise DataError(f"{csv_path} row 1: no column {group_column} (--group-column); the columns are "
                            f"{','.join(map(str, header))}")
        position = header.index(group_column)
        group_cells = raw.iloc[1:, position]
        raw = raw.drop(columns=raw.columns[position])
        blank = raw.iloc[1:].isna().all(axis=1)
        missing = group_cells.isna() & ~blank
        if missing.any():
            raise DataError(f"{csv_path} row {missing.idxmax() + 1}: column {group_column} is empty")
        groups = dict(zip(raw.iloc[1:, 0][~blank], group_cells[~blank]))
    header = list(raw.iloc[0])
    if len(header) < 3:
        raise DataError(f"{csv_path} row 1: needs an image column and at least two class columns, found "
                        f"{','.join(map(str, header))}")
    for column, name in enumerate(header):
        if pd.isna(name) or not str(name).strip():
            raise DataError(f"{csv_path} row 1: column {column + 1} has no name")
        if header.index(name) != column:
            raise DataError(f"{csv_path} row 1: column {name} appears twice")
    classes = tuple(str(name) for name in header[1:])
    table = raw.iloc[1:].dropna(how="all")
    if table.empty:
        raise DataError(f"{csv_path} has a header but no rows")
    rows = table.index.to_numpy() + 1  # raw's index 0 is the header, row 1
    cells = table.iloc[:, 1:]
    values = cells.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(~np.isin(values, [0.0, 1.0]))
    if len(bad):
        row, column = bad[0]
        raise DataError(f"{csv_path} row {rows[row]}: column {classes[column]} is "
                        f"{_shown(cells.iat[row, column])}, not 0 or 1")
    names = table.iloc[:, 0]
    first_of: dict[str, int] = {}  # image name to the position of its first row
    for position, name in enumerate(names):
        if pd.isna(name):
            raise DataError(f"{csv_path} row {rows[position]}: the image name is empty")
        first = first_of.setdefault(name, position)
        if first != position and not np.array_equal(values[first], values[position]):
            raise DataError(f"{csv_path} row {rows[position]}: image {name} appears with other labels than "
                            f"in row {rows[first]}")
    kept = np.fromiter(first_of.values(), dtype=np.int64, count=len(first_of))
    files = image_files_by_stem(root)
    records = []
    for position in kept:
        name = names.iat[position]
        if name not in files:
            raise DataError(f"{csv_path} row {rows[position]}: image {name} has no PNG, JPEG or DICOM file "
                            f"under {root}")
        records.append(ImageRecord(name, files[name], values[position].astype(np.float32), (groups or {}).get(name)))
    multilabel = bool((values[kept].sum(axis=1) != 1).any())
    return records, classes, multilabel


# ---------------------------------------------------------------- RSNA Intracranial Hemorrhage

def dicom_patient_group_or_own(record: ImageRecord) -> str | None:
    """The salted patient hash of an RSNA slice (None when its header names no patient); a file whose
    header cannot be read is a group of its own (its pixels cannot be read either, so training skips and
    lists it): one bad file among thousands must not stop the split from being made."""
    try:
        return dicom_patient_group(record.path)
    except UnreadableImageError:
        return f"unreadable:{record.image_id}"


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
    return _read_rsna_csv(csv_path)[0]


def _read_rsna_csv(csv_path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """`read_rsna_labels`, and the CSV row where each of its images first appears (for later messages)."""
    long = _read_csv(csv_path, "RSNA's `ID,Label` rows", dtype={"ID": object})
    if list(long.columns[:2]) != ["ID", "Label"]:
        raise DataError(f"{csv_path} row 1: expected the columns ID,Label, found {','.join(map(str, long.columns))}")
    long = long.dropna(how="all")
    if long.empty:
        raise DataError(f"{csv_path} has a header but no label rows")
    rows = long.index.to_numpy() + 2  # the row a user counts: header row 1, blank lines included
    labels = pd.to_numeric(long["Label"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        value = long["Label"].iat[bad[0]]
        # a blank line makes pandas read the column as floats; :g shows 7.0 as the 7 the file says
        shown = "(empty)" if pd.isna(value) else value if isinstance(value, str) else f"{value:g}"
        raise DataError(f"{csv_path} row {rows[bad[0]]}: Label {shown} is not 0 or 1")
    labels = labels.astype(np.int64)
    ids = long["ID"].fillna("").to_numpy(dtype=str)
    subtype = np.full(len(ids), -1)
    for index, name in enumerate(RSNA_CLASSES):
        subtype[np.strings.endswith(ids, "_" + name)] = index
    unknown = np.flatnonzero(subtype < 0)
    if unknown.size:
        shown = ids[unknown[0]] or "the empty ID"
        raise DataError(f"{csv_path} row {rows[unknown[0]]}: {shown} does not end in one of {RSNA_CLASSES}")
    image_ids = _strip_suffixes(ids, np.array([len(name) + 1 for name in RSNA_CLASSES])[subtype])
    codes, unique_ids = pd.factorize(image_ids)
    # factorize numbers images in order of appearance, so a row is an image's first exactly where its
    # code exceeds every code before it
    seen = np.maximum.accumulate(codes)
    first_rows = rows[np.flatnonzero(np.r_[True, seen[1:] > seen[:-1]])]
    cell = codes * len(RSNA_CLASSES) + subtype
    cells = len(unique_ids) * len(RSNA_CLASSES)
    rows_per_cell = np.bincount(cell, minlength=cells)
    ones_per_cell = np.bincount(cell, weights=labels, minlength=cells)
    if ((ones_per_cell > 0) & (ones_per_cell < rows_per_cell)).any():
        distinct, first_in_cell = np.unique(cell, return_index=True)
        earlier = first_in_cell[np.searchsorted(distinct, cell)]
        row = np.flatnonzero(labels != labels[earlier])[0]  # the first row contradicting an earlier one
        raise DataError(f"{csv_path} row {rows[row]}: {ids[row]} appears with different labels: {labels[row]} "
                        f"here, {labels[earlier[row]]} in row {rows[earlier[row]]}")
    if (rows_per_cell == 0).any():
        image = np.flatnonzero(rows_per_cell == 0)[0] // len(RSNA_CLASSES)
        missing = [name for k, name in enumerate(RSNA_CLASSES) if rows_per_cell[image * len(RSNA_CLASSES) + k] == 0]
        raise DataError(f"{csv_path} row {first_rows[image]}: image {unique_ids[image]} lacks a label for "
                        f"{', '.join(missing)}; each image needs one row for each of {', '.join(RSNA_CLASSES)}")
    wide = (ones_per_cell > 0).reshape(len(unique_ids), len(RSNA_CLASSES)).astype(np.float32)
    order = np.argsort(unique_ids, kind="stable")
    frame = pd.DataFrame(wide[order], index=pd.Index(unique_ids[order], name="image_id"), columns=list(RSNA_CLASSES))
    return frame, first_rows[order]


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
    labels, first_rows = _read_rsna_csv(csv_path)
    image_dir = _rsna_image_dir(root)
    paths = {p.stem: p for p in image_dir.glob("*.dcm")}
    absent = np.flatnonzero([image_id not in paths for image_id in labels.index])
    if absent.size:
        first = absent[np.argmin(first_rows[absent])]  # the one a user meets first reading the CSV
        others = f" ({absent.size - 1} more labelled images lack a file too)" if absent.size > 1 else ""
        raise DataError(f"{csv_path} row {first_rows[first]}: image {labels.index[first]} has no file "
                        f"{labels.index[first]}.dcm in {image_dir}{others}")
    values = labels.to_numpy()
    return [ImageRecord(image_id, paths[image_id], values[i]) for i, image_id in enumerate(labels.index)]


RSNA = DatasetDescription(
    name="rsna",
    classes=RSNA_CLASSES,
    multilabel=True,
    grayscale=True,
    find_labelled=find_rsna_labelled,
    has_labels=lambda root: _rsna_label_csv(root) is not None,
    patient_group=dicom_patient_group_or_own,
    data_hint="download RSNA Intracranial Hemorrhage Detection from Kaggle, or write sample data with "
              "`python -m mirl.sample_data rsna --out DIR` and pass --data-root DIR",
)


# ---------------------------------------------------------------- ISIC 2019

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
            table = _read_csv(path, "an image and a lesion_id column", dtype=str)
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
    grayscale=False,
    find_labelled=find_isic_labelled,
    has_labels=lambda root: (root / ISIC_LABEL_FILE).is_file(),
    data_hint="download the ISIC 2019 training data (images and ground truth CSV), or write sample data with "
              "`python -m mirl.sample_data isic --out DIR` and pass --data-root DIR",
)


def with_label_csv(description: DatasetDescription, csv_path: Path, root: Path,
                   group_column: str | None = None) -> DatasetDescription:
    """The user's own labelled data under `root`: classes and multi-label-ness read from an ISIC-shaped CSV,
    patients from its `group_column` when given."""
    if not csv_path.is_file():
        raise DataError(f"label CSV {csv_path} does not exist")
    description.check_root(root)
    records, classes, multilabel = read_label_csv(csv_path, root, group_column=group_column)
    return replace(description, name=f"{description.name}:{csv_path.name}", classes=classes, multilabel=multilabel,
                   find_labelled=lambda _: records, has_labels=lambda _: True)


# ---------------------------------------------------------------- ACDC

ACDC_CLASSES = ("NOR", "MINF", "DCM", "HCM", "RV")


def read_info_cfg(path: Path) -> dict[str, str]:
    """ACDC's `Info.cfg` (`Key: value` lines), checked to name a known Group and ED/ES frames.

    A key repeated with the same value is fine; with another value it is an error naming both lines.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} is missing; each patientXXX folder needs its Info.cfg") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} line {_first_undecodable_line(path)}: not UTF-8 text") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror or type(error).__name__})") from None
    info: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            if info.setdefault(key, value) != value:
                raise DataError(f"{path}: {key} is {value!r} on line {number} but {info[key]!r} on line {line_of[key]}")
            line_of.setdefault(key, number)
    if "Group" not in info:
        raise DataError(f"{path}: Group is missing; expected a line `Group: X`, X one of {', '.join(ACDC_CLASSES)}")
    if info["Group"] not in ACDC_CLASSES:
        raise DataError(f"{path}: Group is {info['Group']!r} on line {line_of['Group']}, expected one of "
                        f"{', '.join(ACDC_CLASSES)}")
    for key in ("ED", "ES"):
        value = info.get(key, "")
        if not (value.isdigit() and int(value) >= 1):
            where = f" on line {line_of[key]}" if key in line_of else ""
            raise DataError(f"{path}: {key} must be a 1-based frame number, found {info.get(key)!r}{where}")
    return info


def acdc_patients(root: Path) -> list[Path]:
    base = root / "training" if (root / "training").is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name))


def _volume_slices(path: Path) -> tuple[int, int]:
    """(slices, frames) of a NIfTI volume a dataset lists; one it cannot read stops the run, naming its path."""
    try:
        return nifti_slice_count(path)
    except UnreadableImageError as error:
        raise DataError(f"{path}: {str(error).removeprefix(f'{path.name}: ')}") from None


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
            slices, _ = _volume_slices(path)
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
        slices, frames = _volume_slices(cine)
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
    """Decodes records into C x S x S uint8 tensors, S = `source_side(image_size)`; an unreadable file
    yields `ok=False`, not an error.

    Images are delivered at twice the network's input side, so the device-side augmentation crops
    them at source resolution (the evaluation view takes their centre). With a decoded-image `cache`
    (mirl.cache), images are read from its memory map instead of decoded.
    """

    def __init__(self, records: list[ImageRecord], image_size: int, num_classes: int,
                 cache: DecodedImageCache | None = None) -> None:
        self.records = records
        self.image_size = image_size
        self.side = source_side(image_size)
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
        except Exception:  # whatever a file does to its reader, one bad file never stops a run
            return torch.zeros(3, self.side, self.side, dtype=torch.uint8), labels, False
        return square_uint8(array, self.side), labels, True

    def why_unreadable(self, index: int) -> str:
        """The reader's reason for an image that came out unreadable (decoded again: bad files are rare)."""
        try:
            decode_record(self.records[index])
        except Exception as error:
            return str(error) or type(error).__name__
        return "unreadable in the decoded-image cache"


def square_uint8(array: np.ndarray, side: int) -> torch.Tensor:
    """H x W x C uint8 array to a C x side x side uint8 tensor: the shorter side resized to `side`
    (antialiased bilinear), the longer one cropped to its centre. The aspect ratio is kept: a 4:3
    photograph is not squashed."""
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    height, width = image.shape[1:]
    if (height, width) == (side, side):
        return image.contiguous()
    scale = side / min(height, width)
    size = (max(side, int(height * scale)), max(side, int(width * scale)))  # truncated, as torchvision's Resize
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return resized[:, top:top + side, left:left + side].round_().clamp_(0, 255).to(torch.uint8).contiguous()
