"""Small synthetic datasets written in each real dataset's on-disk format.

`python -m mirl.sample_data rsna --out DIR` writes brain-CT phantoms as real DICOM files with the
tags a scanner writes, several slices per study, and the label CSV in RSNA's long form. Each
hemorrhage subtype is drawn as the structure a radiologist looks for (a biconvex lens against the
skull, a long crescent, thin lines in the sulci, a round parenchymal clot, blood in the ventricles),
so a model can learn them and every stage of MIRL can be shown working offline.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

RSNA_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
BLOOD_HU = 75.0
SKULL_INNER = 0.9  # normalised radius of the skull's inner surface


def _head_coordinates(size: int, scale: float, tilt: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised elliptic radius and angle of each pixel for a head of the given scale and tilt."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    cos, sin = np.cos(tilt), np.sin(tilt)
    xr, yr = cos * x + sin * y, -sin * x + cos * y
    rho = np.sqrt((xr / (0.75 * scale)) ** 2 + (yr / (0.88 * scale)) ** 2)
    return rho, np.arctan2(yr, xr)


def _angular_distance(theta: np.ndarray, centre: float) -> np.ndarray:
    return np.abs(np.angle(np.exp(1j * (theta - centre))))


def _hemorrhage_mask(subtype: str, rho: np.ndarray, theta: np.ndarray, ventricles: np.ndarray,
                     extent: float, where: dict) -> np.ndarray:
    """Pixels of one subtype's bleed; `extent` in (0, 1] shrinks it towards the ends of its slices."""
    angle = where["angle"]
    if subtype == "epidural":  # biconvex lens pressed against the skull, short in angle, thick
        half_span = 0.45 * extent
        d = _angular_distance(theta, angle)
        thickness = 0.2 * extent * np.cos(np.clip(d / half_span, 0, 1) * np.pi / 2)
        return (d < half_span) & (rho < SKULL_INNER) & (rho > SKULL_INNER - thickness)
    if subtype == "subdural":  # thin crescent following the skull over a long arc
        d = _angular_distance(theta, angle)
        return (d < 1.3 * extent) & (rho < SKULL_INNER) & (rho > SKULL_INNER - 0.06)
    if subtype == "subarachnoid":  # thin radial lines filling sulci
        mask = np.zeros_like(rho, dtype=bool)
        for offset in where["sulci"]:
            mask |= (_angular_distance(theta, angle + offset) < 0.05) & (rho > 0.45) & (rho < 0.45 + 0.4 * extent)
        return mask
    if subtype == "intraparenchymal":  # round clot inside the brain
        cx, cy = where["centre"]
        radius = where["radius"] * (0.5 + 0.5 * extent)
        x, y = rho * np.cos(theta), rho * np.sin(theta)
        return (x - cx) ** 2 + (y - cy) ** 2 < radius ** 2
    if subtype == "intraventricular":  # blood layering in the ventricles
        return ventricles
    raise ValueError(f"unknown subtype {subtype}")


