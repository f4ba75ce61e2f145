"""Turning medical image files into model-ready H x W x 3 uint8 arrays.

CT is read in Hounsfield units and shown to the network through several intensity windows at once,
one per channel, the way radiologists flip between brain and subdural windows. MR and other
grey-scale images, whose intensities have no absolute unit, are normalised per volume instead.
JPEG and PNG are read as RGB.
"""
from __future__ import annotations

import hashlib
import secrets
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from mirl.errors import UnreadableImageError

# (centre, width) in HU: the standard three-window stack for intracranial hemorrhage.
BRAIN_WINDOW = (40.0, 80.0)
SUBDURAL_WINDOW = (80.0, 200.0)
SOFT_TISSUE_WINDOW = (40.0, 380.0)
HEMORRHAGE_WINDOWS = (BRAIN_WINDOW, SUBDURAL_WINDOW, SOFT_TISSUE_WINDOW)


def hounsfield_units(ds: pydicom.Dataset) -> np.ndarray:
    """Pixel data of a CT slice in HU, repairing the known broken RSNA headers.

    Some RSNA slices store 12-bit unsigned pixels whose intercept claims to be near 0: their values
    are HU wrapped modulo 4096. Shifting by +1000, unwrapping and using intercept -1000 restores them.
    """
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises several types for missing or undecodable pixel data
        raise UnreadableImageError(f"no decodable pixel data ({type(error).__name__})") from error
    pixels = pixels.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    broken_header = (
        int(ds.get("BitsStored", 16)) == 12
        and int(ds.get("PixelRepresentation", 1)) == 0
        and intercept > -100
    )
    if broken_header:
        pixels = pixels + 1000.0
        pixels[pixels >= 4096] -= 4096
        intercept = -1000.0
    hu = pixels * slope + intercept
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        hu = hu.max() + hu.min() - hu
    return hu


def window_ct(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Map HU to [0, 1]: values below centre - width/2 are 0, above centre + width/2 are 1."""
    low = centre - width / 2.0
    return np.clip((hu - low) / width, 0.0, 1.0)


def windowed_channels(hu: np.ndarray, windows: tuple[tuple[float, float], ...] = HEMORRHAGE_WINDOWS) -> np.ndarray:
    """Stack one windowed copy of the slice per window: an H x W x len(windows) uint8 array."""
    stacked = np.stack([window_ct(hu, c, w) for c, w in windows], axis=-1)
    return np.round(stacked * 255.0).astype(np.uint8)


# Patient identity is only ever held as a hash salted per process: it groups slices, and can be
# neither printed back nor matched against another run's output.
_PATIENT_SALT = secrets.token_bytes(16)


def salted_hash(identifier: str) -> str:
    """A short, per-process salted hash of an identifier (a patient id) for grouping."""
    return hashlib.sha256(_PATIENT_SALT + identifier.encode()).hexdigest()[:16]


def dicom_patient_group(path: Path) -> str:
    """The salted hash of a DICOM's PatientID (StudyInstanceUID when absent), read without pixels."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a readable DICOM file ({type(error).__name__})") from error
    identifier = str(ds.get("PatientID", "") or ds.get("StudyInstanceUID", "") or path.stem)
    return salted_hash(identifier)


def read_ct_slice(path: Path) -> np.ndarray:
    """Decode one CT DICOM into the three-window uint8 image (H x W x 3)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a readable DICOM file ({type(error).__name__})") from error
    try:
        hu = hounsfield_units(ds)
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path.name}: {error}") from error
    if hu.ndim != 2:
        raise UnreadableImageError(f"{path.name}: expected one 2-D slice, got pixel shape {hu.shape}")
    return windowed_channels(hu)


NIFTI_SUFFIXES = (".nii", ".nii.gz")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
DICOM_SUFFIXES = (".dcm", ".dicom")


def image_suffix(path: Path) -> str:
    """The lower-case file type suffix, `.nii.gz` counted as one."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def percentile_uint8(values: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.0) -> np.ndarray:
    """Scale intensities to uint8 between two percentiles of `values` (MR has no absolute unit)."""
    values = np.asarray(values, dtype=np.float32)
    low, high = np.percentile(values, [low_percentile, high_percentile])
    scaled = np.clip((values - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def three_channels(grey: np.ndarray) -> np.ndarray:
    """H x W grey to H x W x 3, the input torchvision encoders expect."""
    return np.repeat(grey[..., None], 3, axis=-1)


def read_photo(path: Path) -> np.ndarray:
    """A JPEG or PNG as an RGB uint8 array."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a decodable image ({type(error).__name__})") from error


def read_dicom_image(path: Path) -> np.ndarray:
    """A DICOM as three windows when it is CT, else per-image normalised grey (or its own RGB)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a readable DICOM file ({type(error).__name__})") from error
    if ds.get("Modality") == "CT":
        return read_ct_slice(path)
    try:
        pixels = ds.pixel_array
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: no decodable pixel data ({type(error).__name__})") from error
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return pixels if pixels.dtype == np.uint8 else percentile_uint8(pixels)
    if pixels.ndim != 2:
        raise UnreadableImageError(f"{path.name}: expected one 2-D image, got pixel shape {pixels.shape}")
    grey = three_channels(percentile_uint8(pixels))
    return 255 - grey if ds.get("PhotometricInterpretation") == "MONOCHROME1" else grey


@lru_cache(maxsize=8)
def normalised_volume(path: Path) -> np.ndarray:
    """A NIfTI volume (3-D or 4-D) normalised to uint8 by its own 1st and 99th percentiles.

    Cached per process: consecutive slices of one volume are decoded once.
    """
    try:
        volume = np.asanyarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a readable NIfTI volume ({type(error).__name__})") from error
    if volume.ndim not in (3, 4):
        raise UnreadableImageError(f"{path.name}: expected a 3-D or 4-D volume, got shape {volume.shape}")
    return percentile_uint8(volume)


def nifti_slice_count(path: Path) -> tuple[int, int]:
    """(slices, frames) of a NIfTI volume, read from its header only."""
    try:
        shape = nib.load(str(path)).shape
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a readable NIfTI volume ({type(error).__name__})") from error
    return (shape[2] if len(shape) > 2 else 1), (shape[3] if len(shape) > 3 else 1)


def read_nifti_slice(path: Path, slice_index: int, frame: int = 0) -> np.ndarray:
    """One axial slice (of one frame, for 4-D cine) as per-volume normalised grey, H x W x 3."""
    volume = normalised_volume(path)
    plane = volume[:, :, slice_index] if volume.ndim == 3 else volume[:, :, slice_index, frame]
    return three_channels(plane)
