"""Volumes from the real formats: a DICOM series assembled from its slices, a NIfTI volume or one frame of a 4-D
cine, read into voxels with their spacing and resampled onto one grid for every volume of a run.

A CT series is held in Hounsfield units, everything else as grey levels normalised by the volume's own 1st and
99th percentiles (0-255), both as int16: the 3-D views (`mirl.volume_views`) window HU on the device, so the
window's level and width can be jittered in HU rather than on an already clipped image.

How a series becomes a volume (`assemble_series`): its slices are ordered by ImagePositionPatient projected on
the slice normal (ImageOrientationPatient's row x column), InstanceNumber where a file has no position. A slice
whose size or orientation differs from most of its series', or that repeats a position, is left out and listed;
a gap (a missing slice) is filled by interpolating between its neighbours at their real positions. A series of
fewer than two slices is no volume: it is skipped and listed like any unreadable image.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from mirl.augment import SOURCE_SCALE
from mirl.errors import UnreadableImageError
from mirl.imaging import (
    SOFT_TISSUE_WINDOW,
    decode_frame,
    header_number,
    header_value,
    hounsfield_units,
    is_grey_ct,
    middle_frame,
    normalised_volume,
    percentile_uint8,
    read_dicom_dataset,
    window_ct,
)

HU_RANGE = (-1024, 3071)  # what a CT volume keeps (12-bit CT's range): air below, metal above
# what a run's volumes hold ("hu": CT in HU; "grey": grey levels 0-255), and outside the scanned field: air, or black
PAD_VALUE = {"hu": HU_RANGE[0], "grey": 0}
GAP_FACTOR = 1.5  # a step between slices this many times the series' usual one is a gap (a missing slice)
ORIENTATION_DIGITS = 3  # orientations equal to this many decimals are one orientation


@dataclass(frozen=True)
class VolumeGeometry:
    """The grid every volume of a run is resampled onto: the network's input `size` (D, H, W) at `voxel_size`
    (z, y, x in mm; None: each volume's whole extent fitted to the size, axis by axis), and what the volumes hold
    (`intensity`). Volumes are delivered at SOURCE_SCALE x the size at 1 / SOURCE_SCALE of the voxel size, so that
    the 3-D views crop them at source resolution, as the 2-D views crop images."""

    size: tuple[int, int, int]
    voxel_size: tuple[float, float, float] | None
    intensity: str

    @property
    def source_shape(self) -> tuple[int, int, int]:
        return tuple(SOURCE_SCALE * s for s in self.size)

    @property
    def source_spacing(self) -> tuple[float, float, float] | None:
        return None if self.voxel_size is None else tuple(v / SOURCE_SCALE for v in self.voxel_size)


@dataclass(frozen=True)
class SliceHeader:
    """What orders one DICOM slice in its series, read without its pixels. `series` is the SeriesInstanceUID as
    the file holds it: kept in memory to group slices, never written or printed."""

    path: Path
    series: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    shape: tuple[int, int]
    instance: float

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        row, column = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        return np.cross(row, column)

    def place(self, normal: np.ndarray | None) -> float:
        """Where the slice lies along `normal` (mm); its InstanceNumber when the file gives no position."""
        if self.position is None or normal is None:
            return self.instance
        return float(np.dot(np.array(self.position), normal))


SLICE_TAGS = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns",
              "InstanceNumber"]


def read_slice_header(path: Path) -> SliceHeader:
    """The ordering tags of one DICOM slice; a file whose header cannot be read is an `UnreadableImageError`."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=SLICE_TAGS)
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a readable DICOM file ({type(error).__name__})") from None
    return slice_header(ds, path)


def slice_header(ds: pydicom.Dataset, path: Path) -> SliceHeader:
    """The ordering tags of a read DICOM dataset."""
    try:
        position = header_value(ds, "ImagePositionPatient", None)
        orientation = header_value(ds, "ImageOrientationPatient", None)
        return SliceHeader(
            path, str(header_value(ds, "SeriesInstanceUID", "")),
            tuple(float(v) for v in position) if position is not None and len(position) == 3 else None,
            tuple(round(float(v), ORIENTATION_DIGITS) for v in orientation)
            if orientation is not None and len(orientation) == 6 else None,
            (int(header_number(ds, "Rows", 0)), int(header_number(ds, "Columns", 0))),
            header_number(ds, "InstanceNumber", 0.0))
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path.name}: {error}") from None
    except (TypeError, ValueError) as error:
        raise UnreadableImageError(f"{path.name}: malformed position or orientation ({type(error).__name__})") \
            from None


