"""RSNA Intracranial Hemorrhage Detection: DICOM slices and the long-form label CSV."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from mirl.datasets.csv_files import read_csv_checked
from mirl.datasets.records import DatasetDescription, ImageRecord, VolumeFormat
from mirl.datasets.volumes import headers_or_unreadable, pretraining_volumes, series_records
from mirl.errors import DataError, UnreadableImageError
from mirl.imaging import dicom_patient_group


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
    long = read_csv_checked(csv_path, "RSNA's `ID,Label` rows", dtype={"ID": object})
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


def find_rsna_volumes(root: Path) -> list[ImageRecord]:
    """One record per labelled series (SeriesInstanceUID, slices ordered along the slice normal), labelled at
    study level: a hemorrhage type is present when any of its slices shows it."""
    slices = find_rsna_labelled(root)
    labels = {r.path: r.labels for r in slices}
    stems = {r.path: r.image_id for r in slices}
    headers, unreadable = headers_or_unreadable(sorted(labels), stems.__getitem__)
    unreadable = [replace(r, labels=labels[r.path]) for r in unreadable]
    return sorted([*series_records(headers, stems.__getitem__, labels), *unreadable], key=lambda r: r.image_id)


RSNA = DatasetDescription(
    name="rsna",
    classes=RSNA_CLASSES,
    multilabel=True,
    augment="grey",
    find_labelled=find_rsna_labelled,
    has_labels=lambda root: _rsna_label_csv(root) is not None,
    patient_group=dicom_patient_group_or_own,
    data_hint="download RSNA Intracranial Hemorrhage Detection from Kaggle, or write sample data with "
              "`python -m mirl.sample_data rsna --out DIR` and pass --data-root DIR",
    # a head CT: 32 slices of 5 mm (RSNA's usual thickness) by 128 x 128 of 2 mm cover 160 x 256 x 256 mm
    volumes=VolumeFormat(find_labelled=find_rsna_volumes, find_pretraining=pretraining_volumes, size=(32, 128, 128),
                         voxel_size=(5.0, 2.0, 2.0), intensity="hu", augment="ct"),
)
