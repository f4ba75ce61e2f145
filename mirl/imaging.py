"""Turning medical image files into model-ready H x W x 3 uint8 arrays.

CT is read in Hounsfield units and shown to the network through several intensity windows at once,
one per channel, the way radiologists flip between brain and subdural windows. MR and other
grey-scale images, whose intensities have no absolute unit, are normalised per volume instead.
JPEG and PNG are read as RGB.

DICOM files come from scanners, archives and anonymisers of every age, so their readers expect
anything: each file is either decoded correctly or refused with `UnreadableImageError`, whose
message names the file and the reason (never a patient tag), and which a dataset counts as a
skipped image. How each kind of file is decoded:

- Compressed pixel data (JPEG baseline, extended and lossless, JPEG-LS, JPEG 2000, RLE) is decoded
  by pydicom's pixel-data plugins, which the runtime dependencies pylibjpeg, pylibjpeg-libjpeg,
  pylibjpeg-openjpeg and pylibjpeg-rle provide; big-endian and implicit-VR files by pydicom itself.
- Multi-frame files give their middle frame (see `middle_frame`).
- Colour (RGB, YBR_* which pydicom converts to RGB, PALETTE COLOR through its lookup table) is
  returned as RGB uint8 scaled by its bit depth, so colours keep their balance.
- MONOCHROME1 (low values shown white) is inverted, for CT and for other grey images alike.
- CT without RescaleSlope/RescaleIntercept uses slope 1 and intercept 0; enhanced multi-frame CT
  keeps them in its functional groups, where they are looked up. Window tags are never read: CT is
  shown through the fixed `HEMORRHAGE_WINDOWS`.
- Any size of at least two pixels decodes (non-square, odd or 1 x N); `square_uint8` resizes later.

Refused: files that are not DICOM or lack the DICOM preamble, files or pixel data cut short, files
without pixel data or Transfer Syntax UID, pixel data no plugin decodes (corrupt streams, or an
encoding none of them knows), a malformed value in a tag the reader needs, images of fewer than
two pixels, and frames over `MAX_FRAME_BYTES`.
"""
from __future__ import annotations

import hashlib
import logging
import math
import secrets
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, UncompressedTransferSyntaxes

from mirl.errors import UnreadableImageError

# No identifying tag may reach any output, warnings included: pydicom's validation warnings and log
# records quote tag values ("Invalid value for VR UI: '<a StudyInstanceUID>'"). Values are not
# validated on reading, and whatever pydicom still warns or logs is dropped; MIRL's own messages about a
# file name the file and the reason, never a tag's value.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)

# (centre, width) in HU: the standard three-window stack for intracranial hemorrhage.
BRAIN_WINDOW = (40.0, 80.0)
SUBDURAL_WINDOW = (80.0, 200.0)
SOFT_TISSUE_WINDOW = (40.0, 380.0)
HEMORRHAGE_WINDOWS = (BRAIN_WINDOW, SUBDURAL_WINDOW, SOFT_TISSUE_WINDOW)

# The largest frame decoded, checked from the header first: compressed data can claim any size in a
# few bytes, and the decoders allocate the claimed frame before decoding. 256 MiB holds 8192 x 8192
# 16-bit grey or 9000 x 9000 RGB, beyond any single medical image frame that is trained on.
MAX_FRAME_BYTES = 256 * 2 ** 20

PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# The tags pydicom's get_expected_length needs to size uncompressed pixel data.
NATIVE_SIZE_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation")


def read_dicom_dataset(path: Path) -> pydicom.Dataset:
    """The whole dataset of a DICOM file.

    A file without the 128-byte preamble and 'DICM' prefix is refused, as pydicom refuses it by
    default: reading it anyway (`force=True`) would take any bytes at all for a dataset.
    """
    try:
        return pydicom.dcmread(path)
    except Exception as error:  # pydicom raises many types on files that are not DICOM or cut short
        raise UnreadableImageError(f"{path.name}: not a readable DICOM file ({type(error).__name__})") from error


def header_value(ds: pydicom.Dataset, keyword: str, default: Any) -> Any:
    """The value of a tag, `default` when it is absent or empty.

    pydicom parses a value from the file's bytes when it is first used, so a malformed one raises
    here, of whatever type; it becomes UnreadableImageError naming the tag.
    """
    try:
        value = ds.get(keyword)
    except Exception as error:
        raise UnreadableImageError(f"malformed {keyword} ({type(error).__name__})") from error
    return default if value is None or value == "" else value


