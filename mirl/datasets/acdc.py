"""ACDC: cardiac cine MRI as NIfTI volumes, one Info.cfg per patient naming its group."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from mirl.datasets.csv_files import first_undecodable_line
from mirl.datasets.records import DatasetDescription, ImageRecord, VolumeFormat, find_images
from mirl.datasets.volumes import VolumeRecord, find_volumes
from mirl.errors import DataError, UnreadableImageError
from mirl.imaging import nifti_slice_count

ACDC_CLASSES = ("NOR", "MINF", "DCM", "HCM", "RV")


def read_info_cfg(path: Path) -> dict[str, str]:
    """ACDC's `Info.cfg` (`Key: value` lines), checked to name a known Group and ED/ES frames.

    A key repeated with the same value is fine; with another value it is an error naming both lines.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is no text
    except FileNotFoundError:
        raise DataError(f"{path} is missing; each patientXXX folder needs its Info.cfg") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} line {first_undecodable_line(path)}: not UTF-8 text") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror or type(error).__name__})") from None
    info: dict[str, str] = {}
    line_of: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            if info.setdefault(key, value) != value:
                raise DataError(f"{path}: {key} is {value!r} on line {number} but {info[key]!r} on line {line_of[key]}")
            line_of.setdefault(key, number)
    if "Group" not in info:
        raise DataError(f"{path}: Group is missing; expected a line `Group: X`, X one of {', '.join(ACDC_CLASSES)}")
    if info["Group"] not in ACDC_CLASSES:
        raise DataError(f"{path}: Group is {info['Group']!r} on line {line_of['Group']}, expected one of "
                        f"{', '.join(ACDC_CLASSES)}")
    for key in ("ED", "ES"):
        value = info.get(key, "")
        if not (value.isdigit() and int(value) >= 1):
            where = f" on line {line_of[key]}" if key in line_of else ""
            raise DataError(f"{path}: {key} must be a 1-based frame number, found {info.get(key)!r}{where}")
    return info


def acdc_patients(root: Path) -> list[Path]:
    base = root / "training" if (root / "training").is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name))


def _volume_slices(path: Path) -> tuple[int, int]:
    """(slices, frames) of a NIfTI volume a dataset lists; one it cannot read stops the run, naming its path."""
    try:
        return nifti_slice_count(path)
    except UnreadableImageError as error:
        raise DataError(f"{path}: {str(error).removeprefix(f'{path.name}: ')}") from None


def find_acdc_labelled(root: Path) -> list[ImageRecord]:
    """Every short-axis slice of each patient's ED and ES volumes, labelled with the patient's group."""
    records = []
    for folder, phase, path, labels in acdc_phase_files(root):
        slices, _ = _volume_slices(path)
        records += [ImageRecord(f"{folder.name}_{phase}_s{z:02d}", path, labels, folder.name, (z,))
                    for z in range(slices)]
    return records


def cine_records(root: Path, labelled: list[ImageRecord],
                 of_cine: Callable[[str, Path, int, int], list[ImageRecord]]) -> list[ImageRecord]:
    """For pretraining: `of_cine(patient, cine file, slices, frames)` for each patient's 4-D cine, or the
    patient's labelled (ED/ES) records when it has none."""
    records = []
    for folder in acdc_patients(root):
        cine = folder / f"{folder.name}_4d.nii.gz"
        if cine.is_file():
            records += of_cine(folder.name, cine, *_volume_slices(cine))
        else:
            records += [r for r in labelled if r.group == folder.name]
    return records


def find_acdc_cine(root: Path, labelled: list[ImageRecord]) -> list[ImageRecord]:
    """Every slice of every frame of each patient's 4-D cine."""
    return cine_records(root, labelled, lambda patient, cine, slices, frames: [
        ImageRecord(f"{patient}_t{t:02d}_s{z:02d}", cine, None, patient, (z, t))
        for t in range(frames) for z in range(slices)])


def pretraining_cine(root: Path, labelled: list[ImageRecord] | None) -> list[ImageRecord]:
    """ACDC pretrains on the whole cine, not only the labelled ED/ES volumes (a plain folder: every image)."""
    return find_images(root) if labelled is None else find_acdc_cine(root, labelled)


def acdc_phase_files(root: Path) -> list[tuple[Path, str, str, np.ndarray]]:
    """(patient folder, phase, ED or ES volume file, one-hot group) of every patient's two labelled phases."""
    patients = acdc_patients(root)
    if not patients:
        raise DataError(f"no patientXXX folders under {root} (or {root / 'training'})")
    phases = []
    for folder in patients:
        info = read_info_cfg(folder / "Info.cfg")
        labels = np.eye(len(ACDC_CLASSES), dtype=np.float32)[ACDC_CLASSES.index(info["Group"])]
        for phase in ("ED", "ES"):
            path = folder / f"{folder.name}_frame{int(info[phase]):02d}.nii.gz"
            if not path.is_file():
                raise DataError(f"{folder / 'Info.cfg'}: {phase} is frame {info[phase]} but {path.name} is missing")
            phases.append((folder, phase, path, labels))
    return phases


def find_acdc_volumes(root: Path) -> list[ImageRecord]:
    """Each patient's ED and ES volumes, two records of one patient labelled with its group."""
    return [VolumeRecord(f"{folder.name}_{phase}", path, labels, folder.name)
            for folder, phase, path, labels in acdc_phase_files(root)]


def pretraining_cine_volumes(root: Path, labelled: list[ImageRecord] | None) -> list[ImageRecord]:
    """For 3-D pretraining: every frame of each patient's 4-D cine as a volume (ED/ES when it is absent)."""
    if labelled is None:
        return find_volumes(root)
    return cine_records(root, labelled, lambda patient, cine, slices, frames: [
        VolumeRecord(f"{patient}_t{t:02d}", cine, None, patient, (t,)) for t in range(frames)])


ACDC = DatasetDescription(
    name="acdc",
    classes=ACDC_CLASSES,
    multilabel=False,
    augment="grey",
    find_labelled=find_acdc_labelled,
    has_labels=lambda root: bool(acdc_patients(root)),
    data_hint="download the ACDC training set (patientXXX folders with Info.cfg and NIfTI volumes), or write "
              "sample data with `python -m mirl.sample_data acdc --out DIR` and pass --data-root DIR",
    patient_vote=True,
    find_pretraining=pretraining_cine,
    volumes=VolumeFormat(find_labelled=find_acdc_volumes, find_pretraining=pretraining_cine_volumes,
                         size=(16, 96, 96), voxel_size=(10.0, 2.0, 2.0), intensity="grey", augment="mr"),
)
