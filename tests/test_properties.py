"""Property-based tests (hypothesis) of the label readers, the HU conversion and the CT windowing.

Random label tables are written in each dataset's on-disk format and read back with MIRL's readers,
then compared with the table they were made from; errors planted at random rows must be reported at
the row a user counts (header = row 1, blank lines included). HU and windows are compared with
pydicom's modality LUT and with piecewise-linear interpolation.
"""
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian

from mirl.datasets import RSNA_CLASSES, read_label_csv, read_rsna_labels
from mirl.errors import DataError
from mirl.imaging import hounsfield_units, window_ct, windowed_channels

FAST = settings(max_examples=60, deadline=None)


def file_rows(blanks_before: list[int]) -> list[int]:
    """The row (header = 1) of each data row when data row i follows `blanks_before[i]` blank lines."""
    return list(1 + np.cumsum(np.asarray(blanks_before, dtype=int) + 1))


def write_csv(path: Path, header: str, rows: list[str], blanks_before: list[int]) -> Path:
    lines = [header]
    for row, blanks in zip(rows, blanks_before):
        lines += [""] * blanks + [row]
    path.write_text("\n".join(lines) + "\n")
    return path


def blank_lines(n: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, 2), min_size=n, max_size=n)


def error_of(read: Callable[..., object], *args: object) -> str:
    """The message of the DataError that `read(*args)` must raise."""
    with pytest.raises(DataError) as caught:
        read(*args)
    return str(caught.value)


# ---------------------------------------------------------------- RSNA's long CSV

@st.composite
def rsna_tables(draw: st.DrawFn) -> tuple[dict[str, list[int]], list[tuple[str, int]]]:
    """Labels per image, and the CSV's (ID, Label) rows: one per image and class, some repeated, shuffled."""
    # underscores inside ids check that only the class suffix is cut off
    images = draw(st.lists(st.text("0123456789abcdef_", min_size=1, max_size=8).map(lambda s: f"ID_{s}"),
                           min_size=1, max_size=6, unique=True))
    labels = {image: draw(st.lists(st.integers(0, 1), min_size=6, max_size=6)) for image in images}
    rows = [(f"{image}_{name}", value) for image, values in labels.items() for name, value in zip(RSNA_CLASSES, values)]
    repeats = draw(st.lists(st.sampled_from(rows), max_size=5))
    return labels, draw(st.permutations(rows + repeats))


def read_rsna_rows(rows: list[tuple[str, object]], blanks: list[int]) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as folder:
        return read_rsna_labels(write_csv(Path(folder) / "stage_2_train.csv", "ID,Label",
                                          [f"{i},{v}" for i, v in rows], blanks))


@FAST
@given(rsna_tables(), st.data())
def test_rsna_csv_reads_back_the_table_it_was_written_from(table, data):
    labels, rows = table
    read = read_rsna_rows(rows, data.draw(blank_lines(len(rows))))
    ids = sorted(labels)
    expected = pd.DataFrame(np.array([labels[i] for i in ids], dtype=np.float32),
                            index=pd.Index(ids, name="image_id"), columns=list(RSNA_CLASSES))
    pd.testing.assert_frame_equal(read, expected)


@FAST
@given(rsna_tables(), st.randoms())
def test_rsna_csv_reading_is_independent_of_row_order(table, random):
    _, rows = table
    shuffled = random.sample(rows, len(rows))
    pd.testing.assert_frame_equal(read_rsna_rows(rows, [0] * len(rows)), read_rsna_rows(shuffled, [0] * len(rows)))


@FAST
@given(rsna_tables(), st.data(), st.sampled_from(["2", "-1", "yes", "", "0.5", "NA"]))
def test_rsna_bad_label_is_found_at_its_row(table, data, bad):
    _, rows = table
    at = data.draw(st.integers(0, len(rows) - 1))
    rows = rows[:at] + [(rows[at][0], bad)] + rows[at + 1:]
    blanks = data.draw(blank_lines(len(rows)))
    message = error_of(read_rsna_rows, rows, blanks)
    assert f"row {file_rows(blanks)[at]}: Label {bad or '(empty)'} is not 0 or 1" in message


