"""The decoded-image cache: every slice decoded once (HU, windows, resize) into a memory-mapped uint8 array.

Decoding a DICOM costs about a millisecond and a JPEG more; at GPU rates no CPU can do it every epoch.
The cache holds one C x S x S uint8 image per source image of a dataset (S = 2 x the input size, so
crops come from source resolution), or one 1 x 2D x 2H x 2W int16 volume per volume (`--dims 3`), in a
`.npy` file that training reads through a memory map, so later epochs and later runs read at memory speed and
a process's memory does not grow with the dataset (the operating system's page cache holds what is hot).

With `--codec` other than raw the same items are encoded (zstd, PNG, WebP, JPEG: `mirl.codecs`) into tar shards
with an index (`mirl.shards`): the store a cluster streams, each rank reading its own shards.

A cache lives in `CACHE_ROOT/<dataset>-<size>px-[<codec>-]<key>/`, where the key hashes the preprocessing settings
(the codec's too) and every source file's path, slice, size and modification time: change a file, the image size
or the reader and the next run builds a new cache instead of reading stale pixels. It is written into a
temporary folder and renamed when complete, so an interrupted build is never mistaken for a cache.

    python -m mirl.cache rsna --data-root DIR --cache DIR --image-size 224
    python -m mirl.cache rsna --data-root DIR --cache DIR --image-size 224 --codec jpeg:95   # 64 KB a slice
    python -m mirl.cache rsna --data-root DIR --cache DIR --dims 3 --volume-size 32 128 128   # volumes
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mirl import distributed
from mirl.codecs import RAW, Codec, codec_flag, parse_codec
from mirl.config import SPATIAL_DIMS, RunConfig
from mirl.datasets import DATASETS, DatasetDescription, ImageRecord, source_files, source_key
from mirl.edge import guarded
from mirl.errors import InputError, OutputError
from mirl.flags import OneLineParser, image_size, non_negative_int, positive_float, volume_side
from mirl.run_files import progress, readable_text
from mirl.shards import ShardedImageStore, ShardWriter, records_per_shard, shard_layout, shard_name
from mirl.spatial import InputSpace, input_space, settled_inputs

# Bump when decoding changes (windows, normalisation, resizing): old caches then stop matching.
# Format 2: images kept at source_side(image_size), the shorter side resized and the longer centre-cropped.
CACHE_FORMAT = 2
SHARD_FORMAT = 1  # bump when the shard layout changes (the tar members, the index, the patient order)
IMAGES_FILE, READABLE_FILE, INDEX_FILE = "images.npy", "readable.npy", "index.json"
UNREADABLE_FILE = "unreadable.csv"  # the sources a build could not read, and why


def dataset_images(description: DatasetDescription, root: Path) -> list[ImageRecord]:
    """Every image any run on this dataset may read: the labelled ones and the pretraining ones."""
    labelled = description.find_labelled(root) if description.has_labels(root) else None
    records = [*(labelled or []), *description.pretraining_images(root, labelled)]
    unique = {source_key(r): r for r in records}
    return [unique[k] for k in sorted(unique)]


def cache_settings(description: DatasetDescription, inputs: InputSpace, codec: Codec) -> dict[str, object]:
    """What a cache or store is built with (its index records them, its key hashes them): the decoding, and for a
    compressed store the codec and the shard format. A raw cache's settings are those of every MIRL before codecs."""
    settings = {"format": CACHE_FORMAT, "dataset": description.name, **inputs.cache_settings()}
    return settings if codec.is_raw else {**settings, "codec": str(codec), "shard_format": SHARD_FORMAT}


