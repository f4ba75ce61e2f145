"""No patient data leaves the DICOMs: every RSNA script runs on sample slices carrying a recognisable
fake patient name, id and birth date, and no output file or console line may contain them."""
from pathlib import Path

import pydicom
import pytest
from conftest import run_entry

from mirl.sample_data import write_rsna

pytestmark = pytest.mark.slow  # end-to-end runs of the scripts

FAKE_NAME = "Leaktest^Zelda"
FAKE_ID_PREFIX = "PIDLEAK"
FAKE_BIRTH_DATE = "19010203"
FORBIDDEN = [b"Leaktest", b"Zelda", FAKE_ID_PREFIX.encode(), FAKE_BIRTH_DATE.encode()]
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--epochs", "1",
        "--device", "cpu"]


def identifiable_sample(root: Path) -> str:
    """RSNA sample data whose slices name their patient; one slice has lost its pixel data, so it is
    skipped and its reason reaches skipped.csv too."""
    write_rsna(root, patients=12, size=32, seed=3)
    patients: dict[str, str] = {}
    files = sorted((root / "stage_2_train").glob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID = patients.setdefault(str(ds.PatientID), f"{FAKE_ID_PREFIX}{len(patients):04d}")
        ds.PatientName = FAKE_NAME
        ds.PatientBirthDate = FAKE_BIRTH_DATE
        if path == files[0]:
            del ds.PixelData
        ds.save_as(path)
    return files[0].stem


def test_no_output_of_any_script_contains_patient_tags(tmp_path, capsys):
    data = tmp_path / "data"
    bad_slice = identifiable_sample(data)
    out = tmp_path / "out"
    common = ["--data-root", data, "--split-dir", out / "splits", *TINY]
    runs = [
        ("trainMoCo.py", ["--queue-size", "16", "--cache", out / "cache"]),
        ("trainMoCoV2.py", ["--queue-size", "16"]),
        ("trainSimCLR.py", []),
        ("MoCo_downstream.py", ["--frozen", "--pretrained", out / "trainMoCo.py" / "checkpoint.pth"]),
        ("MoCov2_downstream.py", ["--pretrained", out / "trainMoCoV2.py" / "checkpoint.pth"]),
        ("SimCLR_downstream.py", ["--pretrained", out / "trainSimCLR.py" / "checkpoint.pth"]),
    ]
    console = []
    for script, flags in runs:
        result = run_entry(capsys, "RSNA_MoCo", script, *common, *flags, "--output-dir", out / script)
        assert result.returncode == 0, result.stderr[-2000:]
        console.append(result.stdout + result.stderr)
    skipped = (out / "trainMoCoV2.py" / "skipped.csv").read_text()
    assert bad_slice in skipped and "pixel data" in skipped, skipped  # the bad slice was met and explained

    written = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix or p.name for p in written}
    assert {".pth", ".json", ".txt", ".csv", ".npy"} <= kinds and any("tfevents" in p.name for p in written)
    leaks = [(p, word) for p in written for word in FORBIDDEN if word.lower() in p.read_bytes().lower()]
    leaks += [("console", word) for text in console for word in FORBIDDEN if word.decode().lower() in text.lower()]
    assert not leaks