@FAST
@given(rsna_tables(), st.data())
def test_rsna_disagreeing_duplicate_is_found_at_both_rows(table, data):
    _, rows = table
    copied = data.draw(st.sampled_from(rows))
    at = data.draw(st.integers(0, len(rows)))
    rows = rows[:at] + [(copied[0], 1 - copied[1])] + rows[at:]
    blanks = data.draw(blank_lines(len(rows)))
    message = error_of(read_rsna_rows, rows, blanks)
    # the rows to name, found by a scan: the first row whose label differs from the first row of its ID
    first = {}
    for position, (image_class, value) in enumerate(rows):
        earlier = first.setdefault(image_class, position)
        if value != rows[earlier][1]:
            break
    where = file_rows(blanks)
    assert (f"row {where[position]}: {image_class} appears with different labels: {value} here, "
            f"{rows[earlier][1]} in row {where[earlier]}") in message


@FAST
@given(rsna_tables(), st.data())
def test_rsna_missing_class_row_is_found_at_the_images_first_row(table, data):
    labels, rows = table
    image = data.draw(st.sampled_from(sorted(labels)))
    absent = data.draw(st.sampled_from(RSNA_CLASSES))
    rows = [row for row in rows if row[0] != f"{image}_{absent}"]
    blanks = data.draw(blank_lines(len(rows)))
    message = error_of(read_rsna_rows, rows, blanks)
    first = next(p for p, (image_class, _) in enumerate(rows) if image_class.rsplit("_", 1)[0] == image)
    assert f"row {file_rows(blanks)[first]}: image {image} lacks a label for {absent};" in message


# ---------------------------------------------------------------- ISIC-shaped CSVs (ISIC and --labels)

# words pandas reads as missing by default must stay names
names = st.one_of(st.sampled_from(["NA", "None", "nan", "NaN", "null", "NULL"]),
                  st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=8))


@st.composite
def label_tables(draw: st.DrawFn) -> tuple[list[str], dict[str, tuple[int, ...]], list[str], list[str]]:
    """Classes, labels per image, each image's file suffix, and the CSV's data rows: one per image, some
    repeated (with 1/0 or 1.0/0.0 written independently), shuffled."""
    classes = draw(st.lists(names.filter(lambda name: name != "image"), min_size=2, max_size=4, unique=True))
    images = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    labels = {image: tuple(draw(st.lists(st.integers(0, 1), min_size=len(classes), max_size=len(classes))))
              for image in images}
    suffixes = draw(st.lists(st.sampled_from([".png", ".jpg", ".jpeg", ".dcm"]), min_size=len(images),
                             max_size=len(images)))
    listed = images + draw(st.lists(st.sampled_from(images), max_size=4))
    rows = [",".join([image, *(draw(st.sampled_from([str(v), f"{v}.0"])) for v in labels[image])])
            for image in draw(st.permutations(listed))]
    return classes, labels, suffixes, rows