def assemble_series(headers: list[SliceHeader]) -> tuple[list[SliceHeader], list[tuple[Path, str]]]:
    """One series' slices in order along its normal, and what is listed about them: the slices left out with
    why (a size or an orientation other than most of the series', the first such slice in path order deciding
    a tie, or a position another slice already holds), and each slice that follows a gap (read, the gap filled
    by interpolation)."""
    headers = sorted(headers, key=lambda h: h.path)
    shape = Counter(h.shape for h in headers).most_common(1)[0][0]
    orientation = Counter(h.orientation for h in headers).most_common(1)[0][0]
    left_out, kept = [], []
    for header in headers:
        if header.shape != shape:
            left_out.append((header.path, f"size {header.shape[0]}x{header.shape[1]} differs from its series' "
                                          f"{shape[0]}x{shape[1]}"))
        elif header.orientation != orientation:
            left_out.append((header.path, "orientation differs from its series'"))
        else:
            kept.append(header)
    normal = kept[0].normal
    kept.sort(key=lambda h: (h.place(normal), h.path))
    ordered: list[SliceHeader] = []
    for header in kept:
        if ordered and math.isclose(header.place(normal), ordered[-1].place(normal), abs_tol=1e-3):
            left_out.append((header.path, f"repeats the position of {ordered[-1].path.name}"))
        else:
            ordered.append(header)
    for after, step, usual in slice_gaps(np.array([h.place(normal) for h in ordered])):
        left_out.append((ordered[after].path, f"follows a gap of {step:.1f} mm where the series steps {usual:.1f} mm "
                                              f"(about {round(step / usual) - 1} slices missing, interpolated)"))
    return ordered, left_out


def slice_gaps(places: np.ndarray) -> list[tuple[int, float, float]]:
    """The gaps between slices at `places` (ordered): (index of the slice after it, its step, the usual step) of
    each step more than GAP_FACTOR x the median one."""
    steps = np.diff(places)
    if len(steps) < 2:
        return []
    usual = float(np.median(steps))
    return [(i + 1, float(step), usual) for i, step in enumerate(steps) if step > GAP_FACTOR * usual]


