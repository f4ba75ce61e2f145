"""The compressed store: decoded items encoded by a codec (`mirl.codecs`) into tar shards that ranks read whole.

A store of N items is a folder of `shard-00000.tar`, `shard-00001.tar`, ... and an index. The shards are plain
POSIX tar files in WebDataset's layout (one member `<row>.<suffix>` per item), so `tar`, WebDataset or any object
store tool reads and copies them; the index (`index.json`: settings, sources, shard sizes; `rows.npy`: each row's
shard, byte offset, length, CRC-32 and whether its source was readable) gives random access to any item with one
`pread`, which WebDataset's sequential reader does not: MIRL's epoch order (`mirl.loaders.EpochSampler`) is exact
to the position for resume and draws same-patient partners, and both need to read a chosen item.

Rows are ordered by patient (then by source), and a shard closes at the first patient boundary after
`records_per_shard` rows: a patient's images share a shard, so a rank that reads only its own shards still finds
each image's same-patient partners. A corrupted item (its CRC) reads as unreadable and is skipped and listed, as an
unreadable source file is; a shard cut short or missing is found when the store is opened.
"""
from __future__ import annotations

import copy
import io
import os
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from mirl.codecs import Codec, parse_codec
from mirl.datasets import ImageRecord, source_key

# raw bytes per shard before compression (a shard of JPEG or zstd items is 3-15x smaller), and the fewest shards a
# store is cut into, so that up to that many ranks each read whole shards of their own
SHARD_RAW_BYTES = 512 * 2 ** 20
MIN_SHARDS = 64
ROWS_FILE = "rows.npy"
ROW_FIELDS = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("length", "<i8"), ("crc", "<u4"), ("readable", "?")])
TAR_HEADER = tarfile.BLOCKSIZE  # a USTAR member header with a name under 100 characters


