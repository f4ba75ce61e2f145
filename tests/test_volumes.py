"""Volumes as first-class data (`--dims 3`): 3-D views against grid_sample, series assembled from shuffled files,
study-level labels, bad volumes skipped and listed, the 3-D split BatchNorm against per-group BatchNorm3d, every
method and each dataset folder's scripts end to end, and exact resume (two-process 3-D SimCLR is in
tests/test_distributed.py)."""
import csv
import json
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_entry, run_in_process

from mirl import splits, study
from mirl.cache import open_cache
from mirl.config import PretrainConfig
from mirl.datasets import ACDC, DATASETS, ISIC, RSNA, read_rsna_labels
from mirl.datasets.volumes import VolumeDataset, find_volumes
from mirl.errors import DataError
from mirl.moco import SplitBatchNorm3d
from mirl.sample_data import write_rsna
from mirl.spatial import InputSpace
from mirl.volume_views import (
    CT_WINDOW,
    VOLUME_MEAN,
    VOLUME_STD,
    VolumeAugment,
    VolumeRecipe,
    affine_crop_3d,
    random_resized_boxes_3d,
    volume_evaluation_view,
)
from mirl.volumes import VolumeGeometry, assemble_series, read_slice_header, resample_volume

TINY_3D = ["--dims", "3", "--arch", "resnet18_3d", "--volume-size", "8", "32", "32", "--batch-size", "4",
           "--workers", "0", "--epochs", "1", "--device", "cpu"]


def grid_sample_crop(x, sides, centres, output, flips):
    """The 3-D crop as the 2-D one computes it, per voxel: 2 x 2 x 2 trilinear grid samples spread over the
    source voxels an output voxel covers (one sample where the box does not shrink)."""
    n = x.shape[0]
    scales = (sides * flips).flip(1)
    theta = torch.zeros(n, 3, 4)
    theta[:, [0, 1, 2], [0, 1, 2]] = scales
    theta[:, :, 3] = centres.flip(1)
    grid = F.affine_grid(theta, [n, 1, *output], align_corners=False)
    shrink = (sides * torch.tensor(x.shape[2:]) / torch.tensor(output)).clamp(1, 2) - 1
    steps = scales * (2 / torch.tensor(output[::-1], dtype=torch.float32)) * shrink.flip(1)
    total = 0
    for a in (-0.25, 0.25):
        for b in (-0.25, 0.25):
            for c in (-0.25, 0.25):
                offset = steps * torch.tensor([a, b, c])
                total = total + F.grid_sample(x, grid + offset[:, None, None, None, :], mode="bilinear",
                                              padding_mode="zeros", align_corners=False)
    return total / 8


def test_3d_crops_equal_trilinear_grid_samples_of_the_same_box():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 16, 24, 20)
    sides = random_resized_boxes_3d(8, (0.05, 1.0), (3 / 4, 4 / 3), x.device)
    centres = (torch.rand(8, 3) * 2 - 1) * (1 - sides)
    flips = torch.where(torch.rand(8, 3) < 0.5, -1.0, 1.0)
    torch.testing.assert_close(affine_crop_3d(x, sides, centres, (8, 12, 10), flips),
                               grid_sample_crop(x, sides, centres, (8, 12, 10), flips), rtol=0, atol=1e-5)


def test_a_whole_volume_at_half_size_is_its_2x2x2_mean_and_a_flip_reverses_an_axis():
    x = torch.randn(3, 1, 8, 16, 12)
    whole, centre = torch.ones(3, 3), torch.zeros(3, 3)
    torch.testing.assert_close(affine_crop_3d(x, whole, centre, (4, 8, 6)), F.avg_pool3d(x, 2), rtol=0, atol=1e-5)
    flips = torch.tensor([[-1.0, 1, 1], [1, -1, 1], [1, 1, -1]])
    flipped = affine_crop_3d(x, whole, centre, (8, 16, 12), flips)
    for i, axis in enumerate((-3, -2, -1)):
        torch.testing.assert_close(flipped[i], x[i].flip(axis), rtol=0, atol=1e-5)


