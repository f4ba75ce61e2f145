"""What every dataset shares: the image record, the dataset description, any folder of images, and the
one torch Dataset that reads pixels of every format."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mirl.augment import source_side
from mirl.errors import DataError, UnreadableImageError
from mirl.imaging import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    PHOTO_SUFFIXES,
    image_suffix,
    nifti_slice_count,
    read_dicom_image,
    read_nifti_slice,
    read_photo,
)


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
    kind = image_kind(record.path)
    if kind == "nifti":
        return read_nifti_slice(record.path, *record.index)
    if kind == "dicom":
        return read_dicom_image(record.path)
    return read_photo(record.path)


def source_key(record: ImageRecord) -> str:
    """How a cache names one source image: its file and, for a volume, the slice and frame; a DICOM series by its
    first file and a digest of all of them."""
    slices = getattr(record, "slices", ())
    if slices:
        return f"{record.path}#series-{hashlib.sha256('|'.join(map(str, slices)).encode()).hexdigest()[:12]}"
    return f"{record.path}#{record.index}" if record.index else str(record.path)


def source_files(record: ImageRecord) -> tuple[Path, ...]:
    """Every file a record's pixels come from."""
    return getattr(record, "slices", ()) or (record.path,)


def image_kind(path: Path) -> str:
    """Which reader `decode_record` gives a file: "nifti", "dicom" or "photo"."""
    suffix = image_suffix(path)
    return "nifti" if suffix in NIFTI_SUFFIXES else "dicom" if suffix in DICOM_SUFFIXES else "photo"


def image_kinds(records: list[ImageRecord]) -> list[str]:
    """The readers a run's images went through (what an exported encoder's preprocessing must repeat)."""
    return sorted({image_kind(r.path) for r in records})


def record_group(record: ImageRecord) -> str:
    """The patient or lesion of a record when its reader knew it, else the image itself."""
    return record.group or record.image_id


@dataclass(frozen=True)
class VolumeFormat:
    """How a dataset reads as volumes (`--dims 3`): its labelled volumes, the volumes pretraining may use
    (None: the labelled ones, or every volume of an unlabelled folder), the default grid (input size in voxels and
    voxel size in mm, None: each volume fitted whole), what its volumes hold ("hu" or "grey", `mirl.volumes`) and the
    modality's recipe family for the 3-D views."""

    find_labelled: Callable[[Path], list[ImageRecord]]
    find_pretraining: Callable[[Path, list[ImageRecord] | None], list[ImageRecord]]
    size: tuple[int, int, int]
    voxel_size: tuple[float, float, float] | None
    intensity: str
    augment: str