def read_table(classes: list[str], suffixes: list[str], labels: dict, rows: list[str], blanks: list[int],
               without_file: str | None = None):
    """Write the images (empty files: listing does not decode them, the nested folder is searched) and the
    CSV, then read them back."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "nested").mkdir()
        for image, suffix in zip(labels, suffixes):
            if image != without_file:
                (root / "nested" / f"{image}{suffix}").touch()
        csv = write_csv(root / "labels.csv", ",".join(["image", *classes]), rows, blanks)
        return read_label_csv(csv, root)


@FAST
@given(label_tables(), st.data())
def test_label_csv_reads_back_the_table_it_was_written_from(table, data):
    classes, labels, suffixes, rows = table
    records, read_classes, multilabel = read_table(classes, suffixes, labels, rows, data.draw(blank_lines(len(rows))))
    assert read_classes == tuple(classes)
    order = list(dict.fromkeys(row.split(",")[0] for row in rows))  # images in order of first appearance
    assert [r.image_id for r in records] == order
    for record in records:
        np.testing.assert_array_equal(record.labels, labels[record.image_id])
        assert record.path.name == record.image_id + suffixes[list(labels).index(record.image_id)]
    assert multilabel == any(sum(values) != 1 for values in labels.values())


@FAST
@given(label_tables(), st.randoms())
def test_label_csv_reading_is_independent_of_row_order(table, random):
    classes, labels, suffixes, rows = table
    shuffled = random.sample(rows, len(rows))
    by_image = [{r.image_id: tuple(r.labels) for r in read_table(classes, suffixes, labels, order, [0] * len(rows))[0]}
                for order in (rows, shuffled)]
    assert by_image[0] == by_image[1]


@FAST
@given(label_tables(), st.data(), st.sampled_from(["2", "-1", "yes", "", "0.5", "NA"]))
def test_label_csv_bad_value_is_found_at_its_row_and_column(table, data, bad):
    classes, labels, suffixes, rows = table
    at = data.draw(st.integers(0, len(rows) - 1))
    column = data.draw(st.integers(1, len(classes)))
    cells = rows[at].split(",")
    rows = rows[:at] + [",".join(cells[:column] + [bad] + cells[column + 1:])] + rows[at + 1:]
    blanks = data.draw(blank_lines(len(rows)))
    message = error_of(read_table, classes, suffixes, labels, rows, blanks)
    shown = repr(bad) if bad else "empty"
    assert f"row {file_rows(blanks)[at]}: column {classes[column - 1]} is {shown}, not 0 or 1" in message


@FAST
@given(label_tables(), st.data())
def test_label_csv_disagreeing_duplicate_is_found_at_both_rows(table, data):
    classes, labels, suffixes, rows = table
    image = data.draw(st.sampled_from(sorted(labels)))
    column = data.draw(st.integers(0, len(classes) - 1))
    flipped = list(labels[image])
    flipped[column] = 1 - flipped[column]
    at = data.draw(st.integers(0, len(rows)))
    rows = rows[:at] + [",".join([image, *map(str, flipped)])] + rows[at:]
    blanks = data.draw(blank_lines(len(rows)))
    message = error_of(read_table, classes, suffixes, labels, rows, blanks)
    # the rows to name, found by a scan: the image's first row and the first one with other values
    mine = [(p, [float(v) for v in row.split(",")[1:]]) for p, row in enumerate(rows) if row.split(",")[0] == image]
    first, later = mine[0][0], next(p for p, values in mine if values != mine[0][1])
    where = file_rows(blanks)
    assert f"row {where[later]}: image {image} appears with other labels than in row {where[first]}" in message


@FAST
@given(label_tables(), st.data())
def test_label_csv_image_without_file_is_found_at_its_first_row(table, data):
    classes, labels, suffixes, rows = table
    image = data.draw(st.sampled_from(sorted(labels)))
    blanks = data.draw(blank_lines(len(rows)))
    message = error_of(read_table, classes, suffixes, labels, rows, blanks, image)
    first = [row.split(",")[0] for row in rows].index(image)
    assert f"row {file_rows(blanks)[first]}: image {image} has no PNG, JPEG or DICOM file" in message


# ---------------------------------------------------------------- HU conversion

@st.composite
def ct_slices(draw: st.DrawFn) -> tuple[Dataset, np.ndarray]:
    """An in-memory CT DICOM with random stored pixels, bit depth, signedness, slope and intercept."""
    bits, signed = draw(st.sampled_from([(16, True), (16, False), (12, True), (12, False)]))
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    # at least 2 x 2: the reader refuses a one-pixel image as having no content
    stored = draw(arrays(np.int16 if signed else np.uint16, st.tuples(st.integers(2, 6), st.integers(2, 6)),
                         elements=st.integers(low, high)))
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    # DICOM's decimal strings hold 16 characters, so slopes and intercepts are short decimals
    ds.RescaleSlope = draw(st.integers(1, 4000)) / 1000
    ds.RescaleIntercept = draw(st.integers(-40000, 40000)) / 10
    ds.PixelData = stored.tobytes()
    return ds, stored


def is_broken_rsna_header(ds: Dataset) -> bool:
    return ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100


@FAST
@given(ct_slices())
def test_hu_is_stored_times_slope_plus_intercept(slice_and_pixels):
    ds, stored = slice_and_pixels
    assume(not is_broken_rsna_header(ds))
    hu = hounsfield_units(ds)
    by_hand = stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    scale = np.abs(by_hand).max() + 1
    np.testing.assert_allclose(hu, by_hand, rtol=0, atol=1e-6 * scale)  # float32 arithmetic
    np.testing.assert_allclose(hu, apply_modality_lut(ds.pixel_array, ds), rtol=0, atol=1e-6 * scale)


@FAST
@given(arrays(np.int32, st.tuples(st.integers(2, 6), st.integers(2, 6)), elements=st.integers(-1000, 3095)),
       st.integers(-99, 4000))
def test_broken_rsna_header_gives_back_the_true_hu(true_hu, claimed_intercept):
    """RSNA's broken slices store HU modulo 4096 as 12-bit unsigned pixels and claim an intercept near 0
    (any above -100); air to 3095 HU, all a head CT holds, comes back exactly."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = true_hu.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, claimed_intercept
    ds.PixelData = np.mod(true_hu, 4096).astype(np.uint16).tobytes()
    np.testing.assert_array_equal(hounsfield_units(ds), true_hu)


