"""The decoded-image cache: the same pixels as decoding, built once, rebuilt when a source changes,
unreadable files remembered as unreadable, and a training script reading it."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_in_process

import mirl.datasets
from mirl.cache import dataset_images, open_cache
from mirl.datasets import ACDC, RSNA, ImageDataset


@pytest.mark.parametrize("description,root_fixture", [(RSNA, "rsna_root"), (ACDC, "acdc_root")])
def test_cached_pixels_equal_decoded_pixels(request, tmp_path, description, root_fixture):
    root = request.getfixturevalue(root_fixture)
    cache = open_cache(description, root, 32, tmp_path / "cache", workers=0)
    records = dataset_images(description, root)
    assert len(cache.readable) == len(records) and cache.readable.all()
    decoded, cached = ImageDataset(records, 32, 0), ImageDataset(records, 32, 0, cache)
    for index in np.random.default_rng(0).choice(len(records), size=8, replace=False):
        np.testing.assert_array_equal(cached[index][0].numpy(), decoded[index][0].numpy())


def test_second_open_decodes_nothing(rsna_root, tmp_path, monkeypatch):
    first = open_cache(RSNA, rsna_root, 32, tmp_path / "cache", workers=0)

    def no_decoding(record):
        raise AssertionError("the cache was rebuilt")
    monkeypatch.setattr(mirl.datasets, "decode_record", no_decoding)
    second = open_cache(RSNA, rsna_root, 32, tmp_path / "cache", workers=0)
    assert second.folder == first.folder
    records = dataset_images(RSNA, rsna_root)
    assert ImageDataset(records, 32, 0, second)[0][2]


def test_one_data_folder_named_another_way_reads_the_same_cache(rsna_root, tmp_path, monkeypatch):
    """A relative path and a link to the data folder are the same data: no second full copy is built."""
    first = open_cache(RSNA, rsna_root, 32, tmp_path / "cache", workers=0)
    (tmp_path / "link").symlink_to(rsna_root, target_is_directory=True)
    monkeypatch.chdir(rsna_root.parent)
    for spelling in (Path(rsna_root.name), tmp_path / "link", Path(".") / rsna_root.name / ".." / rsna_root.name):
        assert open_cache(RSNA, spelling, 32, tmp_path / "cache", workers=0).folder == first.folder
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_changed_source_or_size_makes_a_new_cache_and_bad_files_stay_unreadable(rsna_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(rsna_root, root)
    before = open_cache(RSNA, root, 32, tmp_path / "cache", workers=0)
    assert open_cache(RSNA, root, 40, tmp_path / "cache", workers=0).folder != before.folder
    victim = sorted((root / "stage_2_train").glob("*.dcm"))[3]
    victim.write_bytes(b"not a DICOM")
    os.utime(victim, ns=(0, 0))
    after = open_cache(RSNA, root, 32, tmp_path / "cache", workers=0)
    assert after.folder != before.folder
    assert (~after.readable).sum() == 1
    assert not after.readable[after.rows[str(victim)]]


@pytest.mark.slow
def test_scripts_train_from_the_cache(rsna_root, tmp_path):
    cache_root = tmp_path / "cache"
    result = run_in_process("RSNA_MoCo", "trainSimCLR.py", "--data-root", rsna_root, "--output-dir", tmp_path / "run",
                        "--split-dir", tmp_path / "splits", "--cache", cache_root, *TINY)
    assert result.returncode == 0, result.stderr
    built = list(cache_root.iterdir())
    assert len(built) == 1 and (built[0] / "images.npy").is_file()
    result = run_in_process("RSNA_MoCo", "SimCLR_downstream.py", "--data-root", rsna_root, "--output-dir",
                        tmp_path / "down", "--split-dir", tmp_path / "splits", "--pretrained",
                        tmp_path / "run" / "checkpoint.pth", "--cache", cache_root, *TINY)
    assert result.returncode == 0, result.stderr
    assert list(cache_root.iterdir()) == built