def header_number(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    """A single finite number from a tag, `default` when it is absent or empty."""
    value = header_value(ds, keyword, default)
    try:
        number = float(value)
    except (TypeError, ValueError) as error:  # TypeError: several values where one was expected
        raise UnreadableImageError(f"malformed {keyword}") from error
    if not math.isfinite(number):
        raise UnreadableImageError(f"malformed {keyword}")
    return number


def middle_frame(ds: pydicom.Dataset) -> int:
    """The frame a multi-frame file is read as: the middle one (0 for a single frame).

    One file is one image to the datasets, so a multi-frame file gives one frame: the middle slice
    of an enhanced CT or MR stack shows the most anatomy, any frame of a cine loop is as good as
    another, and decoding one frame keeps a file of hundreds of frames cheap.
    """
    return max(1, int(header_number(ds, "NumberOfFrames", 1))) // 2


def check_jpeg_complete(ds: pydicom.Dataset, frame: int) -> None:
    """Refuse a JPEG or JPEG-LS frame cut short.

    pylibjpeg-libjpeg decodes such a stream without complaint, making up the missing part. A
    complete stream ends with its end-of-image marker, followed by nothing but JPEG fill bytes (0xFF)
    or the zero byte that pads a DICOM fragment to even length.
    """
    frames = int(header_number(ds, "NumberOfFrames", 1))
    try:
        stream = get_frame(ds.PixelData, frame, number_of_frames=frames)
    except Exception as error:  # pydicom raises several types on malformed encapsulation
        raise UnreadableImageError(f"malformed compressed pixel data ({type(error).__name__})") from error
    if not stream.rstrip(b"\0\xff").endswith(b"\xff\xd9"):
        raise UnreadableImageError("compressed pixel data cut short (no JPEG end marker)")


def check_native_length(ds: pydicom.Dataset) -> None:
    """Refuse uncompressed pixel data shorter than its header says, the commonest damage: a file
    cut short. pydicom refuses it too, but with a ValueError like many others."""
    # header_value also parses each value, so that get_expected_length meets none it cannot parse
    if any(header_value(ds, keyword, None) is None for keyword in ("PixelData", *NATIVE_SIZE_KEYWORDS)):
        return  # float pixel data, or a header pydicom refuses with its own reason
    expected, actual = get_expected_length(ds), len(ds.PixelData)
    if actual < expected:
        raise UnreadableImageError(f"pixel data cut short ({actual} of {expected} bytes)")


def decode_frame(ds: pydicom.Dataset, frame: int) -> np.ndarray:
    """One frame's pixels: rows x columns, or rows x columns x samples for colour (YBR as RGB).

    The header is checked before decoding, both to refuse what cannot be decoded with a plain
    reason and to keep a hostile header from making a decoder allocate gigabytes.
    """
    if not any(keyword in ds for keyword in PIXEL_DATA_KEYWORDS):
        raise UnreadableImageError("no pixel data")
    rows, columns = int(header_number(ds, "Rows", 0)), int(header_number(ds, "Columns", 0))
    if rows * columns < 2:
        raise UnreadableImageError(f"a {rows} x {columns} image has no content")
    samples, bits = header_number(ds, "SamplesPerPixel", 1), header_number(ds, "BitsAllocated", 8)
    if rows * columns * samples * bits / 8 > MAX_FRAME_BYTES:
        raise UnreadableImageError(f"a {rows} x {columns} frame is larger than {MAX_FRAME_BYTES >> 20} MiB")
    transfer_syntax = header_value(getattr(ds, "file_meta", pydicom.Dataset()), "TransferSyntaxUID", None)
    if transfer_syntax is None:
        raise UnreadableImageError("no Transfer Syntax UID, so the pixel encoding is unknown")
    if transfer_syntax in JPEGTransferSyntaxes + JPEGLSTransferSyntaxes:
        check_jpeg_complete(ds, frame)
    elif transfer_syntax in UncompressedTransferSyntaxes:
        check_native_length(ds)
    try:
        return pixel_array(ds, index=frame)
    except (KeyboardInterrupt, SystemExit):
        raise
    # pydicom and its plugins raise many types on data they cannot decode, and pylibjpeg-rle's Rust
    # decoder panics on some malformed RLE: a PanicException, which derives from BaseException only
    except BaseException as error:
        raise UnreadableImageError(f"undecodable pixel data ({type(error).__name__})") from error


def ct_rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float]:
    """(slope, intercept) taking a CT frame's pixels to HU, (1, 0) where the file has none.

    Enhanced multi-frame CT keeps them not at the top level but in the frame's own or the shared
    functional group.
    """
    sources = [ds]
    for keyword, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = header_value(ds, keyword, None)
        # a sequence stored under a wrong VR reads as bytes, not items
        if isinstance(groups, Sequence) and len(groups) > index:
            transformations = header_value(groups[index], "PixelValueTransformationSequence", None)
            if isinstance(transformations, Sequence) and transformations:
                sources.append(transformations[0])
    for source in sources:
        if "RescaleSlope" in source or "RescaleIntercept" in source:
            return header_number(source, "RescaleSlope", 1.0), header_number(source, "RescaleIntercept", 0.0)
    return 1.0, 0.0