def cache_key(records: list[ImageRecord], settings: dict[str, object]) -> str:
    digest = hashlib.sha256(json.dumps(settings).encode())
    for record in records:
        for path in source_files(record):
            stat = path.stat()
            # the change time too: a copy that keeps size and modification time (cp -p, rsync -t) still changes
            # it, at no cost beyond the stat already made; hashing contents would read every file at every start
            digest.update(f"{source_key(record) if path == record.path else path}|{stat.st_size}|"
                          f"{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


class DecodedImageCache:
    """A built cache: `row(record)` finds a source image, `read(row)` gives its uint8 pixels and whether
    its source was readable.

    The memory map is opened lazily in each process, so the object pickles cheaply into DataLoader
    workers (pickling an open np.memmap would copy the whole array).
    """

    decode_on = None  # items always decode where they are read
    codec, shards = RAW, ()  # uncompressed, one array

    def __init__(self, folder: Path, index: dict) -> None:
        self.folder = folder
        self.rows = {key: row for row, key in enumerate(index["sources"])}
        self.readable = np.load(folder / READABLE_FILE)
        self._images: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.folder / IMAGES_FILE, mmap_mode="r")
        return self._images

    def row(self, record: ImageRecord) -> int | None:
        return self.rows.get(source_key(record))

    def read(self, row: int) -> tuple[torch.Tensor, bool]:
        return torch.from_numpy(np.array(self.images[row])), bool(self.readable[row])

    @property
    def bytes_on_disk(self) -> int:
        return self.images.nbytes

    def shard_of(self, rows: np.ndarray) -> None:
        """None: one memory-mapped array, no shards."""
        return None

    def decoding_on(self, device: torch.device | None) -> DecodedImageCache:
        return self

    def why_unreadable(self, row: int) -> str:
        return "unreadable in the decoded-image cache"

    def damage(self, images: int) -> str | None:
        """What is wrong with the built cache, None when it is whole."""
        if len(self.rows) == len(self.readable) == len(self.images) == images:
            return None
        return f"{len(self.images)} images where {images} are expected"


class EncodedItems(Dataset):
    """A Dataset's items encoded by a codec, in the loader's workers (None for an unreadable source)."""

    def __init__(self, items: Dataset, codec: Codec) -> None:
        self.items, self.codec = items, codec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> bytes | None:
        item, _, readable = self.items[index]
        return self.codec.encode(item.numpy()) if readable else None


class PatientKeys(Dataset):
    """Each record's patient (its own source key when the reader knows none), read in the loader's workers: a
    DICOM's patient is in its header."""

    def __init__(self, description: DatasetDescription, records: list[ImageRecord]) -> None:
        self.description, self.records = description, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> str:
        record = self.records[index]
        try:
            group = self.description.patient_group(record)
        except Exception:  # an unreadable file: its own patient (decoding lists it)
            group = None
        return group or f"image:{source_key(record)}"


def build_cache(records: list[ImageRecord], inputs: InputSpace, folder: Path, workers: int,
                settings: dict[str, object], codec: Codec = RAW,
                description: DatasetDescription | None = None) -> None:
    """Decode every record once with `workers` processes and write the cache folder atomically: one memory-mapped
    array (raw), or shards of items encoded by `codec` with rows in patient order (`description` says patients)."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        if codec.is_raw:
            index, readable = write_array(records, inputs, partial, workers)
        else:
            records, index, readable = write_shards(records, inputs, partial, workers, codec, description)
        (partial / INDEX_FILE).write_text(json.dumps({**settings, **index,
                                                      "sources": [source_key(r) for r in records]}))
        list_unreadable(records, inputs, readable, partial / UNREADABLE_FILE)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def decoded_items(records: list[ImageRecord], inputs: InputSpace) -> Dataset:
    """The records' pixels only, as a cache stores them (labels live in the readers)."""
    return inputs.dataset([replace(r, labels=None) for r in records], num_classes=0)


def build_batch_size(inputs: InputSpace) -> int:
    """Items a build's worker decodes per batch: images in dozens, volumes (hundreds of slices each) a few."""
    return 64 if inputs.volume is None else 4


def write_array(records: list[ImageRecord], inputs: InputSpace, folder: Path, workers: int
                ) -> tuple[dict, np.ndarray]:
    """The raw cache: every item decoded into one memory-mapped array, and which sources were readable."""
    shape, dtype = inputs.stored_item
    images = np.lib.format.open_memmap(folder / IMAGES_FILE, mode="w+", dtype=dtype, shape=(len(records), *shape))
    readable = np.zeros(len(records), dtype=bool)
    row = 0
    loader = worker_loader(decoded_items(records, inputs), workers, build_batch_size(inputs))
    for batch, _, ok in progress(loader, desc=f"decoding into {folder.name}", unit="batch"):
        images[row:row + len(batch)] = batch.numpy()
        readable[row:row + len(batch)] = ok.numpy()
        row += len(batch)
    images.flush()
    del images
    np.save(folder / READABLE_FILE, readable)
    return {}, readable