def records_per_shard(count: int, item_bytes: int) -> tuple[int, int]:
    """How many items a shard holds before it closes at a patient boundary (few enough that the store has
    MIN_SHARDS shards, and at most SHARD_RAW_BYTES of them uncompressed), and the most it holds when one patient
    has more (SHARD_RAW_BYTES of them, or twice the first)."""
    most = max(1, SHARD_RAW_BYTES // item_bytes)
    target = max(1, min(-(-count // MIN_SHARDS), most))
    return target, max(2 * target, most)


def shard_layout(groups: list[str], target: int, most: int) -> np.ndarray:
    """The shard of each row, rows in patient order: a shard closes at the first patient boundary after `target`
    rows, or within a patient, at `most` rows."""
    shards = np.zeros(len(groups), dtype=np.int32)
    shard, held = 0, 0
    for row, group in enumerate(groups):
        if held and ((held >= target and group != groups[row - 1]) or held >= most):
            shard, held = shard + 1, 0
        shards[row], held = shard, held + 1
    return shards


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.tar"


class ShardWriter:
    """Writes encoded items, in row order, into the shards `layout` gives them (`add`), then the rows table
    (`close`). Members carry no owner, time or mode of the machine that wrote them: equal items, equal shards."""

    def __init__(self, folder: Path, codec: Codec, layout: np.ndarray) -> None:
        self.folder, self.codec, self.layout = folder, codec, layout
        self.rows = np.zeros(len(layout), dtype=ROW_FIELDS)
        self.rows["shard"] = layout
        self.sizes: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._next = 0

    def add(self, data: bytes | None) -> None:
        """The next row's encoded item; None for a source that could not be read (stored as nothing)."""
        row = self._next
        shard = int(self.layout[row])
        if shard == len(self.sizes):
            self._close_shard()
            self._tar = tarfile.open(self.folder / shard_name(shard), "w", format=tarfile.USTAR_FORMAT)
            self.sizes.append(0)
        self._next += 1
        if data is None:
            return
        member = tarfile.TarInfo(f"{row:09d}.{self.codec.suffix}")
        member.size, member.mode, member.mtime = len(data), 0o444, 0
        self.rows[row] = (shard, self._tar.offset + TAR_HEADER, len(data), zlib.crc32(data), True)
        self._tar.addfile(member, io.BytesIO(data))

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self.sizes[-1] = (self.folder / shard_name(len(self.sizes) - 1)).stat().st_size

    def close(self) -> np.ndarray:
        """Finish the last shard and write the rows table; returns it."""
        self._close_shard()
        np.save(self.folder / ROWS_FILE, self.rows)
        return self.rows


class ShardedImageStore:
    """A built store: `row(record)` finds a source image, `read(row)` gives its decoded item (or, decoding on a
    device, its encoded bytes) and whether it was readable. Shard files are opened lazily in each process and
    read with `pread`, so the object pickles cheaply into DataLoader workers and workers share no file offset."""

    def __init__(self, folder: Path, index: dict) -> None:
        self.folder = folder
        self.codec = parse_codec(index["codec"])
        self.shape, self.dtype = tuple(index["item"]["shape"]), index["item"]["dtype"]
        self.shards = [entry["file"] for entry in index["shards"]]
        self.shard_bytes = [entry["bytes"] for entry in index["shards"]]
        self.rows = {key: row for row, key in enumerate(index["sources"])}
        self.table = np.load(folder / ROWS_FILE)
        self.readable = self.table["readable"]
        self.decode_on: torch.device | None = None
        self._files: dict[int, int] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for descriptor in self._files.values():
            os.close(descriptor)

    def decoding_on(self, device: torch.device | None) -> ShardedImageStore:
        """This store handing JPEG items over encoded, to be decoded a batch at a time on `device`
        (`decode_batch`); None: each item decodes where it is read (the loader's workers)."""
        store = copy.copy(self)
        store.decode_on = device if device is not None and self.codec.decodes_on_gpu else None
        store._files = {}
        return store

    def row(self, record: ImageRecord) -> int | None:
        return self.rows.get(source_key(record))

    @property
    def bytes_on_disk(self) -> int:
        return sum(self.shard_bytes)

    def damage(self, images: int) -> str | None:
        """What is wrong with the built store (an item count of another dataset, a shard missing, cut short or
        not in the index), None when it is whole. Sizes only: a flipped byte shows in its item's CRC-32."""
        if len(self.rows) != images or len(self.table) != images:
            return f"{len(self.table)} items where {images} are expected"
        on_disk = {path.name for path in self.folder.glob("shard-*.tar")}
        if on_disk - set(self.shards):
            return f"{sorted(on_disk - set(self.shards))[0]} is not in the index"
        for name, size in zip(self.shards, self.shard_bytes):
            if name not in on_disk:
                return f"{name} is missing"
            actual = (self.folder / name).stat().st_size
            if actual != size:
                return f"{name} is {actual} bytes where the index says {size}"
        return None

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """The shard of each of `rows` (-1 for a row the store does not hold)."""
        rows = np.asarray(rows)
        return np.where(rows >= 0, self.table["shard"][np.maximum(rows, 0)], -1)

    def stored_bytes(self, row: int) -> bytes | None:
        """A row's encoded bytes as written, or None when they are missing or fail their CRC-32."""
        entry = self.table[row]
        shard = int(entry["shard"])
        if shard not in self._files:
            self._files[shard] = os.open(self.folder / self.shards[shard], os.O_RDONLY)
        data = os.pread(self._files[shard], int(entry["length"]), int(entry["offset"]))
        return data if len(data) == entry["length"] and zlib.crc32(data) == entry["crc"] else None

    def read(self, row: int) -> tuple[torch.Tensor, bool]:
        if not self.readable[row]:
            return self.blank(), False
        data = self.stored_bytes(row)
        if data is None:
            return self.blank(), False
        if self.decode_on is not None:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True
        try:
            return torch.from_numpy(self.codec.decode(data, self.shape, self.dtype)), True
        except Exception:  # bytes that pass their CRC but not the decoder: skipped and listed, never fatal
            return self.blank(), False

    def blank(self) -> torch.Tensor:
        if self.decode_on is not None:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.zeros(self.shape, dtype=getattr(torch, np.dtype(self.dtype).name))

    def why_unreadable(self, row: int) -> str:
        """Why a row whose source reads well came out unreadable from the store."""
        shard = self.shards[int(self.table[row]["shard"])]
        if self.readable[row] and self.stored_bytes(row) is None:
            return f"its bytes in {shard} fail their checksum (the store is damaged: remove {self.folder})"
        return f"its bytes in {shard} do not decode as {self.codec}"

    def decode_batch(self, items: list[torch.Tensor], ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of encoded JPEG items decoded in one call on `decode_on` (nvJPEG on a GPU), as N x C x H x W
        uint8 there; an item that does not decode becomes blank and not ok."""
        from torchvision.io import ImageReadMode, decode_jpeg  # nvJPEG on CUDA, libjpeg-turbo on the CPU
        mode = ImageReadMode.RGB if self.shape[0] == 3 else ImageReadMode.GRAY
        images = torch.zeros((len(items), *self.shape), dtype=torch.uint8, device=self.decode_on)
        ok = ok.clone()
        for i in range(len(items)):
            if ok[i] and items[i].dim() > 1:  # a record the store does not hold, decoded from its file
                images[i] = items[i].to(self.decode_on)
        good = [i for i in range(len(items)) if ok[i] and items[i].dim() == 1]
        with warnings.catch_warnings():
            # torchvision 0.29 marks its decoders deprecated for TorchCodec's decode_jpeg (the same call, README)
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                decoded = decode_jpeg([items[i] for i in good], mode=mode, device=self.decode_on) if good else []
            except RuntimeError:  # one bad item fails the batched call: decode one at a time to find it
                decoded = []
                for i in good:
                    try:
                        decoded.append(decode_jpeg(items[i], mode=mode, device=self.decode_on))
                    except RuntimeError:
                        decoded.append(None)
        for i, image in zip(good, decoded):
            if image is None or tuple(image.shape) != self.shape:
                ok[i] = False
            else:
                images[i] = image
        return images, ok