def test_3d_crop_boxes_keep_their_share_and_aspect_bounds():
    sides = random_resized_boxes_3d(4000, (0.2, 1.0), (3 / 4, 4 / 3), torch.device("cpu"))
    share = sides.prod(dim=1)
    fitted = (sides < 1).any(dim=1)  # the rest fell back to the whole volume
    assert fitted.float().mean() > 0.95
    assert share[fitted].min() >= 0.2 - 1e-6 and share.max() <= 1 + 1e-6
    pairs = torch.cat([sides[fitted][:, [i]] / sides[fitted][:, [j]] for i in range(3) for j in range(3) if i != j])
    assert pairs.min() >= 3 / 4 - 1e-5 and pairs.max() <= 4 / 3 + 1e-5 and pairs.max() > 1.3


def test_the_ct_window_maps_hu_as_a_radiologist_window_and_jitters_level_and_width_in_hu():
    hu = torch.full((4, 1, 16, 16, 16), 100, dtype=torch.int16)  # fresh blood
    level, width = CT_WINDOW
    expected = ((100 - (level - width / 2)) / width - VOLUME_MEAN) / VOLUME_STD
    view = volume_evaluation_view(hu, (8, 8, 8), "hu")
    torch.testing.assert_close(view, torch.full_like(view, expected))
    fixed = VolumeAugment(VolumeRecipe(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=(0, 0, 0)), (8, 8, 8), "hu")
    torch.testing.assert_close(fixed(hu), torch.full_like(view, expected))
    jittered = VolumeAugment(VolumeRecipe(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=(0, 0, 0), jitter_p=1.0,
                                          level=0.1, width=0.2), (8, 8, 8), "hu")(hu)
    per_volume = jittered.flatten(1)
    assert (per_volume.std(dim=1) < 1e-5).all()  # one window per volume
    assert per_volume[:, 0].unique().numel() == 4  # each volume its own
    # the widest and narrowest windows and the furthest levels bound what 100 HU can become
    lows = [(100 - (level + s * 0.1 * width - w * width / 2)) / (w * width) for s in (-1, 1) for w in (0.8, 1.2)]
    assert per_volume.min() >= (min(lows) - VOLUME_MEAN) / VOLUME_STD - 1e-4
    assert per_volume.max() <= (max(lows) - VOLUME_MEAN) / VOLUME_STD + 1e-4


def test_resampling_averages_axes_that_shrink_and_pads_outside_the_scan_with_air():
    values = np.random.default_rng(0).normal(0, 100, size=(8, 16, 16)).astype(np.float32)
    half = resample_volume(values, (1.0, 1.0, 1.0), VolumeGeometry((2, 4, 4), None, "hu"))
    expected = F.avg_pool3d(torch.from_numpy(values)[None, None], 2)[0].round().to(torch.int16)
    assert torch.equal(half, expected)
    # 2 mm voxels of a 4 x 8 x 8 voxel grid: the 8 mm-deep scan fills the middle 4 of 8 source slices
    padded = resample_volume(values, (1.0, 1.0, 1.0), VolumeGeometry((4, 8, 8), (4.0, 4.0, 4.0), "hu"))
    assert padded.shape == (1, 8, 16, 16)
    inside = padded[0, 2:6, 4:12, 4:12]
    assert (padded == -1024).sum() == padded.numel() - inside.numel()
    assert torch.equal(inside, expected[0])