def hounsfield_units(ds: pydicom.Dataset) -> np.ndarray:
    """Pixel data of a CT slice (the middle frame of a multi-frame file) in HU.

    Repairs the known broken RSNA headers: some slices store 12-bit unsigned pixels whose intercept
    claims to be near 0, their values being HU wrapped modulo 4096. Shifting by +1000, unwrapping
    and using intercept -1000 restores them.

    MONOCHROME1 CT is mirrored within its own range: such files store values inverted for display,
    and the mirror gives back the slice a MONOCHROME2 file of the same values would show.
    """
    frame = middle_frame(ds)
    pixels = decode_frame(ds, frame)
    if pixels.ndim != 2:
        raise UnreadableImageError(f"expected a grey CT frame, got pixel shape {pixels.shape}")
    pixels = pixels.astype(np.float32)
    slope, intercept = ct_rescale(ds, frame)
    if not (np.isfinite(slope) and slope != 0 and np.isfinite(intercept)):
        # every pixel would be the intercept: a black (or NaN) slice that trains as if it were anatomy
        raise UnreadableImageError(f"unusable RescaleSlope {slope:g} / RescaleIntercept {intercept:g}")
    broken_header = (
        header_number(ds, "BitsStored", 16) == 12
        and header_number(ds, "PixelRepresentation", 1) == 0
        and intercept > -100
    )
    if broken_header:
        pixels = pixels + 1000.0
        pixels[pixels >= 4096] -= 4096
        intercept = -1000.0
    hu = pixels * slope + intercept
    if header_value(ds, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        hu = hu.max() + hu.min() - hu
    return hu


def window_ct(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Map HU to [0, 1]: values below centre - width/2 are 0, above centre + width/2 are 1."""
    low = centre - width / 2.0
    return np.clip((hu - low) / width, 0.0, 1.0)


def windowed_channels(hu: np.ndarray, windows: tuple[tuple[float, float], ...] = HEMORRHAGE_WINDOWS) -> np.ndarray:
    """Stack one windowed copy of the slice per window: an H x W x len(windows) uint8 array."""
    if not np.isfinite(hu).any():
        raise UnreadableImageError("no finite pixel value")
    hu = np.nan_to_num(hu, nan=-1000.0)  # a missing value shows as air, not as a random grey
    stacked = np.stack([window_ct(hu, c, w) for c, w in windows], axis=-1)
    return np.round(stacked * 255.0).astype(np.uint8)


# Patient identity is only ever held as a hash salted per process: it groups slices, and can be
# neither printed back nor matched against another run's output.
_PATIENT_SALT = secrets.token_bytes(16)


def salted_hash(identifier: str) -> str:
    """A short, per-process salted hash of an identifier (a patient id) for grouping."""
    return hashlib.sha256(_PATIENT_SALT + identifier.encode()).hexdigest()[:16]


# The tags that tie a slice to its patient, most specific first: without PatientID, the study; without
# that, the series (all slices of one series are one patient's), rather than every slice on its own.
PATIENT_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")


def dicom_patient_group(path: Path) -> str | None:
    """The salted hash of a DICOM's first present tag of `PATIENT_TAGS`, read without pixels; None when
    the file has none of them."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(PATIENT_TAGS))
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a readable DICOM file ({type(error).__name__})") from error
    try:
        identifier = next((str(value) for value in (header_value(ds, tag, "") for tag in PATIENT_TAGS) if value),
                          None)
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path.name}: {error}") from error
    return None if identifier is None else salted_hash(identifier)


def dicom_series_position(path: Path) -> tuple[str | None, float]:
    """The salted hash of a DICOM's SeriesInstanceUID (None without one) and the slice's place in its series
    (ImagePositionPatient's z, else SliceLocation, else InstanceNumber, else 0), read without pixels."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SeriesInstanceUID", "ImagePositionPatient", "SliceLocation",
                                            "InstanceNumber"])
        series = header_value(ds, "SeriesInstanceUID", "")
        position = header_value(ds, "ImagePositionPatient", None)
        place = float(position[2]) if position is not None and len(position) == 3 else \
            header_number(ds, "SliceLocation", header_number(ds, "InstanceNumber", 0.0))
    except Exception:  # an unreadable header: the slice has no series, and pairs with itself
        return None, 0.0
    return (salted_hash(str(series)) if series else None), place


def is_grey_ct(ds: pydicom.Dataset) -> bool:
    """Whether a dataset is CT to read in HU; a colour 'CT' is a screenshot, shown as its colours."""
    return header_value(ds, "Modality", "") == "CT" and header_number(ds, "SamplesPerPixel", 1) == 1


def read_ct_slice(path: Path) -> np.ndarray:
    """Decode one CT DICOM (its middle frame when multi-frame) into the three-window uint8 image (H x W x 3)."""
    ds = read_dicom_dataset(path)
    try:
        return windowed_channels(hounsfield_units(ds))
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path.name}: {error}") from error


NIFTI_SUFFIXES = (".nii", ".nii.gz")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")


def image_suffix(path: Path) -> str:
    """The lower-case file type suffix, `.nii.gz` counted as one."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def percentile_uint8(values: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.0) -> np.ndarray:
    """Scale intensities to uint8 between two percentiles of `values` (MR has no absolute unit).

    The percentiles come from the finite values only; NaN and -inf show as the low end, +inf as the high
    end (one NaN voxel would otherwise turn every percentile, and so the whole volume, into NaN)."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        raise UnreadableImageError("no finite pixel value")
    low, high = np.percentile(values if finite.all() else values[finite], [low_percentile, high_percentile])
    if not finite.all():
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = np.clip((values - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def three_channels(grey: np.ndarray) -> np.ndarray:
    """H x W grey to H x W x 3, the input torchvision encoders expect."""
    return np.repeat(grey[..., None], 3, axis=-1)


# PIL modes of grey images deeper than 8 bits (16-bit PNG and TIFF, 32-bit integer or float TIFF)
DEEP_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def read_photo(path: Path) -> np.ndarray:
    """A JPEG, PNG or TIFF as an RGB uint8 array. Grey images deeper than 8 bits (exported X-ray or MR)
    are normalised by their own percentiles like MR, not clipped at 255 as PIL's RGB conversion does."""
    try:
        with Image.open(path) as image:
            if image.mode in DEEP_GREY_MODES:
                return three_channels(percentile_uint8(np.array(image)))
            return np.array(image.convert("RGB"))
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path.name}: {error}") from error
    except Exception as error:
        raise UnreadableImageError(f"{path.name}: not a decodable image ({type(error).__name__})") from error