def _ct_slice(rng: np.random.Generator, size: int, study: dict, z: float,
              bleeds: dict[str, float]) -> np.ndarray:
    """One axial slice in HU. `z` in [0, 1] runs from the skull base up; `bleeds` maps subtype to extent."""
    scale = study["scale"] * (1.0 - 0.35 * z ** 2)
    rho, theta = _head_coordinates(size, scale, study["tilt"])
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    brain = rho < SKULL_INNER
    hu[brain] = 32.0 + study["brain_offset"]
    # grey/white matter texture: smooth random field
    field = rng.normal(size=(size // 8 + 2, size // 8 + 2)).astype(np.float32)
    texture = np.kron(field, np.ones((8, 8), dtype=np.float32))[:size, :size]
    hu[brain] += 4.0 * texture[brain]
    ventricle_size = 0.12 * (1.0 - abs(z - 0.5))
    ventricles = np.zeros_like(brain)
    for side in (-1, 1):
        vx = rho * np.cos(theta) - side * 0.12
        vy = rho * np.sin(theta)
        ventricles |= (vx / ventricle_size) ** 2 + (vy / (2.2 * ventricle_size)) ** 2 < 1
    hu[ventricles] = 6.0
    hu[(rho >= SKULL_INNER) & (rho < 1.0)] = 1100.0
    for subtype, extent in bleeds.items():
        hu[_hemorrhage_mask(subtype, rho, theta, ventricles, extent, study["where"][subtype]) & brain] = BLOOD_HU
    hu += rng.normal(0.0, 6.0, size=hu.shape).astype(np.float32)
    return hu


def _dicom_slice(hu: np.ndarray, image_id: str, patient: dict, study_uid: str, series_uid: str,
                 index: int, broken_header: bool) -> Dataset:
    """A CT image DICOM dataset as a scanner would write it (optionally with RSNA's broken header)."""
    sop_uid = generate_uid(entropy_srcs=[image_id])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [-125.0, -125.0, 5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [250.0 / hu.shape[0], 250.0 / hu.shape[1]]
    ds.SliceThickness = 5.0
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    ds.RescaleSlope = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    ds.HighBit = 15
    if broken_header:  # 12-bit unsigned pixels holding HU modulo 4096, intercept claiming 0
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleIntercept = 0
        stored = np.mod(np.round(hu).astype(np.int32), 4096).astype(np.uint16)
    else:
        ds.BitsStored, ds.PixelRepresentation = 16, 1
        ds.RescaleIntercept = -1024
        stored = np.clip(np.round(hu) + 1024, -32768, 32767).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def write_rsna(out: Path, patients: int = 80, size: int = 256, seed: int = 0) -> Path:
    """Write an RSNA-format sample dataset: `stage_2_train/ID_*.dcm` and `stage_2_train.csv`."""
    rng = np.random.default_rng(seed)
    image_dir = out / "stage_2_train"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int]] = []
    for p in range(patients):
        patient = {"id": f"ID_{rng.integers(16 ** 8):08x}", "name": f"Sample^Patient{p:04d}"}
        study_uid = generate_uid(entropy_srcs=[patient["id"], "study"])
        series_uid = generate_uid(entropy_srcs=[patient["id"], "series"])
        n_slices = int(rng.integers(6, 11))
        subtypes: list[str] = []
        if rng.random() < 0.7:
            subtypes = list(rng.choice(RSNA_SUBTYPES, size=1 + int(rng.random() < 0.3), replace=False))
        study = {
            "scale": rng.uniform(0.9, 1.05),
            "tilt": rng.uniform(-0.2, 0.2),
            "brain_offset": rng.uniform(-4, 4),
            "where": {
                subtype: {
                    "angle": rng.uniform(-np.pi, np.pi),
                    "sulci": rng.uniform(-0.6, 0.6, size=int(rng.integers(3, 6))),
                    "centre": rng.uniform(-0.35, 0.35, size=2),
                    "radius": rng.uniform(0.1, 0.18),
                }
                for subtype in RSNA_SUBTYPES
            },
        }
        # each bleed spans a contiguous run of slices, largest in its middle
        spans = {}
        for subtype in subtypes:
            length = int(rng.integers(max(2, n_slices // 3), n_slices + 1))
            start = int(rng.integers(0, n_slices - length + 1))
            spans[subtype] = (start, length)
        broken_header = rng.random() < 0.1
        for index in range(n_slices):
            bleeds = {}
            for subtype, (start, length) in spans.items():
                if start <= index < start + length:
                    position = (index - start + 0.5) / length
                    bleeds[subtype] = 0.4 + 0.6 * np.sin(np.pi * position)
            hu = _ct_slice(rng, size, study, index / max(1, n_slices - 1), bleeds)
            image_id = f"ID_{rng.integers(16 ** 9):09x}"
            _dicom_slice(hu, image_id, patient, study_uid, series_uid, index, broken_header).save_as(
                image_dir / f"{image_id}.dcm", enforce_file_format=True)
            labels = [int(s in bleeds) for s in RSNA_SUBTYPES]
            rows += [(f"{image_id}_{s}", v) for s, v in zip(RSNA_SUBTYPES, labels)]
            rows.append((f"{image_id}_any", int(any(labels))))
    # the real file repeats some rows; readers must drop duplicates
    rows += [rows[i] for i in rng.choice(len(rows), size=max(1, len(rows) // 100), replace=False)]
    with open(out / "stage_2_train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Label"])
        writer.writerows(rows)
    return out


WRITERS = {"rsna": write_rsna}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirl.sample_data", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(WRITERS))
    parser.add_argument("--out", type=Path, required=True, help="folder to write the dataset into")
    parser.add_argument("--patients", type=int, default=80, help="number of patients (studies)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.patients < 4 or args.size < 32:
        parser.error("--patients must be at least 4 and --size at least 32")
    WRITERS[args.dataset](args.out, patients=args.patients, size=args.size, seed=args.seed)
    print(f"wrote {args.dataset} sample data to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
