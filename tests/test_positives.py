"""Same-patient positives (MICLe): pairs never cross a patient, study pairs are neighbouring slices of one
series, the test split never enters a pair, and every method pretrains with them."""
import json
from collections import Counter

import pydicom
import pytest
import torch
from conftest import TINY, run_in_process

from mirl.config import PretrainConfig
from mirl.datasets import ACDC, ISIC, RSNA, ImageDataset
from mirl.loaders import EpochSampler, make_loader
from mirl.positives import PairedImages, partner_candidates
from mirl.pretrain import pretraining_records


def pretraining_set(description, root, split_dir):
    config = PretrainConfig(method="mocov2", data_root=root, split_dir=split_dir, output_dir=split_dir, batch_size=2)
    return pretraining_records(description, config)[0]


def test_patient_pairs_stay_within_a_patient_and_cover_its_images(acdc_root, tmp_path):
    records = pretraining_set(ACDC, acdc_root, tmp_path / "splits")
    candidates = partner_candidates(ACDC, records, "patient")
    for i, partners in enumerate(candidates):
        assert partners and i not in partners
        assert {records[j].group for j in partners} == {records[i].group}
    sizes = Counter(r.group for r in records)
    assert all(len(candidates[i]) == sizes[r.group] - 1 for i, r in enumerate(records))


def test_study_pairs_are_the_neighbouring_slices_of_one_volume_and_frame(acdc_root, tmp_path):
    records = pretraining_set(ACDC, acdc_root, tmp_path / "splits")
    candidates = partner_candidates(ACDC, records, "study")
    for i, partners in enumerate(candidates):
        assert 1 <= len(partners) <= 2
        for j in partners:
            assert records[j].path == records[i].path
            assert records[j].index[1:] == records[i].index[1:]  # the same frame of a cine
            assert abs(records[j].index[0] - records[i].index[0]) == 1  # the slice above or below


def test_rsna_study_pairs_are_adjacent_slices_of_one_series(rsna_root, tmp_path):
    records = pretraining_set(RSNA, rsna_root, tmp_path / "splits")
    candidates = partner_candidates(RSNA, records, "study")
    headers = {r.image_id: pydicom.dcmread(r.path, stop_before_pixels=True) for r in records}
    assert sum(map(bool, candidates)) == len(records)  # every sample slice has a neighbour
    for i, partners in enumerate(candidates):
        mine = headers[records[i].image_id]
        for j in partners:
            other = headers[records[j].image_id]
            assert other.SeriesInstanceUID == mine.SeriesInstanceUID
            assert abs(int(other.InstanceNumber) - int(mine.InstanceNumber)) == 1


def test_lesion_pairs_and_the_test_split_never_enter_a_pair(isic_root, tmp_path):
    records = pretraining_set(ISIC, isic_root, tmp_path / "splits")
    test = set((tmp_path / "splits" / "test.txt").read_text().split())
    assert test and not test & {r.image_id for r in records}  # pretraining images exclude the test split
    candidates = partner_candidates(ISIC, records, "patient")
    for i, partners in enumerate(candidates):
        assert all(records[j].group == records[i].group for j in partners)
    assert any(candidates) and not any(records[j].image_id in test for p in candidates for j in p)


def test_the_sampler_draws_partners_reproducibly_and_falls_back_to_the_anchor():
    partners = [[1, 2], [0], [], [4], [3]]
    sampler = EpochSampler(5, seed=7, drop_last=False, partners=partners)
    sampler.start(3)
    pairs = list(sampler)
    assert sorted(a for a, _ in pairs) == [0, 1, 2, 3, 4]
    assert all((p in partners[a]) or (not partners[a] and p == a) for a, p in pairs)
    again = EpochSampler(5, seed=7, drop_last=False, partners=partners)
    again.start(3)
    assert list(again) == pairs
    firsts = set()
    for epoch in range(20):
        sampler.start(epoch)
        firsts.add(dict(sampler)[0])
    assert firsts == {1, 2}  # anchor 0 meets both of its partners over the epochs


def test_a_paired_batch_holds_anchor_and_partner_images(isic_root, tmp_path):
    records = pretraining_set(ISIC, isic_root, tmp_path / "splits")
    candidates = partner_candidates(ISIC, records, "patient")
    loader = make_loader(PairedImages(ImageDataset(records, 32, 9)), 4, 0, shuffle=True, drop_last=True, seed=0,
                         partners=candidates)
    images, labels, ok = next(iter(loader))
    assert images.shape == (4, 2, 3, 64, 64) and ok.all()
    anchors, partners = loader.sampler.indices[:4], loader.sampler.paired_with[:4]
    for row, (a, p) in enumerate(zip(anchors, partners)):
        torch.testing.assert_close(images[row, 1], ImageDataset(records, 32, 9)[p][0])
        assert (a == p) == (not candidates[a])


@pytest.mark.slow
@pytest.mark.parametrize("script", ["trainMoCoV2.py", "trainBYOL.py"])
def test_pretraining_with_patient_positives(isic_root, tmp_path, script):
    result = run_in_process("ISIC", script, "--data-root", isic_root, "--split-dir", tmp_path / "splits",
                        "--output-dir", tmp_path / "out", *TINY, "--batch-size", "8", "--knn-images", "0",
                        "--positives", "patient")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["positives"] == "patient" and 0 < config["images_with_a_partner"] <= config["images"]