def write_shards(records: list[ImageRecord], inputs: InputSpace, folder: Path, workers: int, codec: Codec,
                 description: DatasetDescription) -> tuple[list[ImageRecord], dict, np.ndarray]:
    """The compressed store: records put in patient order (their patients read by the workers), decoded and
    encoded by the workers, written into shards that close at patient boundaries. Returns the records in the
    store's order, the index's entries and which sources were readable."""
    groups = list(itertools.chain.from_iterable(worker_loader(PatientKeys(description, records), workers, 256,
                                                              list)))
    order = sorted(range(len(records)), key=lambda i: (groups[i], source_key(records[i])))
    records, groups = [records[i] for i in order], [groups[i] for i in order]
    shape, dtype = inputs.stored_item
    target, most = records_per_shard(len(records), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer = ShardWriter(folder, codec, shard_layout(groups, target, most))
    loader = worker_loader(EncodedItems(decoded_items(records, inputs), codec), workers, build_batch_size(inputs),
                           list)
    for encoded in progress(loader, desc=f"encoding into {folder.name}", unit="batch"):
        for data in encoded:
            writer.add(data)
    rows = writer.close()
    return records, {"item": {"shape": list(shape), "dtype": str(np.dtype(dtype))}, "records_per_shard": [target, most],
                     "shards": [{"file": shard_name(i), "bytes": size} for i, size in enumerate(writer.sizes)]}, \
        rows["readable"]


def list_unreadable(records: list[ImageRecord], inputs: InputSpace, readable: np.ndarray, path: Path) -> None:
    """List the sources that could not be read, with their readers' reasons, beside the cache (`unreadable.csv`):
    skipped, never silently. Runs list them again in their own `skipped.csv` when they meet them."""
    bad = np.flatnonzero(~readable)
    if len(bad) == 0:
        return
    items = decoded_items(records, inputs)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("source", "reason"), *((readable_text(source_key(records[i])),
                                                           readable_text(items.why_unreadable(int(i)))) for i in bad)])