def read_dicom_series(paths: tuple[Path, ...], intensity: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxels (D x H x W, float32, along the slice normal) and spacing (z, y, x in mm) of a series' slices
    as listed; gaps are filled by interpolation between the slices around them."""
    if len(paths) < 2:
        raise UnreadableImageError(f"{paths[0].name}: its series has {len(paths)} usable slice; a volume needs two")
    planes, places = [], []
    normal, pixel_spacing, ct = None, (1.0, 1.0), True
    for path in paths:
        ds = read_dicom_dataset(path)
        header = slice_header(ds, path)
        normal = header.normal if normal is None else normal
        places.append(header.place(normal))
        spacing = header_value(ds, "PixelSpacing", None)
        if spacing is not None and len(spacing) == 2:
            pixel_spacing = (float(spacing[0]), float(spacing[1]))
        slice_is_ct = is_grey_ct(ds)
        ct = ct and slice_is_ct
        try:
            plane = hounsfield_units(ds) if slice_is_ct else decode_frame(ds, middle_frame(ds)).astype(np.float32)
        except UnreadableImageError as error:
            raise UnreadableImageError(f"{path.name}: {error}") from None
        if plane.ndim != 2:
            raise UnreadableImageError(f"{path.name}: expected a grey slice, got pixel shape {plane.shape}")
        planes.append(plane)
    if len({p.shape for p in planes}) > 1:
        raise UnreadableImageError(f"{paths[0].name}: the series' slices changed size since they were listed")
    places_array = np.array(places, dtype=np.float64)
    if not np.all(np.diff(places_array) > 0):
        raise UnreadableImageError(f"{paths[0].name}: the series' slice positions changed since they were listed")
    volume = np.stack(planes)
    step = float(np.median(np.diff(places_array)))
    if slice_gaps(places_array):
        volume = fill_gaps(volume, places_array, step)
    values = volume_values(volume, ct, intensity)
    return values, (step, *pixel_spacing)


def fill_gaps(volume: np.ndarray, places: np.ndarray, step: float) -> np.ndarray:
    """The volume on a regular grid of `step` from its first slice to its last, each plane interpolated linearly
    between the two real slices around it."""
    count = int(round((places[-1] - places[0]) / step)) + 1
    grid = places[0] + step * np.arange(count)
    above = np.clip(np.searchsorted(places, grid, side="right"), 1, len(places) - 1)
    below = above - 1
    weight = ((grid - places[below]) / (places[above] - places[below])).clip(0, 1).astype(np.float32)
    return volume[below] * (1 - weight)[:, None, None] + volume[above] * weight[:, None, None]


def volume_values(volume: np.ndarray, ct: bool, intensity: str) -> np.ndarray:
    """Voxels as a run of `intensity` holds them: HU clamped to HU_RANGE (a CT volume), or grey levels 0-255 by
    the volume's own percentiles; a CT volume in a grey run is shown through the wide soft-tissue window."""
    if intensity == "hu":
        if not ct:
            raise UnreadableImageError("not a grey CT volume, and this run's volumes are CT in HU")
        if not np.isfinite(volume).any():
            raise UnreadableImageError("no finite voxel value")
        return np.clip(np.nan_to_num(volume, nan=HU_RANGE[0]), *HU_RANGE).astype(np.float32)
    if ct:
        if not np.isfinite(volume).any():
            raise UnreadableImageError("no finite voxel value")
        return window_ct(np.nan_to_num(volume, nan=HU_RANGE[0]), *SOFT_TISSUE_WINDOW).astype(np.float32) * 255
    return percentile_uint8(volume).astype(np.float32)


def read_nifti_volume(path: Path, frame: int | None, intensity: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume (or frame `frame` of a 4-D one) as D x H x W voxels with their spacing (z, y, x in mm);
    the array's third axis is the slice axis, as the 2-D reader takes it. Values are HU in a CT run; grey
    levels are the 2-D reader's (`normalised_volume`: the file's own percentiles, every frame of a cine alike,
    decoded once per process for all its frames)."""
    try:
        image = nib.load(str(path))
        shape, zooms = image.shape, image.header.get_zooms()
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a readable NIfTI volume ({type(error).__name__})") from None
    if len(shape) == 4 and frame is None:
        raise UnreadableImageError(f"{path.name}: has 4 dimensions {tuple(shape)} where a 3-D volume is expected")
    if len(shape) not in (3, 4) or (len(shape) == 4 and not 0 <= frame < shape[3]):
        raise UnreadableImageError(f"{path.name}: expected a 3-D volume, got shape {tuple(shape)}")
    if min(shape[:3]) < 2:
        raise UnreadableImageError(f"{path.name}: a volume of shape {tuple(shape)} has fewer than 2 voxels on an axis")
    spacing = tuple(float(z) if z > 0 else 1.0 for z in (zooms[2], zooms[0], zooms[1]))
    if intensity == "grey":
        grey = normalised_volume(path)
        volume = grey[..., frame] if len(shape) == 4 else grey
        return volume.transpose(2, 0, 1).astype(np.float32), spacing
    try:
        volume = np.asarray(image.dataobj[..., frame] if len(shape) == 4 else image.dataobj, dtype=np.float32)
        return volume_values(volume.transpose(2, 0, 1), True, intensity), spacing
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path.name}: {error}") from None
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: its voxels cannot be read ({type(error).__name__})") from None


def resample_volume(values: np.ndarray, spacing: tuple[float, float, float], geometry: VolumeGeometry) -> torch.Tensor:
    """Voxels onto the run's source grid, 1 x D x H x W int16: at the source spacing, centred and cropped or
    padded (with air, or black) to the source shape; or, without a voxel size, the whole volume fitted to it.

    Axes that shrink are averaged over the voxels each output voxel covers (area resampling: no aliasing), axes
    that grow are interpolated linearly."""
    volume = torch.from_numpy(np.ascontiguousarray(values))[None, None]
    target = geometry.source_shape
    if geometry.source_spacing is not None:
        scaled = tuple(max(1, round(n * s / t)) for n, s, t in zip(volume.shape[2:], spacing, geometry.source_spacing))
    else:
        scaled = target
    shrunk = tuple(min(n, s) for n, s in zip(volume.shape[2:], scaled))
    if shrunk != tuple(volume.shape[2:]):
        volume = F.interpolate(volume, size=shrunk, mode="area")
    if scaled != shrunk:
        volume = F.interpolate(volume, size=scaled, mode="trilinear", align_corners=False)
    if scaled != target:
        volume = centre_fit(volume, target, PAD_VALUE[geometry.intensity])
    return volume[0].round_().to(torch.int16)


def centre_fit(volume: torch.Tensor, shape: tuple[int, ...], fill: float) -> torch.Tensor:
    """The centre of `volume` (1 x 1 x ...) cropped or padded with `fill` to `shape`, axis by axis."""
    pads = []
    for axis, size in reversed(list(enumerate(shape, start=2))):
        excess = volume.shape[axis] - size
        if excess > 0:
            volume = volume.narrow(axis, excess // 2, size)
            pads += [0, 0]
        else:
            pads += [-excess // 2, -excess - (-excess // 2)]
    return F.pad(volume, pads, value=fill) if any(pads) else volume