# ---------------------------------------------------------------- windowing

hu_images = arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 8)),
                   elements=st.floats(-4000, 4000, width=32))
# whole-HU centres and widths, as DICOM headers and MIRL's windows give them: the window's edges are then
# exact in float32, where the HU arrive
windows = st.tuples(st.integers(-1000, 1000).map(float), st.integers(1, 4000).map(float))


def float32_error(hu: np.ndarray, centre: float, width: float) -> float:
    """A bound on the rounding error of a window computed in float32, as a fraction of the window."""
    return 4 * float(np.finfo(np.float32).eps) * (float(np.abs(hu).max()) + abs(centre) + width) / width


@FAST
@given(hu_images, windows)
def test_window_is_the_ramp_from_the_bottom_to_the_top_of_the_window(hu, window):
    centre, width = window
    low, high = centre - width / 2, centre + width / 2
    out = window_ct(hu, centre, width)
    assert out.shape == hu.shape and ((out >= 0) & (out <= 1)).all()
    ramp = np.interp(hu.astype(np.float64), [low, high], [0.0, 1.0])
    np.testing.assert_allclose(out, ramp, rtol=0, atol=float32_error(hu, centre, width))
    assert (out[hu <= low] == 0).all() and (out[hu >= high] == 1).all()


@FAST
@given(hu_images, windows)
def test_window_never_decreases_as_hu_rises(hu, window):
    values = np.sort(hu.ravel())
    assert (np.diff(window_ct(values, *window)) >= 0).all()


@FAST
@given(hu_images, st.lists(windows, min_size=1, max_size=4))
def test_window_stack_is_each_window_rounded_to_uint8(hu, stack):
    image = windowed_channels(hu, tuple(stack))
    assert image.dtype == np.uint8 and image.shape == hu.shape + (len(stack),)
    for channel, (centre, width) in enumerate(stack):
        np.testing.assert_array_equal(image[..., channel], np.round(255 * window_ct(hu, centre, width)))
        ramp = np.interp(hu.astype(np.float64), [centre - width / 2, centre + width / 2], [0.0, 255.0])
        assert np.abs(image[..., channel] - ramp).max() <= 0.5 + 255 * float32_error(hu, centre, width)
