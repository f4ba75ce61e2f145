"""HU conversion and windowing, checked against pydicom's own CT sample and hand formulas."""
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from mirl.errors import UnreadableImageError
from mirl.imaging import hounsfield_units, read_ct_slice, window_ct, windowed_channels

CT_SMALL = get_testdata_file("CT_small.dcm")


def test_hounsfield_units_match_pydicom_modality_lut():
    ds = pydicom.dcmread(CT_SMALL)
    expected = apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_allclose(hounsfield_units(ds), expected)


def test_broken_rsna_header_is_repaired():
    ds = pydicom.dcmread(CT_SMALL)
    true_hu = apply_modality_lut(ds.pixel_array, ds)
    # write the slice the way the broken RSNA files store it: 12-bit unsigned HU modulo 4096, intercept 0
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleIntercept = 12, 11, 0, 0
    ds.PixelData = np.mod(np.round(true_hu).astype(np.int32), 4096).astype(np.uint16).tobytes()
    in_range = true_hu < 3096  # the repair cannot tell values above 3095 HU from air, and needs not
    np.testing.assert_allclose(hounsfield_units(ds)[in_range], true_hu[in_range])


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(CT_SMALL)
    plain = hounsfield_units(ds)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = hounsfield_units(ds)
    np.testing.assert_allclose(inverted, plain.max() + plain.min() - plain)


def test_window_by_hand():
    hu = np.array([-100.0, 0.0, 20.0, 40.0, 60.0, 80.0, 1000.0])
    # brain window 40/80 spans 0..80 HU
    np.testing.assert_allclose(window_ct(hu, 40, 80), [0, 0, 0.25, 0.5, 0.75, 1, 1])


def test_three_window_stack_of_ct_small():
    ds = pydicom.dcmread(CT_SMALL)
    hu = apply_modality_lut(ds.pixel_array, ds)
    image = windowed_channels(hu)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    for channel, (centre, width) in enumerate([(40, 80), (80, 200), (40, 380)]):
        expected = np.round(np.clip((hu - (centre - width / 2)) / width, 0, 1) * 255)
        np.testing.assert_array_equal(image[..., channel], expected)
    np.testing.assert_array_equal(read_ct_slice(Path(CT_SMALL)), image)


def test_unreadable_files_raise_a_precise_error(tmp_path):
    not_dicom = tmp_path / "ID_bad.dcm"
    not_dicom.write_bytes(b"this is not a DICOM file")
    with pytest.raises(UnreadableImageError, match="ID_bad.dcm"):
        read_ct_slice(not_dicom)
