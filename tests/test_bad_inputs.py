"""Bad label CSVs, Info.cfg files and NIfTI frames: each is refused with one line naming the file and the
row (header = row 1, blank lines counted, as a spreadsheet shows them), and the scripts exit with code 2
before any training starts.

Most cases call the readers directly; a representative few go through the scripts' entry points.
"""
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_entry

from mirl.datasets import ACDC, ISIC, RSNA, RSNA_CLASSES, read_info_cfg, read_label_csv, read_rsna_labels
from mirl.errors import DataError

SMALL = ["--device", "cpu", "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--arch", "resnet18",
         "--workers", "0"]


def rsna_lines(image_id: str, positives: set[str] = frozenset()) -> list[str]:
    """The six `ID,Label` lines of one image, in RSNA's class order."""
    return [f"{image_id}_{name},{int(name in positives)}" for name in RSNA_CLASSES]


GOOD_RSNA = ["ID,Label", *rsna_lines("ID_a", {"epidural", "any"}), *rsna_lines("ID_b")]  # rows 1..13


def with_row(lines: list[str], row: int, text: str) -> list[str]:
    """`lines` with row `row` (1-based, header = 1) replaced by `text`."""
    return lines[:row - 1] + [text] + lines[row:]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- RSNA's long label CSV

@pytest.mark.parametrize("lines,message", [
    pytest.param([], r"stage_2_train.csv is empty", id="empty file"),
    pytest.param(["ID,Label"], r"stage_2_train.csv has a header but no label rows", id="header only"),
    pytest.param(["ID,Label", "", ""], r"has a header but no label rows", id="header and blank lines"),
    pytest.param(["Image,Label", *GOOD_RSNA[1:]], r"stage_2_train.csv row 1: expected the columns ID,Label, "
                 r"found Image,Label", id="misnamed column"),
    pytest.param(["ID", *(line.split(",")[0] for line in GOOD_RSNA[1:])], r"row 1: expected the columns ID,Label, "
                 r"found ID$", id="missing Label column"),
    pytest.param(with_row(GOOD_RSNA, 4, "ID_a_intraventricular,2"), r"row 4: Label 2 is not 0 or 1", id="label 2"),
    pytest.param(with_row(GOOD_RSNA, 9, "ID_b_epidural,yes"), r"row 9: Label yes is not 0 or 1", id="label yes"),
    pytest.param(with_row(GOOD_RSNA, 3, "ID_a_intraparenchymal,0.5"), r"row 3: Label 0.5 is not 0 or 1",
                 id="label 0.5"),
    pytest.param(with_row(GOOD_RSNA, 6, "ID_a_subdural,"), r"row 6: Label \(empty\) is not 0 or 1",
                 id="label empty"),
    pytest.param(with_row(GOOD_RSNA, 8, ",0"), r"row 8: the empty ID does not end in one of", id="ID empty"),
    pytest.param(with_row(GOOD_RSNA, 8, "ID_b_bleed,0"), r"row 8: ID_b_bleed does not end in one of",
                 id="unknown subtype"),
    pytest.param([*GOOD_RSNA, "ID_a_epidural,1", "ID_a_any,0"],
                 r"row 15: ID_a_any appears with different labels: 0 here, 1 in row 7", id="duplicates disagree"),
    pytest.param(GOOD_RSNA[:11] + GOOD_RSNA[12:], r"row 8: image ID_b lacks a label for subdural;",
                 id="missing subtype row"),
    pytest.param(with_row(GOOD_RSNA, 10, "ID_b_intraparenchymal,0,1"), r"row 10: 3 values, but the header row has 2 "
                 r"columns", id="extra value"),
    pytest.param(with_row(GOOD_RSNA, 2, "ID_a_epidural,1,1"), r"row 2: 3 values, but the header row has 2 columns",
                 id="extra value in the first row"),
    pytest.param(with_row(GOOD_RSNA, 5, '"ID_a_subarachnoid,0'), r"row 5: a quote opened here is never closed",
                 id="unclosed quote"),
    pytest.param(["ID,Label", "", *GOOD_RSNA[1:4], "", "ID_a_subarachnoid,7"],
                 r"row 7: Label 7 is not 0 or 1", id="blank lines count as rows"),
])
def test_rsna_csv_errors_name_file_and_row(tmp_path, lines, message):
    path = tmp_path / "stage_2_train.csv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError, match=message) as caught:
        read_rsna_labels(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_rsna_csv_that_is_not_utf8_names_file_and_row(tmp_path):
    path = tmp_path / "stage_2_train.csv"
    path.write_bytes("\n".join(GOOD_RSNA).encode() + b"\nID_\xff_any,0\n")
    with pytest.raises(DataError, match=r"stage_2_train.csv row 14: not UTF-8 text"):
        read_rsna_labels(path)


def rsna_root(folder: Path, lines: list[str], images: list[str]) -> Path:
    """An RSNA-shaped folder: the label CSV and (empty: listing does not decode them) DICOM files."""
    (folder / "stage_2_train").mkdir(parents=True)
    for image_id in images:
        (folder / "stage_2_train" / f"{image_id}.dcm").touch()
    write_lines(folder / "stage_2_train.csv", lines)
    return folder


def test_rsna_ids_without_an_image_name_the_first_such_row(tmp_path):
    lines = [*GOOD_RSNA, *rsna_lines("ID_c"), *rsna_lines("ID_0")]  # ID_c from row 14, ID_0 from row 20
    root = rsna_root(tmp_path, lines, ["ID_a", "ID_b"])
    with pytest.raises(DataError, match=r"stage_2_train.csv row 14: image ID_c has no file ID_c.dcm in .*"
                                        r"stage_2_train \(1 more labelled images lack a file too\)"):
        RSNA.find_labelled(root)


def test_rsna_rows_repeated_with_the_same_label_are_read_once(tmp_path):
    root = rsna_root(tmp_path, [*GOOD_RSNA, GOOD_RSNA[1], GOOD_RSNA[12]], ["ID_a", "ID_b"])
    records = RSNA.find_labelled(root)
    assert [r.image_id for r in records] == ["ID_a", "ID_b"]
    np.testing.assert_array_equal(records[0].labels, [1, 0, 0, 0, 0, 1])


# ---------------------------------------------------------------- ISIC-shaped CSVs (ISIC and --labels)

GOOD_TABLE = ["image,cat,dog", "a,1,0", "b,0,1", "c,1,0"]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder with a.png, b.png and c.png (empty: listing only looks at names)."""
    for name in "abc":
        (tmp_path / f"{name}.png").touch()
    return tmp_path


@pytest.mark.parametrize("lines,message", [
    pytest.param([], r"labels.csv is empty", id="empty file"),
    pytest.param(GOOD_TABLE[:1], r"labels.csv has a header but no rows", id="header only"),
    pytest.param(["image,cat", "a,1"], r"labels.csv row 1: needs an image column and at least two class columns, "
                 "found image,cat", id="one class column"),
    pytest.param(["image,cat,cat", "a,1,0"], r"row 1: column cat appears twice", id="repeated class"),
    pytest.param(["image,cat,,dog", "a,1,0,0"], r"row 1: column 3 has no name", id="unnamed column"),
    pytest.param(with_row(GOOD_TABLE, 3, "b,0,2"), r"row 3: column dog is '2', not 0 or 1", id="value 2"),
    pytest.param(with_row(GOOD_TABLE, 4, "c,yes,0"), r"row 4: column cat is 'yes', not 0 or 1", id="value yes"),
    pytest.param(with_row(GOOD_TABLE, 2, "a,1,"), r"row 2: column dog is empty, not 0 or 1", id="value empty"),
    pytest.param(with_row(GOOD_TABLE, 3, ",0,1"), r"row 3: the image name is empty", id="image name empty"),
    pytest.param([*GOOD_TABLE, "b,1,0"], r"row 5: image b appears with other labels than in row 3",
                 id="duplicates disagree"),
    pytest.param(with_row(GOOD_TABLE, 3, "missing_one,0,1"), r"row 3: image missing_one has no PNG, JPEG or DICOM "
                 "file under", id="image without file"),
    pytest.param(with_row(GOOD_TABLE, 4, "c,1,0,1"), r"row 4: 4 values, but the header row has 3 columns",
                 id="extra value"),
    pytest.param(["image,cat,dog", "", "a,1,0", "", "b,0,0.5"], r"row 5: column dog is '0.5'",
                 id="blank lines count as rows"),
])
def test_label_csv_errors_name_file_and_row(photos, lines, message):
    path = photos / "labels.csv"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError, match=message) as caught:
        read_label_csv(path, photos)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_label_csv_that_is_not_utf8_names_file_and_row(photos):
    path = photos / "labels.csv"
    path.write_bytes("image,cat,dog\na,1,0\n".encode() + "\u00e9t\u00e9,0,1\n".encode("latin-1"))  # Excel's Latin-1
    with pytest.raises(DataError, match=r"labels.csv row 3: not UTF-8 text"):
        read_label_csv(path, photos)


def test_label_csv_rows_repeated_with_the_same_labels_are_read_once(photos):
    path = write_lines(photos / "labels.csv", [*GOOD_TABLE, "a,1.0,0.0", "", "c,1,0"])
    records, classes, multilabel = read_label_csv(path, photos)
    assert [r.image_id for r in records] == ["a", "b", "c"] and classes == ("cat", "dog") and not multilabel
    np.testing.assert_array_equal(np.stack([r.labels for r in records]), [[1, 0], [0, 1], [1, 0]])


def isic_root(folder: Path) -> Path:
    """An ISIC-shaped folder with two images of one lesion, ground truth and metadata."""
    header = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"
    write_lines(folder / "ISIC_2019_Training_GroundTruth.csv",
                [header, "ISIC_1,1,0,0,0,0,0,0,0,0", "ISIC_2,1,0,0,0,0,0,0,0,0"])
    write_lines(folder / "ISIC_2019_Training_Metadata.csv",
                ["image,age_approx,lesion_id", "ISIC_1,40,BCN_1", "ISIC_2,40,BCN_1"])
    for name in ("ISIC_1", "ISIC_2"):
        (folder / f"{name}.jpg").touch()
    return folder


def test_isic_ground_truth_with_other_classes_names_its_header_row(tmp_path):
    root = isic_root(tmp_path)
    write_lines(root / "ISIC_2019_Training_GroundTruth.csv", ["image,MEL,NV", "ISIC_1,1,0", "ISIC_2,0,1"])
    with pytest.raises(DataError, match=r"GroundTruth.csv row 1: expected the classes MEL,NV,.*found MEL,NV; "
                                        "pass it with --labels"):
        ISIC.find_labelled(root)


@pytest.mark.parametrize("lines,message", [
    pytest.param([], r"Metadata.csv is empty", id="empty"),
    pytest.param(["image,lesion_id", "ISIC_1,BCN_1", "ISIC_2,BCN_1", "ISIC_1,BCN_7"],
                 r"Metadata.csv row 4: image ISIC_1 is in lesion BCN_7 here but in BCN_1 in row 2",
                 id="two lesions for one image"),
])
def test_isic_metadata_errors_name_file_and_row(tmp_path, lines, message):
    root = isic_root(tmp_path)
    (root / "ISIC_2019_Training_Metadata.csv").write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(DataError, match=message):
        ISIC.find_labelled(root)


def test_isic_metadata_repeating_a_row_keeps_the_lesion(tmp_path):
    root = isic_root(tmp_path)
    write_lines(root / "ISIC_2019_Training_Metadata.csv",
                ["image,lesion_id", "ISIC_1,BCN_1", "ISIC_2,BCN_1", "ISIC_1,BCN_1"])
    assert {r.group for r in ISIC.find_labelled(root)} == {"BCN_1"}


# ---------------------------------------------------------------- ACDC's Info.cfg and NIfTI frames

GOOD_INFO = ["ED: 1", "ES: 2", "Group: NOR", "Height: 180.0", "NbFrame: 2", "Weight: 80.0"]


def acdc_root(folder: Path) -> Path:
    """One ACDC patient: Info.cfg, ED (frame 1) and ES (frame 2) volumes of 3 slices, and a 4-D cine."""
    patient = folder / "training" / "patient001"
    patient.mkdir(parents=True)
    write_lines(patient / "Info.cfg", GOOD_INFO)
    volume = np.arange(4 * 4 * 3 * 2, dtype=np.int16).reshape(4, 4, 3, 2)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), patient / "patient001_4d.nii.gz")
    for frame in (0, 1):
        nib.save(nib.Nifti1Image(volume[..., frame], np.eye(4)), patient / f"patient001_frame{frame + 1:02d}.nii.gz")
    return folder


@pytest.mark.parametrize("lines,message", [
    pytest.param([], r"Info.cfg: Group is missing", id="empty"),
    pytest.param([line for line in GOOD_INFO if not line.startswith("Group")], r"Info.cfg: Group is missing; "
                 "expected a line `Group: X`, X one of NOR, MINF, DCM, HCM, RV", id="no Group"),
    pytest.param(with_row(GOOD_INFO, 3, "Group: XYZ"), r"Info.cfg: Group is 'XYZ' on line 3, expected one of",
                 id="unknown Group"),
    pytest.param([*GOOD_INFO, "Group: DCM"], r"Info.cfg: Group is 'DCM' on line 7 but 'NOR' on line 3",
                 id="two Groups"),
    pytest.param(GOOD_INFO[1:], r"Info.cfg: ED must be a 1-based frame number, found None$", id="no ED"),
    pytest.param(with_row(GOOD_INFO, 2, "ES: 0"), r"Info.cfg: ES must be a 1-based frame number, found '0' on line 2",
                 id="ES 0"),
    pytest.param(with_row(GOOD_INFO, 1, "ED: first"), r"ED must be a 1-based frame number, found 'first' on line 1",
                 id="ED not a number"),
])
def test_info_cfg_errors_name_file_and_line(tmp_path, lines, message):
    path = write_lines(tmp_path / "Info.cfg", lines)
    with pytest.raises(DataError, match=message) as caught:
        read_info_cfg(path)
    assert str(path) in str(caught.value)


def test_info_cfg_repeating_a_line_is_fine(tmp_path):
    path = write_lines(tmp_path / "Info.cfg", [*GOOD_INFO, "Group: NOR"])
    assert read_info_cfg(path)["Group"] == "NOR"


@pytest.mark.parametrize("damage,message", [
    pytest.param(lambda p: (p / "Info.cfg").unlink(), r"patient001/Info.cfg is missing", id="no Info.cfg"),
    pytest.param(lambda p: (p / "Info.cfg").write_bytes(b"ED: 1\nGroup: NOR\xff\n"),
                 r"patient001/Info.cfg line 2: not UTF-8 text",
                 id="Info.cfg not UTF-8"),
    pytest.param(lambda p: (p / "patient001_frame02.nii.gz").unlink(),
                 r"patient001/Info.cfg: ES is frame 2 but patient001_frame02.nii.gz is missing", id="frame missing"),
    pytest.param(lambda p: (p / "patient001_frame02.nii.gz").write_bytes(b"not a volume"),
                 r"patient001/patient001_frame02.nii.gz: not a readable NIfTI volume", id="frame unreadable"),
    pytest.param(lambda p: (p / "patient001_frame01.nii.gz").write_bytes(b""),
                 r"patient001/patient001_frame01.nii.gz: not a readable NIfTI volume", id="frame empty"),
])
def test_acdc_listing_errors_name_the_file(tmp_path, damage, message):
    root = acdc_root(tmp_path)
    damage(root / "training" / "patient001")
    with pytest.raises(DataError, match=message):
        ACDC.find_labelled(root)


def test_acdc_unreadable_cine_names_the_file_when_pretraining_lists_it(tmp_path):
    root = acdc_root(tmp_path)
    labelled = ACDC.find_labelled(root)
    assert len(labelled) == 2 * 3
    (root / "training" / "patient001" / "patient001_4d.nii.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match=r"patient001/patient001_4d.nii.gz: not a readable NIfTI volume"):
        ACDC.pretraining_images(root, labelled)


# ---------------------------------------------------------------- the scripts, as a user runs them

def assert_refused(result, out: Path, *fragments: str) -> None:
    """Exit code 2, one `error:` line naming what went wrong, and nothing trained."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (out / "checkpoint.pth").exists() and not (out / "metrics.json").exists()


def test_rsna_downstream_refuses_disagreeing_rows(capsys, rsna_root, tmp_path):
    root = tmp_path / "rsna"
    shutil.copytree(rsna_root, root)
    csv = root / "stage_2_train.csv"
    first = csv.read_text().splitlines()[1]  # e.g. ID_0123_epidural,0
    image_label, label = first.rsplit(",", 1)
    lines = csv.read_text().splitlines()
    write_lines(csv, [*lines, f"{image_label},{1 - int(label)}"])
    result = run_entry(capsys, "RSNA_MoCo", "MoCo_downstream.py", "--resnet", "--data-root", root, "--split-dir",
                        tmp_path / "splits", "--output-dir", tmp_path / "out", *SMALL)
    assert_refused(result, tmp_path / "out", f"{csv} row {len(lines) + 1}: {image_label} appears with different",
                   "in row 2")


def test_rsna_pretraining_refuses_a_label_other_than_0_or_1(capsys, rsna_root, tmp_path):
    root = tmp_path / "rsna"
    shutil.copytree(rsna_root, root)
    csv = root / "stage_2_train.csv"
    lines = csv.read_text().splitlines()
    write_lines(csv, with_row(lines, 5, lines[4].rsplit(",", 1)[0] + ",2"))
    result = run_entry(capsys, "RSNA_MoCo", "trainMoCo.py", "--data-root", root, "--split-dir", tmp_path / "splits",
                        "--output-dir", tmp_path / "out", "--queue-size", "8", *SMALL)
    assert_refused(result, tmp_path / "out", f"{csv} row 5: Label 2 is not 0 or 1")


def test_isic_downstream_refuses_a_users_csv_naming_an_absent_image(capsys, isic_root, tmp_path):
    csv = write_lines(tmp_path / "mine.csv", ["file,benign,malignant", "ISIC_0000000,1,0", "ISIC_9999999,0,1"])
    result = run_entry(capsys, "ISIC", "MoCo_downstream.py", "--resnet", "--labels", csv, "--data-root", isic_root,
                        "--split-dir", tmp_path / "splits", "--output-dir", tmp_path / "out", *SMALL)
    assert_refused(result, tmp_path / "out", f"{csv} row 3: image ISIC_9999999 has no PNG, JPEG or DICOM file")


def test_isic_pretraining_refuses_an_empty_ground_truth(capsys, isic_root, tmp_path):
    root = tmp_path / "isic"
    shutil.copytree(isic_root, root)
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("")
    result = run_entry(capsys, "ISIC", "trainMoCo.py", "--data-root", root, "--split-dir", tmp_path / "splits",
                        "--output-dir", tmp_path / "out", "--queue-size", "8", *SMALL)
    assert_refused(result, tmp_path / "out", "ISIC_2019_Training_GroundTruth.csv is empty")


@pytest.mark.parametrize("damage,fragment", [
    pytest.param(lambda p: write_lines(p / "Info.cfg", ["ED: 1", "ES: 5", "Height: 170"]),
                 "patient004/Info.cfg: Group is missing", id="Info.cfg without Group"),
    pytest.param(lambda p: (p / "patient004_frame01.nii.gz").write_bytes(b"garbage"),
                 "patient004/patient004_frame01.nii.gz: not a readable NIfTI volume", id="unreadable frame"),
])
def test_acdc_downstream_refuses_a_broken_patient(capsys, acdc_root, tmp_path, damage, fragment):
    root = tmp_path / "acdc"
    shutil.copytree(acdc_root, root)
    damage(root / "training" / "patient004")
    result = run_entry(capsys, "ACDC", "MoCov2_downstream.py", "--resnet", "--data-root", root, "--split-dir",
                        tmp_path / "splits", "--output-dir", tmp_path / "out", *SMALL)
    assert_refused(result, tmp_path / "out", fragment)