def worker_loader(dataset: Dataset, workers: int, batch_size: int,
                  collate: Callable[[list], object] | None = None) -> DataLoader:
    """The items of `dataset` in order, made by `workers` processes. The loader has a generator of its own: its
    worker seeds must not come from the global stream, which a run has seeded for its training (the same seed
    gives the same weights whether or not the cache was built)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))


def open_cache(description: DatasetDescription, root: Path, inputs: InputSpace | int, cache_root: Path,
               workers: int, codec: Codec | str = RAW) -> DecodedImageCache | ShardedImageStore:
    """The dataset's cache for these inputs (an int: 2-D images of that side), built first if it does not exist
    (by rank 0 under DDP): the memory-mapped array (`codec` raw) or a compressed, sharded store.

    The cache names images by their full path with links resolved, so one data folder named by another
    spelling (relative, through a link) reads the same cache; callers list their records from the resolved
    root (run configs resolve their paths). Under torchrun every rank learns rank 0's outcome, a failure
    included: no rank waits for one that has stopped."""
    root = root.resolve()
    inputs = InputSpace(inputs) if isinstance(inputs, int) else inputs
    codec = parse_codec(codec)
    codec.check_item(*inputs.stored_item)
    records = dataset_images(description, root)
    if not records:
        raise InputError(f"no images found under {root}; {description.data_hint}")
    settings = cache_settings(description, inputs, codec)
    codec_part = "" if codec.is_raw else f"{codec.name}{codec.setting}-"
    folder = cache_root / f"{description.name}-{inputs.cache_name()}-{codec_part}{cache_key(records, settings)}"
    cache, failure = None, None
    if distributed.is_main_process():
        try:
            cache = intact_cache(folder, len(records), settings)
            if cache is None:
                cache_root.mkdir(parents=True, exist_ok=True)
                build_cache(records, inputs, folder, workers, settings, codec, description)
        except OSError as error:  # a folder of someone else's, a read-only or full disk
            failure = OutputError(f"--cache {cache_root} cannot be written or read "
                                  f"({error.strerror or type(error).__name__})")
        except InputError as error:
            failure = error
    failure = distributed.gather_objects(failure)[0]
    if failure is not None:
        raise failure
    return cache or built_cache(folder)


def built_cache(folder: Path, index: dict | None = None) -> DecodedImageCache | ShardedImageStore:
    """The cache or store built in `folder` (its index, when already read), opened as what the index says it is."""
    index = index or json.loads((folder / INDEX_FILE).read_text())
    return DecodedImageCache(folder, index) if "codec" not in index else ShardedImageStore(folder, index)


def intact_cache(folder: Path, images: int, settings: dict[str, object]
                 ) -> DecodedImageCache | ShardedImageStore | None:
    """The cache built in `folder`, opened; None when there is none, or when it is damaged (a part deleted, an
    array or shard cut short, a shard the index does not name), which a warning says and which is removed to be
    built again. A cache built with other settings than its name says (copied or renamed by hand) is refused."""
    if not folder.is_dir():
        return None
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
        changed = [key for key, value in settings.items() if key != "dataset" and index.get(key) != value]
        if changed:
            raise InputError(f"the cache {folder} was built with other settings than its name says "
                             f"({', '.join(f'{k} {index.get(k)!r}, not {settings[k]!r}' for k in changed[:3])}); "
                             "remove it and the next run builds it again")
        cache = built_cache(folder, index)
        damage = cache.damage(images)
        if damage is None:
            return cache
    except (OSError, ValueError, KeyError) as error:  # a missing file or entry, an array shorter than its header says
        damage = (str(error).splitlines() or [type(error).__name__])[0][:120]
    print(f"warning: the cache {folder} is damaged ({damage}); building it again", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m mirl.cache",
                           description="Decode a dataset once into the memory-mapped cache that --cache reads.")
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True, help="folder that holds the caches")
    parser.add_argument("--image-size", type=image_size, default=224)
    parser.add_argument("--dims", type=int, choices=SPATIAL_DIMS, default=2, help="3: the dataset's volumes")
    parser.add_argument("--volume-size", type=volume_side, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="--dims 3: as the runs that will read it (default: the dataset's)")
    parser.add_argument("--voxel-size", type=positive_float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="--dims 3: as the runs that will read it (default: the dataset's)")
    parser.add_argument("--codec", type=codec_flag, default="raw",
                        help="raw: the memory-mapped array; zstd[:LEVEL], png[:LEVEL], webp[:QUALITY|lossless], "
                             "jpeg[:QUALITY]: a compressed, sharded store (README, Data at scale)")
    parser.add_argument("--workers", type=non_negative_int, default=os.cpu_count() or 1,
                        help="decoding processes (all cores)")
    args = parser.parse_args(argv)

    def build() -> None:
        description = DATASETS[args.dataset].in_dims(args.dims)
        description.check_root(args.data_root)
        config = settled_inputs(RunConfig(data_root=args.data_root, output_dir=args.cache, split_dir=args.cache,
                                          image_size=args.image_size, dims=args.dims, volume_size=args.volume_size,
                                          voxel_size=args.voxel_size), description)
        cache = open_cache(description, args.data_root, input_space(config, description), args.cache, args.workers,
                           args.codec)
        unreadable = int((~cache.readable).sum())
        shards = f" in {len(cache.shards)} shards of {cache.codec}" if isinstance(cache, ShardedImageStore) else ""
        listed = f" (listed in {cache.folder / UNREADABLE_FILE})" if unreadable else ""
        print(f"{cache.folder}: {len(cache.readable)} images{shards}, {unreadable} unreadable{listed}")
    return guarded(build)


if __name__ == "__main__":
    sys.exit(main())
