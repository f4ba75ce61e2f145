"""The decoded-image cache: every slice decoded once (HU, windows, resize) into a memory-mapped uint8 array.

Decoding a DICOM costs about a millisecond and a JPEG more; at GPU rates no CPU can do it every epoch.
The cache holds one C x S x S uint8 image per source image of a dataset (S = 2 x the input size, so
crops come from source resolution), or one 1 x 2D x 2H x 2W int16 volume per volume (`--dims 3`), in a
`.npy` file that training reads through a memory map, so later epochs and later runs read at memory speed and
a process's memory does not grow with the dataset (the operating system's page cache holds what is hot).

A cache lives in `CACHE_ROOT/<dataset>-<size>px-<key>/`, where the key hashes the preprocessing settings
and every source file's path, slice, size and modification time: change a file, the image size or the
reader and the next run builds a new cache instead of reading stale pixels. It is written into a
temporary folder and renamed when complete, so an interrupted build is never mistaken for a cache.

    python -m mirl.cache rsna --data-root DIR --cache DIR --image-size 224
    python -m mirl.cache rsna --data-root DIR --cache DIR --dims 3 --volume-size 32 128 128   # volumes
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mirl import distributed
from mirl.config import SPATIAL_DIMS, RunConfig
from mirl.datasets import DATASETS, DatasetDescription, ImageRecord
from mirl.edge import guarded
from mirl.errors import InputError, OutputError
from mirl.flags import OneLineParser, image_size, non_negative_int, positive_float, volume_side
from mirl.run_files import progress
from mirl.spatial import InputSpace, input_space, settled_inputs

# Bump when decoding changes (windows, normalisation, resizing): old caches then stop matching.
# Format 2: images kept at source_side(image_size), the shorter side resized and the longer centre-cropped.
CACHE_FORMAT = 2
IMAGES_FILE, READABLE_FILE, INDEX_FILE = "images.npy", "readable.npy", "index.json"


def source_key(record: ImageRecord) -> str:
    """How a cache names one source image: its file and, for a volume, the slice and frame; a DICOM series by its
    first file and a digest of all of them."""
    slices = getattr(record, "slices", ())
    if slices:
        return f"{record.path}#series-{hashlib.sha256('|'.join(map(str, slices)).encode()).hexdigest()[:12]}"
    return f"{record.path}#{record.index}" if record.index else str(record.path)


def source_files(record: ImageRecord) -> tuple[Path, ...]:
    """Every file a record's pixels come from."""
    return getattr(record, "slices", ()) or (record.path,)


def dataset_images(description: DatasetDescription, root: Path) -> list[ImageRecord]:
    """Every image any run on this dataset may read: the labelled ones and the pretraining ones."""
    labelled = description.find_labelled(root) if description.has_labels(root) else None
    records = [*(labelled or []), *description.pretraining_images(root, labelled)]
    unique = {source_key(r): r for r in records}
    return [unique[k] for k in sorted(unique)]


def cache_key(description: DatasetDescription, records: list[ImageRecord], inputs: InputSpace) -> str:
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "dataset": description.name,
                                        **inputs.cache_settings()}).encode())
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

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = json.loads((folder / INDEX_FILE).read_text())
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


def build_cache(records: list[ImageRecord], inputs: InputSpace, folder: Path, workers: int) -> None:
    """Decode every record once with `workers` processes and write the cache folder atomically."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    shape, dtype = inputs.stored_item
    try:
        images = np.lib.format.open_memmap(partial / IMAGES_FILE, mode="w+", dtype=dtype,
                                           shape=(len(records), *shape))
        readable = np.zeros(len(records), dtype=bool)
        unlabelled = [replace(r, labels=None) for r in records]  # pixels only: labels live in the readers
        # a generator of its own: the loader's worker seeds must not come from the global stream, which a run
        # has seeded for its training (the same seed gives the same weights whether or not the cache was built)
        loader = DataLoader(inputs.dataset(unlabelled, num_classes=0), batch_size=64 if inputs.volume is None else 4,
                            num_workers=workers, generator=torch.Generator().manual_seed(0))
        row = 0
        for batch, _, ok in progress(loader, desc=f"decoding into {folder.name}", unit="batch"):
            images[row:row + len(batch)] = batch.numpy()
            readable[row:row + len(batch)] = ok.numpy()
            row += len(batch)
        images.flush()
        del images
        np.save(partial / READABLE_FILE, readable)
        (partial / INDEX_FILE).write_text(json.dumps({"format": CACHE_FORMAT, **inputs.cache_settings(),
                                                      "sources": [source_key(r) for r in records]}))
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def open_cache(description: DatasetDescription, root: Path, inputs: InputSpace | int, cache_root: Path,
               workers: int) -> DecodedImageCache:
    """The dataset's cache for these inputs (an int: 2-D images of that side), built first if it does not exist
    (by rank 0 under DDP).

    The cache names images by their full path with links resolved, so one data folder named by another
    spelling (relative, through a link) reads the same cache; callers list their records from the resolved
    root (run configs resolve their paths)."""
    root = root.resolve()
    inputs = InputSpace(inputs) if isinstance(inputs, int) else inputs
    records = dataset_images(description, root)
    if not records:
        raise InputError(f"no images found under {root}; {description.data_hint}")
    folder = cache_root / f"{description.name}-{inputs.cache_name()}-{cache_key(description, records, inputs)}"
    cache = None
    if distributed.is_main_process():
        try:
            cache = intact_cache(folder, len(records))
            if cache is None:
                cache_root.mkdir(parents=True, exist_ok=True)
                build_cache(records, inputs, folder, workers)
        except OSError as error:  # a folder of someone else's, a read-only or full disk
            raise OutputError(f"--cache {cache_root} cannot be written or read "
                              f"({error.strerror or type(error).__name__})") from None
    distributed.barrier()
    return cache or DecodedImageCache(folder)


def intact_cache(folder: Path, images: int) -> DecodedImageCache | None:
    """The cache built in `folder`, opened; None when there is none, or when it is damaged (a part deleted, an
    array cut short), which a warning says and which is removed to be built again."""
    if not folder.is_dir():
        return None
    try:
        cache = DecodedImageCache(folder)
        if len(cache.rows) == len(cache.readable) == len(cache.images) == images:
            return cache
        damage = f"{len(cache.images)} images where {images} are expected"
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
    parser.add_argument("--workers", type=non_negative_int, default=os.cpu_count() or 1,
                        help="decoding processes (all cores)")
    args = parser.parse_args(argv)

    def build() -> None:
        description = DATASETS[args.dataset].in_dims(args.dims)
        description.check_root(args.data_root)
        config = settled_inputs(RunConfig(data_root=args.data_root, output_dir=args.cache, split_dir=args.cache,
                                          image_size=args.image_size, dims=args.dims, volume_size=args.volume_size,
                                          voxel_size=args.voxel_size), description)
        cache = open_cache(description, args.data_root, input_space(config, description), args.cache, args.workers)
        unreadable = int((~cache.readable).sum())
        print(f"{cache.folder}: {len(cache.readable)} images, {unreadable} unreadable")
    return guarded(build)


if __name__ == "__main__":
    sys.exit(main())
