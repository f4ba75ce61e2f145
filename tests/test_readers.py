"""The RSNA long label CSV, the ISIC-shaped CSV reader, the NIfTI reader on nibabel's own example files,
ACDC's Info.cfg and the patient vote, against values worked out by hand."""
import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from PIL import Image

from mirl.datasets import (
    ACDC,
    ISIC,
    RSNA_CLASSES,
    decode_record,
    find_images,
    read_info_cfg,
    read_label_csv,
    read_rsna_labels,
)
from mirl.errors import DataError
from mirl.metrics import evaluate, patient_vote_accuracy
from mirl.sample_data import write_rsna


def write_rsna_csv(path, rows):
    path.write_text("ID,Label\n" + "".join(f"{image_id},{label}\n" for image_id, label in rows))
    return path


def rsna_rows(image_id, positives):
    return [(f"{image_id}_{name}", int(name in positives)) for name in RSNA_CLASSES]


def test_rsna_csv_pivots_to_one_row_per_image_in_any_row_order(tmp_path):
    rows = (rsna_rows("ID_b2", {"subdural", "any"}) + rsna_rows("ID_a_1", {"epidural", "any"})
            + rsna_rows("ID_c3", set()))
    rows = rows[::-1] + rows[:2]  # reversed, and two exact repeats as the real file has
    wide = read_rsna_labels(write_rsna_csv(tmp_path / "stage_2_train.csv", rows))
    assert list(wide.index) == ["ID_a_1", "ID_b2", "ID_c3"]  # an underscore inside the id survives
    assert list(wide.columns) == list(RSNA_CLASSES)
    np.testing.assert_array_equal(wide.loc["ID_a_1"], [1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(wide.loc["ID_b2"], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(wide.loc["ID_c3"], [0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("rows,message", [
    (rsna_rows("ID_a", {"any"}) + [("ID_a_any", 0)], "row 8: ID_a_any appears with different labels"),
    (rsna_rows("ID_a", set())[:5], "image ID_a lacks a label"),
    (rsna_rows("ID_a", set()) + [("ID_a_bleed", 0)], "row 8: ID_a_bleed does not end in one of"),
    (rsna_rows("ID_a", set())[:5] + [("ID_a_any", 2)], "row 7: Label 2 is not 0 or 1"),
])
def test_rsna_csv_errors_name_the_row(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        read_rsna_labels(write_rsna_csv(tmp_path / "stage_2_train.csv", rows))


@pytest.fixture
def photos(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / f"{name}.png")
    return tmp_path


@pytest.mark.parametrize("one,zero", [("1.0", "0.0"), ("1", "0")])
def test_label_csv_reads_both_value_styles_and_any_classes(photos, one, zero):
    csv = photos / "labels.csv"
    csv.write_text(f"image,cat,dog\na,{one},{zero}\nb,{zero},{one}\nc,{one},{zero}\n")
    records, classes, multilabel = read_label_csv(csv, photos)
    assert classes == ("cat", "dog") and not multilabel
    assert [r.image_id for r in records] == ["a", "b", "c"]
    np.testing.assert_array_equal(records[1].labels, [0, 1])


def test_rows_with_several_ones_make_it_multilabel(photos):
    csv = photos / "labels.csv"
    csv.write_text("image,x,y,z\na,1,1,0\nb,0,0,1\nc,0,0,0\n")
    assert read_label_csv(csv, photos)[2]


def test_a_value_other_than_0_or_1_names_file_row_and_column(photos):
    csv = photos / "labels.csv"
    csv.write_text("image,cat,dog\na,1,0\nb,0,2\n")
    with pytest.raises(DataError, match=r"labels.csv row 3: column dog is '2'"):
        read_label_csv(csv, photos)


def test_an_image_without_file_names_the_row(photos):
    csv = photos / "labels.csv"
    csv.write_text("image,cat,dog\na,1,0\nmissing_one,0,1\n")
    with pytest.raises(DataError, match="row 3: image missing_one"):
        read_label_csv(csv, photos)


def test_isic_sample_has_lesion_groups_and_no_unk(isic_root):
    records = ISIC.find_labelled(isic_root)
    assert all(r.group and r.group.startswith("BCN_") for r in records)
    assert len({r.group for r in records}) == 24
    assert sum(r.labels[-1] for r in records) == 0  # UNK, as in the real training set
    assert any(r.image_id.endswith("_downsampled") for r in records)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "anatomical.nii"])
def test_nifti_reader_on_nibabel_examples(tmp_path, name):
    source = os.path.join(data_path, name)
    os.symlink(source, tmp_path / name)
    volume = np.asanyarray(nib.load(source).dataobj, dtype=np.float32)
    records = find_images(tmp_path)
    frames = volume.shape[3] if volume.ndim == 4 else 1
    assert len(records) == volume.shape[2] * frames
    record = records[-1]
    z, t = record.index
    low, high = np.percentile(volume, [1, 99])
    plane = volume[:, :, z, t] if volume.ndim == 4 else volume[:, :, z]
    expected = np.round(np.clip((plane - low) / (high - low), 0, 1) * 255)
    image = decode_record(record)
    assert image.shape == plane.shape + (3,)
    np.testing.assert_array_equal(image[..., 0], expected)
    np.testing.assert_array_equal(image[..., 2], expected)


def test_acdc_slices_carry_the_patient_group(acdc_root):
    records = ACDC.find_labelled(acdc_root)
    info = read_info_cfg(acdc_root / "training" / "patient003" / "Info.cfg")
    mine = [r for r in records if r.group == "patient003"]
    assert all(ACDC.classes[int(r.labels.argmax())] == info["Group"] for r in mine)
    slices = nib.load(str(acdc_root / "training" / "patient003" / "patient003_frame01.nii.gz")).shape[2]
    assert len(mine) == 2 * slices  # ED and ES


def test_info_cfg_without_group_is_refused(tmp_path):
    (tmp_path / "Info.cfg").write_text("ED: 1\nES: 12\n")
    with pytest.raises(DataError, match="Info.cfg: Group"):
        read_info_cfg(tmp_path / "Info.cfg")


def test_patient_vote_by_hand():
    classes = ("NOR", "MINF", "DCM")
    truth = np.eye(3)[[0, 0, 0, 2, 2, 1, 1]]
    probability = np.array([
        [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1],   # p1 (NOR): votes NOR, MINF, NOR -> NOR, right
        [0.1, 0.2, 0.7], [0.1, 0.8, 0.1],                    # p2 (DCM): a 1-1 tie; DCM sums 0.8, MINF 1.0 -> wrong
        [0.3, 0.6, 0.1], [0.2, 0.5, 0.3],                    # p3 (MINF): MINF, MINF -> right
    ])
    patients = ["p1", "p1", "p1", "p2", "p2", "p3", "p3"]
    assert patient_vote_accuracy(truth, probability, patients) == pytest.approx(2 / 3)
    metrics = evaluate(truth, probability, classes, multilabel=False, patients=patients)
    assert metrics["patient_accuracy"] == pytest.approx(2 / 3) and metrics["n_patients"] == 3


def test_rsna_sample_data_is_the_same_written_by_several_processes(tmp_path):
    one = write_rsna(tmp_path / "one", patients=4, size=32, seed=5)
    two = write_rsna(tmp_path / "two", patients=4, size=32, seed=5, workers=2)
    files = sorted(p.name for p in (one / "stage_2_train").iterdir())
    assert files and files == sorted(p.name for p in (two / "stage_2_train").iterdir())
    assert all((one / "stage_2_train" / f).read_bytes() == (two / "stage_2_train" / f).read_bytes() for f in files)
    assert (one / "stage_2_train.csv").read_text() == (two / "stage_2_train.csv").read_text()
