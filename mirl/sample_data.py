"""Small synthetic datasets written in each real dataset's on-disk format.

- `rsna`: brain-CT phantoms as real DICOM files with the tags a scanner writes, several slices per
  study, and the label CSV in RSNA's long form. Each hemorrhage subtype is drawn as the structure a
  radiologist looks for (a biconvex lens against the skull, a long crescent, thin lines in the sulci,
  a round parenchymal clot, blood in the ventricles).
- `isic`: dermoscopy-like JPEGs, several per lesion, with the ground-truth CSV (1.0/0.0) and lesion
  metadata; colour, border and texture depend on the class.
- `acdc`: cardiac cine MRI as NIfTI (a beating 4-D cine, ED and ES volumes, masks) with Info.cfg;
  ventricle size, wall thickness and contraction depend on the group.

So a model can learn them, and every stage of MIRL can be shown working offline:
`python -m mirl.sample_data {rsna,isic,acdc} --out DIR`.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from mirl.flags import positive_int, random_seed

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
        # such scanners store nothing below air (-1000 HU): the repair maps back exactly -1000..3095 HU
        stored = np.mod(np.round(np.maximum(hu, -1000.0)).astype(np.int32), 4096).astype(np.uint16)
    else:
        ds.BitsStored, ds.PixelRepresentation = 16, 1
        ds.RescaleIntercept = -1024
        stored = np.clip(np.round(hu) + 1024, -32768, 32767).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def write_rsna(out: Path, patients: int = 80, size: int = 256, seed: int = 0, workers: int = 1) -> Path:
    """Write an RSNA-format sample dataset: `stage_2_train/ID_*.dcm` and `stage_2_train.csv`.

    Each patient draws from its own random stream of `seed`, so `workers` processes write the same
    data as one (a benchmark's 4,000 slices at 512 px take a single core over two minutes)."""
    image_dir = out / "stage_2_train"
    image_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(image_dir, p, size, stream) for p, stream in enumerate(np.random.SeedSequence(seed).spawn(patients))]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_patient = list(pool.map(_write_rsna_patient, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
    else:
        per_patient = [_write_rsna_patient(task) for task in tasks]
    rows = [row for patient_rows in per_patient for row in patient_rows]
    # the real file repeats some rows; readers must drop duplicates
    rng = np.random.default_rng(seed)
    rows += [rows[i] for i in rng.choice(len(rows), size=max(1, len(rows) // 100), replace=False)]
    with open(out / "stage_2_train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Label"])
        writer.writerows(rows)
    return out


def _write_rsna_patient(task: tuple[Path, int, int, np.random.SeedSequence]) -> list[tuple[str, int]]:
    """One patient's slices as DICOM files; returns their label rows."""
    image_dir, p, size, stream = task
    rng = np.random.default_rng(stream)
    rows: list[tuple[str, int]] = []
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
    return rows


# (colour RGB, border irregularity, texture strength, radius scale) per ISIC class; UNK has no image,
# as in the real training set
ISIC_LOOKS = {
    "MEL": ((60, 35, 25), 0.35, 0.5, 1.1),
    "NV": ((150, 100, 70), 0.05, 0.1, 0.8),
    "BCC": ((215, 150, 155), 0.15, 0.3, 0.7),
    "AK": ((190, 90, 80), 0.2, 0.9, 0.6),
    "BKL": ((170, 130, 80), 0.1, 0.7, 0.9),
    "DF": ((120, 80, 60), 0.05, 0.2, 0.5),
    "VASC": ((150, 30, 70), 0.1, 0.1, 0.5),
    "SCC": ((225, 120, 110), 0.3, 0.6, 0.7),
}
ISIC_ALL_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def _lesion_image(rng: np.random.Generator, size: int, looks: tuple, lesion: dict) -> np.ndarray:
    colour, irregularity, texture, radius_scale = looks
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)  # each photo of the lesion is taken at another angle
    x, y = x - lesion["centre"][0] - rng.normal(0, 0.05), y - lesion["centre"][1] - rng.normal(0, 0.05)
    theta = np.arctan2(y, x) + angle
    border = 1.0 + irregularity * sum(a * np.sin(k * theta + p) for k, a, p in lesion["harmonics"])
    radius = 0.45 * radius_scale * lesion["size"] * border
    inside = np.sqrt(x ** 2 + y ** 2) < radius
    skin = np.array(lesion["skin"], dtype=np.float32)
    image = np.broadcast_to(skin, (size, size, 3)).copy() + rng.normal(0, 4, (size, size, 1))
    speckle = rng.normal(0, 1, (size // 4 + 1, size // 4 + 1, 1))
    speckle = np.kron(speckle, np.ones((4, 4, 1)))[:size, :size]
    lesion_pixels = np.array(colour, dtype=np.float32) * (1 + 0.25 * texture * speckle)
    image[inside] = lesion_pixels[inside]
    if colour == ISIC_LOOKS["DF"][0]:  # dermatofibroma: pale central patch
        image[np.sqrt(x ** 2 + y ** 2) < 0.3 * radius] = (215, 195, 180)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_isic(out: Path, patients: int = 80, size: int = 128, seed: int = 0) -> Path:
    """Write an ISIC 2019-format sample: JPEGs, the ground-truth CSV and lesion metadata.

    `patients` is the number of lesions; each has 2 or 3 photos.
    """
    rng = np.random.default_rng(seed)
    image_dir = out / "ISIC_2019_Training_Input"
    image_dir.mkdir(parents=True, exist_ok=True)
    truth_rows, metadata_rows = [], []
    classes = list(ISIC_LOOKS)
    for lesion_number in range(patients):
        name = classes[lesion_number % len(classes)]
        lesion = {"centre": rng.uniform(-0.15, 0.15, 2), "size": rng.uniform(0.8, 1.2),
                  "skin": (rng.uniform(200, 235), rng.uniform(160, 190), rng.uniform(140, 170)),
                  "harmonics": [(k, rng.uniform(0.3, 1.0), rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7)]}
        for _ in range(int(rng.integers(2, 4))):
            image_id = f"ISIC_{len(truth_rows):07d}" + ("_downsampled" if rng.random() < 0.1 else "")
            Image.fromarray(_lesion_image(rng, size, ISIC_LOOKS[name], lesion)).save(
                image_dir / f"{image_id}.jpg", quality=92)
            truth_rows.append([image_id] + ["1.0" if c == name else "0.0" for c in ISIC_ALL_CLASSES])
            metadata_rows.append([image_id, int(rng.integers(3, 17)) * 5, "anterior torso",
                                  f"BCN_{lesion_number:07d}", "female" if rng.random() < 0.5 else "male"])
    with open(out / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", *ISIC_ALL_CLASSES], *truth_rows])
    with open(out / "ISIC_2019_Training_Metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
                                 *metadata_rows])
    return out


# (LV radius at ED, wall thickness, ejection shrink, RV scale) per ACDC group, in pixels of a 64 image
ACDC_HEARTS = {
    "NOR": (9.0, 3.0, 0.35, 1.0),
    "MINF": (11.0, 3.0, 0.15, 1.0),
    "DCM": (14.0, 1.8, 0.08, 1.0),
    "HCM": (7.0, 6.0, 0.45, 1.0),
    "RV": (9.0, 3.0, 0.35, 1.9),
}


def _cardiac_frame(rng: np.random.Generator, size: int, slices: int, heart: tuple, contraction: float,
                   patient: dict) -> tuple[np.ndarray, np.ndarray]:
    """One 3-D frame (H x W x Z) of bright-blood cine MRI and its mask (1 RV, 2 myocardium, 3 LV)."""
    lv_radius, wall, shrink, rv_scale = heart
    scale = size / 64.0
    axis = np.arange(size, dtype=np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    volume = np.empty((size, size, slices), dtype=np.float32)
    mask = np.zeros((size, size, slices), dtype=np.uint8)
    cx, cy = patient["centre"]
    for z in range(slices):
        taper = 1.0 - 0.6 * (z / max(1, slices - 1)) ** 2  # base to apex
        radius = lv_radius * scale * taper * (1 - shrink * contraction)
        thickness = wall * scale * (1 + 0.3 * contraction)
        if patient["infarct"] is not None:  # an infarcted, thinned segment that does not thicken
            angle = np.arctan2(y - cy, x - cx)
            thickness = np.where(np.abs(np.angle(np.exp(1j * (angle - patient["infarct"])))) < 0.8,
                                 wall * scale * 0.4, thickness)
        distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        rv_distance = np.sqrt(((x - (cx - (radius + thickness) * 1.1)) / (rv_scale * 1.1)) ** 2 + (y - cy) ** 2)
        rv_radius = lv_radius * scale * taper * (1 - 0.5 * shrink * contraction)
        frame = np.full((size, size), 90.0, dtype=np.float32)
        frame[rv_distance < rv_radius] = 220.0
        mask[rv_distance < rv_radius, z] = 1
        myocardium = (distance < radius + thickness) & (distance >= radius)
        frame[myocardium], mask[myocardium, z] = 50.0, 2
        frame[distance < radius], mask[distance < radius, z] = 230.0, 3
        volume[..., z] = frame + rng.normal(0, 8, (size, size))
    return volume * patient["gain"], mask


def write_acdc(out: Path, patients: int = 25, size: int = 64, seed: int = 0) -> Path:
    """Write an ACDC-format sample: `training/patientXXX/` with Info.cfg, the 4-D cine, ED and ES
    volumes and their masks; the groups take turns, so each holds 20 % of the patients."""
    rng = np.random.default_rng(seed)
    groups = list(ACDC_HEARTS)
    for number in range(1, patients + 1):
        group = groups[(number - 1) % len(groups)]
        folder = out / "training" / f"patient{number:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        frames, slices = int(rng.integers(10, 15)), int(rng.integers(6, 10))
        es = int(rng.integers(frames // 3, frames // 2 + 1))  # 0-based; ED is frame 0
        patient = {"centre": rng.uniform(size * 0.4, size * 0.6, 2), "gain": rng.uniform(0.8, 1.2),
                   "infarct": rng.uniform(-np.pi, np.pi) if group == "MINF" else None}
        cine, masks = [], {}
        for t in range(frames):
            contraction = np.sin(np.pi * t / (2 * es)) ** 2 if t <= 2 * es else 0.0  # 0 at ED, 1 at ES
            volume, mask = _cardiac_frame(rng, size, slices, ACDC_HEARTS[group], contraction, patient)
            cine.append(volume)
            masks[t] = mask
        affine = np.diag([1.5, 1.5, 10.0, 1.0])
        four_d = np.clip(np.stack(cine, axis=-1), 0, 4000).astype(np.int16)
        nib.save(nib.Nifti1Image(four_d, affine), folder / f"patient{number:03d}_4d.nii.gz")
        for t in (0, es):
            stem = f"patient{number:03d}_frame{t + 1:02d}"
            nib.save(nib.Nifti1Image(four_d[..., t], affine), folder / f"{stem}.nii.gz")
            nib.save(nib.Nifti1Image(masks[t], affine), folder / f"{stem}_gt.nii.gz")
        height, weight = rng.uniform(150, 195), rng.uniform(50, 110)
        (folder / "Info.cfg").write_text(f"ED: 1\nES: {es + 1}\nGroup: {group}\nHeight: {height:.1f}\n"
                                         f"NbFrame: {frames}\nWeight: {weight:.1f}\n")
    return out


WRITERS = {"rsna": write_rsna, "isic": write_isic, "acdc": write_acdc}
DEFAULT_SIZES = {"rsna": (80, 256), "isic": (80, 128), "acdc": (25, 64)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirl.sample_data", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(WRITERS))
    parser.add_argument("--out", type=Path, required=True, help="folder to write the dataset into")
    parser.add_argument("--patients", type=positive_int, default=None,
                        help="patients (RSNA studies, ISIC lesions); default 80, ACDC 25")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="image side in pixels; default 256, ISIC 128, ACDC 64")
    parser.add_argument("--seed", type=random_seed, default=0)
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes writing RSNA's DICOMs (the same files for any number)")
    args = parser.parse_args(argv)
    default_patients, default_size = DEFAULT_SIZES[args.dataset]
    args.patients, args.size = args.patients or default_patients, args.size or default_size
    if args.patients < 4 or args.size < 32:
        parser.error("--patients must be at least 4 and --size at least 32")
    extra = {"workers": args.workers} if args.dataset == "rsna" else {}
    WRITERS[args.dataset](args.out, patients=args.patients, size=args.size, seed=args.seed, **extra)
    print(f"wrote {args.dataset} sample data to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
