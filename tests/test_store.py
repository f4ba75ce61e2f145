"""The compressed, sharded store (`--codec`): codecs within their stated error, shards that tar and WebDataset read,
patients kept in one shard, ranks reading disjoint shards that together cover the data, exact resume across a
shard boundary, decoding a batch on the device, and every kind of damage either rebuilt, skipped and listed, or
refused in one line."""
import errno
import io
import json
import os
import shutil
import tarfile
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, assert_one_line_error, run_in_process
from PIL import Image
from test_distributed import free_port

import mirl.shards
from mirl.cache import dataset_images, open_cache
from mirl.codecs import parse_codec
from mirl.config import RunConfig
from mirl.datasets import ACDC, ISIC, RSNA, ImageDataset
from mirl.errors import InputError, OutputError
from mirl.loaders import EpochSampler, make_loader
from mirl.positives import PairedImages, partner_candidates
from mirl.shards import ShardedImageStore, shard_layout


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio of 8-bit images, by its formula: 10 log10(255^2 / mean squared error)."""
    error = np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255 ** 2 / error)


# each codec and the fidelity it promises on 8-bit images (None: exact); the README gives the measured figures
FIDELITY = {"zstd": None, "png": None, "webp:lossless": None, "jpeg:95": 38.0, "webp:90": 30.0}


@pytest.mark.parametrize("spelling", FIDELITY)
@pytest.mark.parametrize("root_fixture,description", [("rsna_root", RSNA), ("isic_root", ISIC)])
def test_codec_round_trips_within_their_stated_error(request, spelling, root_fixture, description):
    root = request.getfixturevalue(root_fixture)
    records = dataset_images(description, root)[:6]
    codec = parse_codec(spelling)
    for image, _, _ in ImageDataset(records, 32, 0):
        item = image.numpy()
        back = codec.decode(codec.encode(item), item.shape, "uint8")
        assert back.shape == item.shape and back.dtype == np.uint8
        if FIDELITY[spelling] is None:
            np.testing.assert_array_equal(back, item)
        else:
            assert psnr(item, back) >= FIDELITY[spelling]


def test_jpeg_is_what_pillow_decodes_and_zstd_keeps_int16_volumes_exactly():
    codec = parse_codec("jpeg:90")
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(120, 30, (3, 48, 40)), 0, 255).astype(np.uint8)
    data = codec.encode(image)
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(codec.decode(data, image.shape, "uint8"), pillow)
    volume = rng.integers(-1024, 3071, (1, 8, 16, 16)).astype(np.int16)
    zstd = parse_codec("zstd:9")
    np.testing.assert_array_equal(zstd.decode(zstd.encode(volume), volume.shape, "int16"), volume)


def test_codec_spellings_are_settled_and_bad_ones_named():
    assert str(parse_codec("JPEG")) == "jpeg:95" and str(parse_codec("zstd")) == "zstd:3"
    assert str(parse_codec("webp:lossless")) == "webp:lossless" and parse_codec("webp:lossless").lossless
    assert not parse_codec("jpeg:80").lossless and parse_codec("png").lossless
    for bad in ("gif", "jpeg:0", "jpeg:101", "zstd:fast", "raw:1", "png:10"):
        with pytest.raises(InputError):
            parse_codec(bad)


def test_a_compressed_store_is_part_of_the_run_identity_and_needs_a_cache(tmp_path):
    common = dict(data_root=tmp_path, output_dir=tmp_path, split_dir=tmp_path)
    assert "codec" not in RunConfig(**common).identity()  # raw: identities of runs before codecs existed hold
    assert RunConfig(**common, cache=tmp_path, codec="jpeg").identity()["codec"] == "jpeg:95"
    with pytest.raises(InputError, match="--cache"):
        RunConfig(**common, codec="zstd")
    with pytest.raises(InputError, match="volumes"):
        RunConfig(**common, cache=tmp_path, codec="jpeg", dims=3)


def test_shards_close_at_a_patient_boundary():
    groups = ["a"] * 3 + ["b"] * 2 + ["c"] * 7 + ["d"]
    assert shard_layout(groups, target=2, most=5).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3, 4]
    assert shard_layout(groups, target=4, most=100).tolist() == [0] * 5 + [1] * 7 + [2]


def jpeg_store(root, cache_root, codec="jpeg:95", description=RSNA):
    return open_cache(description, root, 32, cache_root, workers=0, codec=codec)


def test_a_store_reads_what_tar_and_webdataset_read_and_keeps_patients_in_one_shard(rsna_root, tmp_path):
    import webdataset
    store = jpeg_store(rsna_root, tmp_path / "cache", "zstd")
    records = dataset_images(RSNA, rsna_root)
    assert isinstance(store, ShardedImageStore) and len(store.shards) > 1
    decoded, stored = ImageDataset(records, 32, 0), ImageDataset(records, 32, 0, store)
    for index in range(0, len(records), 7):  # zstd is lossless: the store holds exactly what decoding gives
        np.testing.assert_array_equal(stored[index][0].numpy(), decoded[index][0].numpy())
    first = store.folder / store.shards[0]
    with tarfile.open(first) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    samples = {sample["__key__"]: sample["zst"] for sample in webdataset.WebDataset(str(first), shardshuffle=False)}
    assert len(members) == len(samples) > 0
    for name, data in members.items():
        row = int(name.split(".")[0])
        assert samples[name.split(".")[0]] == data == store.stored_bytes(row)
        assert store.table[row]["crc"] == zlib.crc32(data)
    patients = {}
    for record in records:
        shard = int(store.shard_of(np.array([store.row(record)]))[0])
        patients.setdefault(RSNA.patient_group(record), set()).add(shard)
    assert all(len(shards) == 1 for shards in patients.values()) and len(patients) > 1


def test_store_reading_is_exact_to_the_position_across_a_shard_boundary(rsna_root, tmp_path):
    store = jpeg_store(rsna_root, tmp_path / "cache")
    records = dataset_images(RSNA, rsna_root)
    dataset = ImageDataset(records, 32, 0, store)
    loader = make_loader(dataset, batch_size=4, workers=0, shuffle=True, drop_last=True, seed=3)
    sampler = loader.sampler
    sampler.start(2)
    whole = [images for images, _, _ in loader]
    order = list(sampler.indices)
    shards = dataset.item_shards()[order]
    boundary = next(i for i in range(1, len(order)) if shards[i] != shards[i - 1] and i % 4)
    first = (boundary // 4) * 4  # a resumed run skips whole batches: start in the batch the boundary is in
    sampler.start(2, first)
    assert sampler.indices == order[first:]
    resumed = [images for images, _, _ in loader]
    assert len(resumed) == len(whole) - first // 4
    for a, b in zip(resumed, whole[first // 4:]):
        assert torch.equal(a, b)


def test_partners_come_from_the_ranks_own_shards(rsna_root, tmp_path, monkeypatch):
    store = jpeg_store(rsna_root, tmp_path / "cache")
    records = RSNA.find_labelled(rsna_root)
    dataset = ImageDataset(records, 32, 0, store)
    shards = dataset.item_shards()
    candidates = partner_candidates(RSNA, records, "patient")
    for this_rank in (0, 1):
        monkeypatch.setattr(mirl.loaders, "rank", lambda: this_rank)
        monkeypatch.setattr(mirl.loaders, "world_size", lambda: 2)
        sampler = EpochSampler(len(records), 0, drop_last=False, partners=candidates, shards=shards)
        mine = set(shards[sampler.indices].tolist())
        for anchor, partner in sampler:
            assert shards[partner] in mine
            assert partner == anchor or partner in candidates[anchor]
        assert sum(partner != anchor for anchor, partner in sampler) > len(sampler) // 2


def read_by_rank(rank: int, port: int, folder: str, records: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    store = mirl.cache.built_cache(__import__("pathlib").Path(folder))
    read: list[int] = []

    class Recording(ImageDataset):
        def __getitem__(self, index):
            read.append(index)
            return super().__getitem__(index)

    loader = make_loader(Recording(records, 32, 0, store), batch_size=3, workers=0, shuffle=True, drop_last=False,
                         seed=5)
    epochs = []
    for epoch in range(2):
        loader.sampler.start(epoch)
        read.clear()
        assert sum(len(ok) for _, _, ok in loader) == len(read)
        epochs.append(list(read))
    json.dump({"epochs": epochs, "shards": loader.dataset.item_shards().tolist()}, open(f"{out}.{rank}", "w"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_that_together_cover_the_data_each_epoch(rsna_root, tmp_path):
    store = jpeg_store(rsna_root, tmp_path / "cache")
    records = dataset_images(RSNA, rsna_root)
    out = str(tmp_path / "read")
    mp.spawn(read_by_rank, args=(free_port(), str(store.folder), records, out), nprocs=2)
    ranks = [json.load(open(f"{out}.{rank}")) for rank in (0, 1)]
    shards = np.array(ranks[0]["shards"])
    for epoch in range(2):
        zero, one = (set(rank["epochs"][epoch]) for rank in ranks)
        assert set(shards[list(zero)]).isdisjoint(shards[list(one)])  # whole shards, each read by one rank
        assert zero | one == set(range(len(records)))  # together: every image, once (a shorter share wraps)
        assert len(ranks[0]["epochs"][epoch]) == len(ranks[1]["epochs"][epoch])  # equal steps: no rank waits
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # a new shard deal and order each epoch


def test_batches_decode_on_the_device_as_the_workers_decode_them(rsna_root, tmp_path):
    """nvJPEG's path, run on the CPU (torchvision's decode_jpeg takes a device): the same pixels as simplejpeg in
    the workers, pairs included, and an undecodable item skipped."""
    store = jpeg_store(rsna_root, tmp_path / "cache")
    records = RSNA.find_labelled(rsna_root)
    candidates = partner_candidates(RSNA, records, "patient")
    on_workers = make_loader(PairedImages(ImageDataset(records, 32, 6, store)), 5, 0, shuffle=True,
                             drop_last=True, seed=1, partners=candidates)
    expected = [batch for batch in on_workers]
    device_store = mirl.cache.built_cache(store.folder).decoding_on(torch.device("cpu"))
    on_device = make_loader(PairedImages(ImageDataset(records, 32, 6, device_store)), 5, 0, shuffle=True,
                            drop_last=True, seed=1, partners=candidates)
    assert isinstance(on_device, mirl.loaders.DeviceDecodingLoader) and len(on_device) == len(on_workers)
    for (images, labels, ok), (want, want_labels, want_ok) in zip(on_device, expected):
        assert images.shape == want.shape and torch.equal(images, want)
        assert torch.equal(labels, want_labels) and torch.equal(ok, want_ok)
    items = [store.stored_bytes(0), b"\xff\xd8 not a jpeg"]
    images, ok = device_store.decode_batch([torch.frombuffer(bytearray(i), dtype=torch.uint8) for i in items],
                                           torch.tensor([True, True]))
    assert ok.tolist() == [True, False] and images[1].sum() == 0


def test_a_corrupted_item_is_skipped_and_listed_and_a_damaged_store_is_rebuilt(rsna_root, tmp_path, capsys):
    store = jpeg_store(rsna_root, tmp_path / "cache")
    records = dataset_images(RSNA, rsna_root)
    row = store.row(records[5])
    entry = store.table[row]
    path = store.folder / store.shards[entry["shard"]]
    data = bytearray(path.read_bytes())
    data[entry["offset"] + 40] ^= 0xFF  # one flipped byte: the shard keeps its size
    path.write_bytes(bytes(data))
    store = jpeg_store(rsna_root, tmp_path / "cache")
    dataset = ImageDataset(records, 32, 0, store)
    assert not dataset[5][2] and dataset[4][2]
    assert "fail their checksum" in dataset.why_unreadable(5)
    for damage in ("cut short", "not in the index", "missing"):
        if damage == "cut short":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size - 1000)
        elif damage == "not in the index":
            shutil.copy(store.folder / store.shards[0], store.folder / "shard-99999.tar")
        else:
            path.unlink()
        store = jpeg_store(rsna_root, tmp_path / "cache")
        assert "is damaged" in capsys.readouterr().err
        assert store.damage(len(records)) is None and ImageDataset(records, 32, 0, store)[5][2]


def test_a_store_of_other_settings_is_refused_and_a_full_disk_leaves_nothing(rsna_root, tmp_path, monkeypatch):
    cache_root = tmp_path / "cache"
    store = jpeg_store(rsna_root, cache_root, "jpeg:90")
    other = jpeg_store(rsna_root, cache_root, "jpeg:80")
    shutil.rmtree(other.folder)
    store.folder.rename(other.folder)  # a store copied under another store's name
    with pytest.raises(InputError, match="other settings.*jpeg:90"):
        jpeg_store(rsna_root, cache_root, "jpeg:80")

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(mirl.shards.ShardWriter, "add", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        jpeg_store(rsna_root, tmp_path / "full", "zstd")
    assert list((tmp_path / "full").iterdir()) == []  # the partial store is gone


def test_an_unreadable_source_is_stored_as_unreadable_and_listed_at_build(rsna_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(rsna_root, root)
    victim = sorted((root / "stage_2_train").glob("*.dcm"))[3]
    victim.write_bytes(b"not a DICOM")
    assert mirl.cache.main(["rsna", "--data-root", str(root), "--cache", str(tmp_path / "cache"), "--image-size",
                            "32", "--codec", "png", "--workers", "0"]) == 0
    assert "1 unreadable (listed in" in capsys.readouterr().out
    store = mirl.cache.built_cache(next((tmp_path / "cache").iterdir()))
    rows = (store.folder / "unreadable.csv").read_text().splitlines()
    assert rows[0] == "source,reason" and len(rows) == 2 and rows[1].startswith(f"{victim},")
    assert not store.readable[store.rows[str(victim)]] and store.readable.sum() == len(store.readable) - 1


def test_volumes_store_in_zstd(acdc_root, tmp_path):
    from mirl.spatial import InputSpace
    from mirl.volumes import VolumeGeometry
    description = ACDC.in_dims(3)
    inputs = InputSpace(32, VolumeGeometry((4, 16, 16), None, "grey"))
    store = open_cache(description, acdc_root, inputs, tmp_path / "cache", workers=0, codec="zstd")
    records = dataset_images(description, acdc_root)
    decoded, stored = inputs.dataset(records, 0), inputs.dataset(records, 0, store)
    for index in (0, len(records) - 1):
        np.testing.assert_array_equal(stored[index][0].numpy(), decoded[index][0].numpy())
    with pytest.raises(InputError, match="zstd or raw"):
        open_cache(description, acdc_root, inputs, tmp_path / "cache", workers=0, codec="png")


def test_codec_flags_refused_in_one_line(rsna_root, tmp_path):
    common = ["--data-root", rsna_root, "--output-dir", tmp_path / "run", "--split-dir", tmp_path / "splits", *TINY]
    assert_one_line_error(run_in_process("RSNA_MoCo", "trainMoCoV2.py", *common, "--codec", "jpeg"), "--cache")
    assert_one_line_error(run_in_process("RSNA_MoCo", "trainMoCoV2.py", *common, "--codec", "gif",
                                         "--cache", tmp_path / "c"), "--codec")
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_run_from_a_store_killed_mid_epoch_resumes_to_identical_weights(rsna_root, tmp_path):
    """MoCo v2 from a JPEG store with same-patient positives, killed at a state in its second epoch (past several
    shard boundaries) and resumed, equals the unbroken run; fine-tuning reads a zstd store; the run resumed with
    another codec is refused in one line."""
    from test_resume import PRETRAIN, assert_identical, killed_then_resumed, weights
    common = ["--data-root", rsna_root, "--split-dir", tmp_path / "splits", "--cache", tmp_path / "cache"]
    stored = [*common, *PRETRAIN, "--codec", "jpeg", "--positives", "patient"]
    result = run_in_process("RSNA_MoCo", "trainMoCoV2.py", *stored, "--output-dir", tmp_path / "unbroken")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "unbroken" / "config.json").read_text())
    assert config["identity"]["codec"] == "jpeg:95" and config["images_with_a_partner"] > 0
    killed_then_resumed("trainMoCoV2.py", stored, tmp_path / "resumed", "state-e0001-b000002.pth")
    assert_identical(weights(tmp_path / "unbroken" / "checkpoint.pth"),
                     weights(tmp_path / "resumed" / "checkpoint.pth"))
    result = run_in_process("RSNA_MoCo", "MoCov2_downstream.py", "--output-dir", tmp_path / "down", *common, *TINY,
                            "--pretrained", tmp_path / "unbroken" / "checkpoint.pth", "--codec", "zstd:1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name.split("-")[2] for p in (tmp_path / "cache").iterdir()) == ["jpeg95", "zstd1"]
    changed = [*stored[:-4], "--codec", "jpeg:90", "--positives", "patient"]
    result = run_in_process("RSNA_MoCo", "trainMoCoV2.py", *changed, "--output-dir", tmp_path / "resumed",
                            "--resume", "auto", "--epochs", "3")
    assert_one_line_error(result, "codec")