@dataclass(frozen=True)
class DatasetDescription:
    """Everything MIRL needs to know about one dataset. `spatial_dims` says whether its records are 2-D images or
    volumes; `in_dims(3)` is the dataset read as volumes, when its `volumes` format says how."""

    name: str
    classes: tuple[str, ...]
    multilabel: bool
    augment: str  # the modality's recipe family (a key of mirl.augment.MODALITY_RECIPES), unless --augment
    find_labelled: Callable[[Path], list[ImageRecord]]
    has_labels: Callable[[Path], bool]
    data_hint: str
    patient_group: Callable[[ImageRecord], str | None] = record_group  # None: the image names no patient
    patient_vote: bool = False  # also report patient-level accuracy from the slices' votes
    find_pretraining: Callable[[Path, list[ImageRecord] | None], list[ImageRecord]] | None = None
    volumes: VolumeFormat | None = None
    spatial_dims: int = 2

    def in_dims(self, dims: int) -> DatasetDescription:
        """The dataset read with `dims` spatial dimensions: itself for 2, its volume format for 3."""
        if dims == self.spatial_dims:
            return self
        if self.volumes is None:
            raise DataError(f"{self.name} holds 2-D images, not volumes; --dims 3 reads RSNA series, ACDC and "
                            "NIfTI or DICOM-series folders")
        return replace(self, find_labelled=self.volumes.find_labelled, augment=self.volumes.augment,
                       find_pretraining=self.volumes.find_pretraining, spatial_dims=3)

    def check_root(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist; {self.data_hint}")

    def pretraining_images(self, root: Path, labelled: list[ImageRecord] | None) -> list[ImageRecord]:
        """Images for pretraining: the labelled set when there is one (its test split is then held
        out), else every image in the folder."""
        if self.find_pretraining is not None:
            return self.find_pretraining(root, labelled)
        return labelled if labelled is not None else find_images(root)


def find_images(root: Path) -> list[ImageRecord]:
    """Every PNG, JPEG, DICOM and NIfTI slice under a folder, unlabelled; ids are relative paths.

    What cannot be listed is not left out silently: a volume whose header cannot be read, or a sub-folder
    that cannot be opened, becomes one record that reads as unreadable, so training skips it and lists it
    with its reason in skipped.csv, as any unreadable image."""
    records, unopened = [], []
    files = []
    for folder, subfolders, names in os.walk(root, onerror=lambda error: unopened.append(Path(error.filename))):
        subfolders.sort()
        files += [Path(folder) / name for name in names]
    for path in sorted([*files, *unopened]):
        suffix = image_suffix(path)
        stem = path.relative_to(root).as_posix()[:-len(suffix)] if suffix else path.relative_to(root).as_posix()
        if path in unopened:
            records.append(ImageRecord(stem, path))  # its reader says why: the folder cannot be opened
        elif suffix in PHOTO_SUFFIXES or suffix in DICOM_SUFFIXES:
            records.append(ImageRecord(stem, path))
        elif suffix in NIFTI_SUFFIXES:
            try:
                slices, frames = nifti_slice_count(path)
            except UnreadableImageError:
                records.append(ImageRecord(f"{stem}_t00_s00", path, index=(0, 0)))  # read, fails, and is listed
                continue
            records += [ImageRecord(f"{stem}_t{t:02d}_s{z:02d}", path, index=(z, t))
                        for t in range(frames) for z in range(slices)]
    return records


def image_files_by_stem(root: Path) -> dict[str, list[Path]]:
    """PNG/JPEG/DICOM files under `root` by file name without suffix: more than one where two sub-folders (or
    two suffixes) hold the same name, which a label CSV naming it cannot tell apart."""
    files: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and image_suffix(path) in PHOTO_SUFFIXES + DICOM_SUFFIXES:
            files.setdefault(path.name[:-len(image_suffix(path))], []).append(path)
    return files


class DecodingDataset(Dataset):
    """Records decoded into tensors (`decode`, by the subclass: images or volumes), with their label vectors;
    an unreadable file yields a blank tensor and `ok=False`, not an error. With a decoded-image `cache`
    (mirl.cache), records are read from its memory map instead of decoded."""

    def __init__(self, records: list[ImageRecord], num_classes: int, cache: DecodedImages | None) -> None:
        self.records = records
        self.num_classes = num_classes
        self.cache = cache
        # cache rows as one array, not per-record objects, so workers share it copy-on-write
        self.cache_rows = np.array([-1 if (row := cache.row(r)) is None else row for r in records]) \
            if cache is not None else None

    def decode(self, record: ImageRecord) -> torch.Tensor:
        raise NotImplementedError

    def blank(self) -> torch.Tensor:
        """What stands for an unreadable record: zeros of the decoded shape and type."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        record = self.records[index]
        labels = torch.zeros(self.num_classes) if record.labels is None else torch.tensor(record.labels)
        if self.cache_rows is not None and self.cache_rows[index] >= 0:
            image, readable = self.cache.read(self.cache_rows[index])
            return image, labels, readable
        try:
            return self.decode(record), labels, True
        except Exception:  # whatever a file does to its reader, one bad file never stops a run
            return self.blank(), labels, False

    def why_unreadable(self, index: int) -> str:
        """The reader's reason for a record that came out unreadable (decoded again: bad files are rare), else
        the cache's (a damaged item of a compressed store)."""
        try:
            self.decode(self.records[index])
        except Exception as error:
            return str(error) or type(error).__name__
        if self.cache_rows is not None and self.cache_rows[index] >= 0:
            return self.cache.why_unreadable(int(self.cache_rows[index]))
        return "unreadable when first read"

    def item_shards(self) -> np.ndarray | None:
        """The store shard each record is read from (-1: decoded from its file), None unless the cache is a
        sharded store: a loader's order then gives each rank whole shards (`mirl.loaders.EpochSampler`)."""
        return None if self.cache is None else self.cache.shard_of(self.cache_rows)

    @property
    def decode_on(self) -> torch.device | None:
        """The device a batch's encoded items decode on (`mirl.shards`), None when items arrive decoded."""
        return None if self.cache is None else self.cache.decode_on

    def decode_batch(self, items: list[torch.Tensor], ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of items read encoded, decoded on `decode_on` (N x C x S x S there) and which of them are ok."""
        return self.cache.decode_batch(items, ok)


class ImageDataset(DecodingDataset):
    """Decodes records into C x S x S uint8 tensors, S = `source_side(image_size)`.

    Images are delivered at twice the network's input side, so the device-side augmentation crops
    them at source resolution (the evaluation view takes their centre).
    """

    def __init__(self, records: list[ImageRecord], image_size: int, num_classes: int,
                 cache: DecodedImages | None = None) -> None:
        super().__init__(records, num_classes, cache)
        self.image_size = image_size
        self.side = source_side(image_size)

    def decode(self, record: ImageRecord) -> torch.Tensor:
        return square_uint8(decode_record(record), self.side)

    def blank(self) -> torch.Tensor:
        return torch.zeros(3, self.side, self.side, dtype=torch.uint8)


class DecodedImages(Protocol):
    """Images decoded once and stored, which an `ImageDataset` reads instead of the files
    (`mirl.cache.DecodedImageCache`, `mirl.shards.ShardedImageStore`)."""

    decode_on: object  # None, or the device a batch of encoded items decodes on

    def row(self, record: ImageRecord) -> int | None:
        """Where the record's image is stored; None when it is not."""

    def read(self, row: int) -> tuple[torch.Tensor, bool]:
        """The stored C x S x S uint8 image (or its encoded bytes, when `decode_on` is a device) and whether its
        source could be read."""

    def shard_of(self, rows: np.ndarray) -> np.ndarray | None:
        """The shard of each row, None when the images are not stored in shards."""

    def why_unreadable(self, row: int) -> str:
        """Why a stored image whose source reads well came out unreadable."""


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