def slice_z(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def test_series_are_assembled_in_position_order_whatever_the_file_order(rsna_root):
    records = RSNA.in_dims(3).find_labelled(rsna_root)
    assert len(records) == 16  # one series per sample patient
    for record in records:
        places = [slice_z(p) for p in record.slices]
        assert places == sorted(places) and len(set(places)) == len(places)
        headers = [read_slice_header(p) for p in record.slices]
        random.Random(0).shuffle(headers)
        ordered, left_out = assemble_series(headers)
        assert [h.path for h in ordered] == list(record.slices) and not left_out


def test_a_series_volume_holds_each_slices_hounsfield_units_in_order(rsna_root):
    record = next(r for r in RSNA.in_dims(3).find_labelled(rsna_root)
                  if len(r.slices) % 2 == 0 and pydicom.dcmread(r.path).BitsStored == 16)
    geometry = VolumeGeometry((len(record.slices) // 2, 32, 32), None, "hu")  # the slices' own grid: no resampling
    volume, _, ok = VolumeDataset([record], geometry, 6)[0]
    assert ok
    expected = [pydicom.dcmread(p).pixel_array * 1.0 - 1024 for p in record.slices]  # slope 1, intercept -1024
    assert torch.equal(volume[0], torch.from_numpy(np.clip(np.stack(expected), -1024, 3071)).to(torch.int16))


def test_study_labels_are_any_slice_of_the_series(rsna_root):
    slices = read_rsna_labels(rsna_root / "stage_2_train.csv")
    for record in RSNA.in_dims(3).find_labelled(rsna_root):
        expected = np.max([slices.loc[p.stem].to_numpy() for p in record.slices], axis=0)
        assert np.array_equal(record.labels, expected)
        assert record.image_id == record.slices[0].stem + "_series"


@pytest.fixture
def one_series(tmp_path) -> list[Path]:
    root = write_rsna(tmp_path / "data", patients=1, size=32, seed=3)
    return sorted((root / "stage_2_train").glob("*.dcm"), key=slice_z)


def rewrite(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def test_bad_slices_are_left_out_of_their_series_and_listed_and_a_one_slice_series_is_skipped(one_series):
    first, second, third = one_series[:3]
    root = first.parent

    def smaller(ds):
        pixels = ds.pixel_array[::2, ::2].copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
    rewrite(second, smaller)
    rewrite(third, lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    shutil.copy(one_series[4], root / "ID_repeat.dcm")
    rewrite(one_series[-1], lambda ds: setattr(ds, "SeriesInstanceUID", pydicom.uid.generate_uid()))
    records = {r.image_id: r for r in find_volumes(root)}
    assert len(records) == 2
    series, lone = (records[f"{p.stem}_series"] for p in (first, one_series[-1]))
    reasons = dict(series.left_out)
    assert "size 16x16 differs from its series' 32x32" in reasons[str(second)]
    assert "orientation differs" in reasons[str(third)]
    assert "repeats the position" in reasons[str(root / "ID_repeat.dcm")] or \
        "repeats the position" in reasons[str(one_series[4])]
    geometry = VolumeGeometry((8, 16, 16), (5.0, 8.0, 8.0), "hu")
    dataset = VolumeDataset([series, lone], geometry, 0)
    assert dataset[0][2] and not dataset[1][2]
    assert "a volume needs two" in dataset.why_unreadable(1)


def test_a_missing_slice_is_filled_between_its_neighbours(one_series):
    geometry = VolumeGeometry((len(one_series) // 2, 16, 16), None, "hu")
    whole = find_volumes(one_series[0].parent)[0]
    full = VolumeDataset([whole], geometry, 0)[0][0].float()
    one_series[2].unlink()
    gap = find_volumes(one_series[0].parent)[0]
    assert len(gap.slices) == len(one_series) - 1
    assert dict(gap.left_out) == {str(one_series[3]): "follows a gap of 10.0 mm where the series steps 5.0 mm "
                                                      "(about 1 slices missing, interpolated)"}
    filled = VolumeDataset([gap], geometry, 0)[0][0].float()  # the same grid: the gap's plane interpolated
    torch.testing.assert_close(filled[0, 2], ((full[0, 1] + full[0, 3]) / 2).round(), rtol=0, atol=1)
    torch.testing.assert_close(filled[0, 3:], full[0, 3:])


def save_nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 10.0, 1.0])), path)
    return path


def test_bad_nifti_volumes_are_skipped_with_their_reason(tmp_path):
    rng = np.random.default_rng(0)
    save_nifti(tmp_path / "cine.nii.gz", rng.normal(size=(16, 16, 6, 3)).astype(np.float32))
    some_nan = rng.normal(size=(16, 16, 6)).astype(np.float32)
    some_nan[:4] = np.nan
    save_nifti(tmp_path / "some_nan.nii.gz", some_nan)
    save_nifti(tmp_path / "all_nan.nii.gz", np.full((16, 16, 6), np.nan, dtype=np.float32))
    save_nifti(tmp_path / "tiny.nii.gz", rng.normal(size=(4, 4, 2)).astype(np.float32))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    dataset = VolumeDataset(find_volumes(tmp_path), VolumeGeometry((8, 16, 16), (10.0, 3.0, 3.0), "grey"), 0)
    results = {r.image_id: dataset[i] for i, r in enumerate(dataset.records)}
    reasons = {r.image_id: dataset.why_unreadable(i) for i, r in enumerate(dataset.records)}
    assert not results["cine"][2] and "4 dimensions" in reasons["cine"]
    assert not results["all_nan"][2] and "no finite" in reasons["all_nan"]
    assert not results["broken"][2] and "not a readable NIfTI" in reasons["broken"]
    assert results["some_nan"][2] and results["some_nan"][0].float().std() > 0
    tiny, _, ok = results["tiny"]  # smaller than the grid: padded with black around it
    assert ok and tiny.shape == (1, 16, 32, 32) and (tiny[0, :, :12] == 0).all()


def test_the_3d_split_batchnorm_equals_one_batchnorm3d_per_group():
    torch.manual_seed(0)
    bn = SplitBatchNorm3d(4, splits=2).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(6, 4, 3, 4, 5) * 2 + 0.5).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    target = torch.randn(6, 4, 3, 4, 5)
    (bn(x) * target).sum().backward()
    reference = x.detach().clone().requires_grad_()
    groups = [torch.nn.BatchNorm3d(4) for _ in range(2)]
    for group in groups:
        group.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}, strict=False)
    out = torch.cat([g.train()(chunk) for g, chunk in zip(groups, reference.chunk(2))])
    (out * target).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, sum(g.weight.grad for g in groups), rtol=1e-4, atol=1e-5)