def colour_uint8(rgb: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of `bits` bits as uint8, scaled by their bit depth rather than stretched per image
    like grey, so that the balance between colours is kept."""
    if rgb.dtype == np.uint8 and bits == 8:
        return rgb
    scaled = np.clip(rgb.astype(np.float32) / float(2 ** bits - 1), 0.0, 1.0)
    return np.round(scaled * 255.0).astype(np.uint8)


def display_image(ds: pydicom.Dataset) -> np.ndarray:
    """A non-CT dataset's middle frame: per-image normalised grey (MONOCHROME1 inverted), or RGB."""
    pixels = decode_frame(ds, middle_frame(ds))
    photometric = header_value(ds, "PhotometricInterpretation", "MONOCHROME2")
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(pixels, ds)
        except Exception as error:  # absent or malformed lookup tables raise several types
            raise UnreadableImageError(f"unusable PALETTE COLOR lookup table ({type(error).__name__})") from error
        return colour_uint8(rgb, 8 * rgb.dtype.itemsize)  # pydicom holds 8-bit entries as uint8, else uint16
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return colour_uint8(pixels, int(header_number(ds, "BitsStored", 8 * pixels.dtype.itemsize)))
    if pixels.ndim != 2:
        raise UnreadableImageError(f"expected a grey or RGB image, got pixel shape {pixels.shape}")
    grey = three_channels(percentile_uint8(pixels))
    return 255 - grey if photometric == "MONOCHROME1" else grey


def read_dicom_image(path: Path) -> np.ndarray:
    """A DICOM as three windows when it is grey CT, else per-image normalised grey or its own RGB.

    The module docstring lists how odd files are decoded and which are refused.
    """
    ds = read_dicom_dataset(path)
    try:
        return windowed_channels(hounsfield_units(ds)) if is_grey_ct(ds) else display_image(ds)
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path.name}: {error}") from error


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
    try:
        return percentile_uint8(volume)
    except UnreadableImageError as error:
        raise UnreadableImageError(f"{path.name}: {error}") from error


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
