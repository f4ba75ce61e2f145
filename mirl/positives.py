"""Positive pairs from two different images of one study or patient (Azizi et al. 2021, MICLe).

Augmenting one image twice teaches invariance to crops and colours. Medical data offers more: the
neighbouring slice of a CT series, another slice or cardiac phase of a patient's MRI, another photo of
the same skin lesion show the same anatomy or finding under real variation that no augmentation makes.
With `--positives study` or `patient`, the two views of a pair come from two such images:

- `study`: the nearest slices of the same series (RSNA: the slices before and after in the DICOM series;
  ACDC: the slices above and below in the same volume and frame; ISIC: another photo of the lesion).
- `patient`: any other image of the same patient (RSNA: PatientID, else study, else series; ACDC: any slice
  and frame of the patient; ISIC: any photo of the lesion).

An image without another one pairs with itself: two augmented views, as without `--positives`. Partners
are drawn only among the pretraining images, so the test split's images (and patients) never enter a pair.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset

from mirl.datasets import DatasetDescription, ImageDataset, ImageRecord
from mirl.datasets.volumes import VolumeDataset
from mirl.imaging import DICOM_SUFFIXES, NIFTI_SUFFIXES, dicom_series_position, image_suffix


def study_place(record: ImageRecord) -> tuple[str | None, float]:
    """The study (series) a record belongs to and its place in it: a NIfTI volume's frame and slice, a DICOM's
    series and position; a photo's lesion, all at one place."""
    suffix = image_suffix(record.path)
    if suffix in NIFTI_SUFFIXES and record.index:
        frame = record.index[1] if len(record.index) > 1 else 0
        return f"{record.path}#t{frame}", float(record.index[0])
    if suffix in DICOM_SUFFIXES:
        return dicom_series_position(record.path)
    return record.group, 0.0


def partner_candidates(description: DatasetDescription, records: list[ImageRecord],
                       level: str) -> list[list[int]]:
    """For each record, the records it may pair with at `level` ("study" or "patient"); empty when it has
    none. At the study level these are the nearest neighbours in its series: the one before and the one after
    (by place, then by id); at the patient level every other record of the patient."""
    if level == "patient":
        keys = [description.patient_group(r) for r in records]
        members: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            if key is not None:
                members[key].append(i)
        return [[j for j in members[key] if j != i] if key is not None else [] for i, key in enumerate(keys)]
    if level != "study":
        raise ValueError(f"unknown positives level {level}")
    places = [study_place(r) for r in records]
    series: dict[str, list[int]] = defaultdict(list)
    for i, (key, _) in enumerate(places):
        if key is not None:
            series[key].append(i)
    candidates: list[list[int]] = [[] for _ in records]
    for indices in series.values():
        ordered = sorted(indices, key=lambda i: (places[i][1], records[i].image_id))
        for position, i in enumerate(ordered):
            candidates[i] = [ordered[k] for k in (position - 1, position + 1) if 0 <= k < len(ordered)]
    return candidates


class PairedImages(Dataset):
    """An `ImageDataset` (or `VolumeDataset`) read in (anchor, partner) pairs, as a pairing `EpochSampler` yields
    them: each item is the two images stacked, 2 x C x S x S (2 x 1 x D x H x W), with the anchor's labels. A
    partner that cannot be read is replaced by the anchor (the pair becomes two views of one image); an
    unreadable anchor makes the pair unreadable."""

    def __init__(self, images: ImageDataset | VolumeDataset) -> None:
        self.images = images
        self.records = images.records

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, pair: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        anchor, partner = pair
        image, labels, readable = self.images[anchor]
        other, _, other_readable = self.images[partner] if partner != anchor else (image, labels, readable)
        pair = [image, other if other_readable else image]
        # encoded items (decoded a batch at a time on the device) differ in length: the loader keeps them listed
        return (pair if self.decode_on is not None else torch.stack(pair)), labels, readable

    def why_unreadable(self, index: int) -> str:
        return self.images.why_unreadable(index)

    def item_shards(self) -> np.ndarray | None:
        return self.images.item_shards()

    @property
    def decode_on(self) -> torch.device | None:
        return self.images.decode_on

    def decode_batch(self, items: list[torch.Tensor], ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.decode_batch(items, ok)