def test_a_3d_cache_reads_what_decoding_gives_and_is_kept_apart_from_2d(rsna_root, tmp_path):
    description = RSNA.in_dims(3)
    inputs = InputSpace(32, VolumeGeometry((8, 32, 32), (5.0, 8.0, 8.0), "hu"))
    cache = open_cache(description, rsna_root, inputs, tmp_path / "cache", workers=0)
    assert "8x32x32vox" in cache.folder.name
    records = description.find_labelled(rsna_root)[:3]
    decoded, cached = VolumeDataset(records, inputs.volume, 6), VolumeDataset(records, inputs.volume, 6, cache)
    for i in range(3):
        assert torch.equal(decoded[i][0], cached[i][0]) and cached[i][0].dtype == torch.int16
    assert open_cache(RSNA, rsna_root, 32, tmp_path / "cache", workers=0).folder != cache.folder


def test_a_2d_runs_identity_is_as_it_was_and_a_3d_runs_holds_its_grid(tmp_path):
    common = dict(data_root=tmp_path, output_dir=tmp_path, split_dir=tmp_path, method="mocov2")
    assert not {"dims", "volume_size", "voxel_size"} & PretrainConfig(**common).identity().keys()
    volume = PretrainConfig(**common, dims=3, volume_size=[8, 32, 32], voxel_size=(5.0, 8.0, 8.0)).identity()
    assert volume["dims"] == 3 and volume["volume_size"] == [8, 32, 32] and volume["voxel_size"] == [5.0, 8.0, 8.0]


def test_photographs_have_no_volume_form():
    with pytest.raises(DataError, match="2-D images"):
        ISIC.in_dims(3)
    assert ACDC.in_dims(3).spatial_dims == 3 and ACDC.in_dims(2) is ACDC


@pytest.mark.parametrize("folder,script,args,words", [
    ("ISIC", "trainMoCoV2.py", TINY_3D, ("holds 2-D images",)),
    ("RSNA_MoCo", "trainMoCoV2.py", ["--dims", "3", "--arch", "resnet18", "--workers", "0"], ("2-D encoder",)),
    ("RSNA_MoCo", "trainMoCoV2.py", ["--arch", "resnet18_3d"], ("3-D encoder", "--dims 3")),
    ("RSNA_MoCo", "trainMoCoV2.py", ["--volume-size", "8", "32", "32"], ("pass --dims 3",)),
    ("RSNA_MoCo", "trainDINO.py", TINY_3D, ("2-D only",)),
    ("ACDC", "trainMoCoV2.py", [*TINY_3D, "--augment", "dermoscopy"], ("no 3-D form",)),
    ("ACDC", "trainMoCoV2.py", ["--dims", "3", "--volume-size", "8", "4", "32"], ("at least 8 voxels",)),
])
def test_volume_runs_refuse_what_they_cannot_do_in_one_line(capsys, rsna_root, isic_root, acdc_root, tmp_path,
                                                             folder, script, args, words):
    root = {"ISIC": isic_root, "RSNA_MoCo": rsna_root, "ACDC": acdc_root}[folder]
    try:
        result = run_entry(capsys, folder, script, "--data-root", root, "--output-dir", tmp_path / "run",
                           "--split-dir", tmp_path / "splits", *args)
    except SystemExit as stopped:  # refused by the parser
        assert stopped.code == 2 and all(w in capsys.readouterr().err for w in words)
        return
    assert_one_line_error(result, *words)


