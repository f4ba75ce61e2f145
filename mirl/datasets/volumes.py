"""Volume records (`--dims 3`): one record per DICOM series or NIfTI volume (or cine frame), and the one torch
Dataset that reads them onto a run's grid (`mirl.volumes`).

A series' record is named after its first slice's file (`ID_0a1b2c3d4_series`): split files stay stable across
runs, name no DICOM tag and never name a 2-D slice, so a split folder made for one kind refuses the other's data.
Its slices are listed in order when the data is listed; the slices left out of it (another size or orientation,
a repeated position) ride with it, and a run lists them (`left_out.csv`)."""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mirl.datasets.records import DecodedImages, DecodingDataset, ImageRecord
from mirl.errors import UnreadableImageError
from mirl.imaging import DICOM_SUFFIXES, NIFTI_SUFFIXES, image_suffix
from mirl.volumes import (
    SliceHeader,
    VolumeGeometry,
    assemble_series,
    read_dicom_series,
    read_nifti_volume,
    read_slice_header,
    resample_volume,
)

SERIES_SUFFIX = "_series"  # a series' id: its first slice's, marked as a volume


@dataclass(frozen=True)
class VolumeRecord(ImageRecord):
    """One volume: a NIfTI file (`index` (t,) for a frame of a 4-D cine), or a DICOM series whose `slices` are
    its files in order (`path` is the first). `left_out` holds (file, reason) of slices the series could not
    use, and of those that follow a gap."""

    slices: tuple[Path, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()


def read_volume(record: ImageRecord, geometry: VolumeGeometry) -> torch.Tensor:
    """The record's volume on the run's source grid, 1 x D x H x W int16."""
    slices = getattr(record, "slices", ())
    if slices:
        values, spacing = read_dicom_series(slices, geometry.intensity)
    elif image_suffix(record.path) in NIFTI_SUFFIXES:
        values, spacing = read_nifti_volume(record.path, record.index[0] if record.index else None,
                                            geometry.intensity)
    else:
        raise UnreadableImageError(f"{record.path.name}: not a volume (a NIfTI file or a DICOM series)")
    return resample_volume(values, spacing, geometry)


def series_records(headers: list[SliceHeader], stem: Callable[[Path], str], labels: dict[Path, np.ndarray] | None
                   ) -> list[VolumeRecord]:
    """One record per series among `headers` (slices without a SeriesInstanceUID are one series each), named by
    `stem(first slice)`, labelled with the most of its slices' labels (a finding is in the study when any slice
    shows it) when `labels` holds them."""
    series: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        series[header.series or f"(no series) {header.path}"].append(header)
    records = []
    for members in series.values():
        ordered, left_out = assemble_series(members)
        paths = tuple(h.path for h in ordered)
        study = None if labels is None else np.max([labels[h.path] for h in members], axis=0)
        records.append(VolumeRecord(f"{stem(paths[0])}{SERIES_SUFFIX}", paths[0], study, slices=paths,
                                    left_out=tuple((str(path), reason) for path, reason in left_out)))
    return sorted(records, key=lambda r: r.image_id)


def headers_or_unreadable(paths: list[Path], stem: Callable[[Path], str]
                          ) -> tuple[list[SliceHeader], list[VolumeRecord]]:
    """The slice headers of `paths`; a file whose header cannot be read becomes a record of its own that reads
    as unreadable, so a run skips and lists it."""
    headers, unreadable = [], []
    for path in paths:
        try:
            headers.append(read_slice_header(path))
        except UnreadableImageError:
            unreadable.append(VolumeRecord(f"{stem(path)}{SERIES_SUFFIX}", path, slices=(path,)))
    return headers, unreadable


def find_volumes(root: Path) -> list[ImageRecord]:
    """Every volume under a folder: each NIfTI file (a 4-D one reads as unreadable: which frame is meant is
    unknown) and each DICOM series; ids are relative paths without suffix (a series': its first slice's)."""
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        files += [Path(folder) / name for name in names]

    def stem(path: Path) -> str:
        relative = path.relative_to(root).as_posix()
        return relative[:-len(image_suffix(path))]

    volumes: list[ImageRecord] = [VolumeRecord(stem(p), p) for p in sorted(files) if image_suffix(p) in NIFTI_SUFFIXES]
    headers, unreadable = headers_or_unreadable(sorted(p for p in files if image_suffix(p) in DICOM_SUFFIXES), stem)
    return sorted([*volumes, *series_records(headers, stem, None), *unreadable], key=lambda r: r.image_id)


def pretraining_volumes(root: Path, labelled: list[ImageRecord] | None) -> list[ImageRecord]:
    """Volumes for pretraining: the labelled ones when there are (their test split is then held out), else every
    volume under the folder."""
    return labelled if labelled is not None else find_volumes(root)


def left_out_slices(records: list[ImageRecord]) -> list[tuple[str, str, str]]:
    """(volume id, file, reason) of every slice left out of its series among `records`."""
    return [(r.image_id, path, reason) for r in records for path, reason in getattr(r, "left_out", ())]


class VolumeDataset(DecodingDataset):
    """Reads volume records onto the run's grid as 1 x D x H x W int16 tensors (SOURCE_SCALE x the input
    size)."""

    def __init__(self, records: list[ImageRecord], geometry: VolumeGeometry, num_classes: int,
                 cache: DecodedImages | None = None) -> None:
        super().__init__(records, num_classes, cache)
        self.geometry = geometry

    def decode(self, record: ImageRecord) -> torch.Tensor:
        return read_volume(record, self.geometry)

    def blank(self) -> torch.Tensor:
        return torch.zeros(1, *self.geometry.source_shape, dtype=torch.int16)