@pytest.mark.slow
@pytest.mark.parametrize("folder,script", [("ACDC", "trainMoCoV2.py"), ("RSNA_MoCo", "trainMoCo.py"),
                                           ("RSNA_MoCo", "trainSimCLR.py"), ("RSNA_MoCo", "trainBYOL.py")])
def test_every_method_pretrains_on_volumes_with_the_patients_other_volumes_as_positives(rsna_root, acdc_root,
                                                                                        tmp_path, folder, script):
    root = {"ACDC": acdc_root, "RSNA_MoCo": rsna_root}[folder]
    result = run_in_process(folder, script, "--data-root", root, "--output-dir", tmp_path / "run",
                            "--split-dir", tmp_path / "splits", *TINY_3D, "--positives", "patient", "--knn-images", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    modality = {"ACDC": ("mr", "grey"), "RSNA_MoCo": ("ct", "hu")}[folder]
    assert config["dims"] == 3 and (config["augment"], config["intensity"]) == modality
    if folder == "ACDC":  # every cine frame a volume (not only ED and ES), each paired with its patient's others
        assert config["images"] > 20 and config["images_with_a_partner"] == config["images"]
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)
    assert state["dims"] == 3 and state["volume_size"] == [8, 32, 32]


@pytest.mark.slow
def test_rsna_volumes_pretrain_probe_and_list_left_out_slices(rsna_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(rsna_root, data)
    first = sorted((data / "stage_2_train").glob("*.dcm"))[0]
    rewrite(first, lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    common = ["--data-root", data, "--split-dir", tmp_path / "splits", *TINY_3D, "--voxel-size", "5", "8", "8"]
    result = run_in_process("RSNA_MoCo", "trainMoCoV2.py", *common, "--output-dir", tmp_path / "pretrain")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "slices were left out of their series or follow a gap (orientation differs" in result.stderr
    with open(tmp_path / "pretrain" / "left_out.csv") as f:
        listed = list(csv.DictReader(f))
    assert listed[0]["file"] == str(first) and "orientation differs" in listed[0]["reason"]
    # a slice from the middle of its series leaves a gap behind, listed at the slice after it
    assert all("follows a gap" in row["reason"] for row in listed[1:]) and len(listed) <= 2
    # without --volume-size and --voxel-size the probe takes the grid the encoder was pretrained on
    grid = slice(common.index("--volume-size"), common.index("--volume-size") + 4)
    no_grid = [*common[:grid.start], *common[grid.stop:-4]]
    result = run_in_process("RSNA_MoCo", "MoCov2_downstream.py", *no_grid, "--frozen", "--output-dir",
                            tmp_path / "probe", "--pretrained", tmp_path / "pretrain" / "checkpoint.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert (config["volume_size"], config["voxel_size"]) == ([8, 32, 32], [5.0, 8.0, 8.0])
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    test_ids = (tmp_path / "splits" / "test.txt").read_text().split()
    assert metrics["test"]["n_images"] == len(test_ids) and all(i.endswith("_series") for i in test_ids)
    assert 0.0 <= (metrics["test"]["auc_macro"] or 0.0) <= 1.0


@pytest.mark.slow
def test_acdc_volumes_fine_tune_with_a_patient_vote_and_resume_exactly(acdc_root, tmp_path):
    common = ["--data-root", acdc_root, "--split-dir", tmp_path / "splits", *TINY_3D, "--resnet",
              "--deterministic", "--save-every", "2", "--keep", "20", "--keep-states"]
    result = run_in_process("ACDC", "MoCov2_downstream.py", *common, "--output-dir", tmp_path / "unbroken")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "unbroken" / "metrics.json").read_text())
    assert metrics["test"]["n_images"] == 2 * metrics["test"]["n_patients"]  # ED and ES of each test patient
    states = sorted((tmp_path / "unbroken" / "checkpoints").glob("state-e0000-b*.pth"))
    middle = next(s for s in states if not s.name.endswith("b000000.pth"))
    result = run_in_process("ACDC", "MoCov2_downstream.py", *common, "--output-dir", tmp_path / "resumed",
                            "--resume", middle)
    assert result.returncode == 0, result.stderr[-2000:]
    unbroken = torch.load(tmp_path / "unbroken" / "checkpoint.pth", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)
    assert (tmp_path / "unbroken" / "metrics.json").read_text().replace("unbroken", "resumed") == \
        (tmp_path / "resumed" / "metrics.json").read_text()


@pytest.mark.slow
def test_a_volume_study_runs_its_grid_and_continues_without_training_again(rsna_root, tmp_path, capsys):
    argv = ["rsna", "--data-root", str(rsna_root), "--output-dir", str(tmp_path), "--dims", "3", "--arch",
            "resnet18_3d", "--volume-size", "8", "32", "32", "--fractions", "100", "--methods", "mocov2",
            "supervised", "--modes", "frozen", "--epochs", "1", "--downstream-epochs", "1", "--batch-size", "4",
            "--workers", "0", "--device", "cpu"]
    assert study.main(argv) == 0
    for run in ("mocov2_frozen_100F_seed0", "supervised_100F_seed0"):
        config = json.loads((tmp_path / "runs" / run / "config.json").read_text())
        assert config["dims"] == 3 and config["volume_size"] == [8, 32, 32] and config["voxel_size"] == [5.0, 2.0, 2.0]
    assert all(i.endswith("_series") for i in (tmp_path / "splits" / "test.txt").read_text().split())
    assert "| 100 % |" in (tmp_path / "results.md").read_text()
    capsys.readouterr()
    assert study.main(argv) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2


@pytest.mark.parametrize("dataset", ["rsna", "acdc"])
def test_volume_splits_made_like_the_slice_splits_hold_the_same_patients(rsna_root, acdc_root, tmp_path, dataset):
    root = {"rsna": rsna_root, "acdc": acdc_root}[dataset]
    assert splits.main([dataset, "--data-root", str(root), "--out", str(tmp_path / "2d")]) == 0
    assert splits.main([dataset, "--data-root", str(root), "--out", str(tmp_path / "3d"), "--dims", "3", "--like",
                        str(tmp_path / "2d")]) == 0
    description = DATASETS[dataset]
    slices = {r.image_id: r for r in description.find_labelled(root)}
    volumes = {r.image_id: r for r in description.in_dims(3).find_labelled(root)}

    def patients(kind: str, name: str) -> set:
        records, ids = (slices, volumes)[kind == "3d"], splits.read_split(tmp_path / kind / f"{name}.txt")
        return {description.patient_group(records[i]) for i in ids}
    for name in splits.split_file_names():
        name = name.removesuffix(".txt")
        assert patients("2d", name) == patients("3d", name), name
    assert sum(len(splits.read_split(tmp_path / "3d" / f"{n}.txt")) for n in ("test", "val", "train100F")) == \
        len(volumes)


def test_volume_splits_refuse_slice_splits_that_divide_a_patient(rsna_root, tmp_path, capsys):
    assert splits.main(["rsna", "--data-root", str(rsna_root), "--out", str(tmp_path / "2d")]) == 0
    moved = splits.read_split(tmp_path / "2d" / "test.txt")[0]
    with open(tmp_path / "2d" / "val.txt", "a") as f:
        f.write(f"{moved}\n")
    assert splits.main(["rsna", "--data-root", str(rsna_root), "--out", str(tmp_path / "3d"), "--dims", "3",
                        "--like", str(tmp_path / "2d")]) == 2
    assert "in test, val: not one side of a nested split" in capsys.readouterr().err
