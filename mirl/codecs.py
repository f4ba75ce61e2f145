"""How a compressed store encodes one decoded item: `--codec raw | zstd[:LEVEL] | png[:LEVEL] | webp[:QUALITY|lossless]
| jpeg[:QUALITY]`.

An item is what the decoded-image cache holds for one record: a C x S x S uint8 image (three CT windows, an RGB
photo) or a 1 x D x H x W int16 volume. `raw` keeps the uncompressed memory-mapped array; the others write it into
shards (`mirl.shards`). zstd (the `zstandard` binding) compresses any item losslessly and decodes fastest; PNG and
WebP (Pillow) are lossless image formats; JPEG (`simplejpeg`, libjpeg-turbo, 4:4:4 so no colour channel is
halved) and lossy WebP trade exactness for bytes with a quality knob, and JPEG alone decodes on a GPU (nvJPEG).
The README's Speed section gives each one's bytes, fidelity and decode rate. Nothing here imports torch: the
scripts' flags parse a codec before torch loads.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mirl.errors import InputError

# name: (the setting's meaning, its default, its range, lossless, the member suffix in a shard)
CODECS = {
    "raw": (None, None, None, True, ""),
    "zstd": ("level", 3, (1, 22), True, "zst"),
    "png": ("level", 1, (0, 9), True, "png"),
    "webp": ("quality", 90, (1, 100), False, "webp"),
    "jpeg": ("quality", 95, (1, 100), False, "jpg"),
}
IMAGE_CODECS = ("png", "webp", "jpeg")  # 8-bit images of 1 or 3 channels only


@dataclass(frozen=True)
class Codec:
    """One codec and its setting (zstd's and PNG's level, WebP's and JPEG's quality, or "lossless" for WebP)."""

    name: str
    setting: int | str | None = None

    def __str__(self) -> str:
        return self.name if self.setting is None else f"{self.name}:{self.setting}"

    @property
    def is_raw(self) -> bool:
        return self.name == "raw"

    @property
    def lossless(self) -> bool:
        return CODECS[self.name][3] or self.setting == "lossless"

    @property
    def suffix(self) -> str:
        return CODECS[self.name][4]

    @property
    def decodes_on_gpu(self) -> bool:
        """Whether a batch of its items decodes on a CUDA device (nvJPEG, through torchvision)."""
        return self.name == "jpeg"

    def check_item(self, shape: tuple[int, ...], dtype: str) -> None:
        """Refuse an item this codec cannot hold: the image formats take 8-bit images of 1 or 3 channels."""
        if self.name in IMAGE_CODECS and (np.dtype(dtype) != np.uint8 or len(shape) != 3 or shape[0] not in (1, 3)):
            raise InputError(f"--codec {self.name} stores 8-bit 2-D images; volumes (--dims 3, int16) take --codec "
                             "zstd or raw")

    def encode(self, item: np.ndarray) -> bytes:
        """The item's bytes in this codec (an image is C x H x W)."""
        if self.name == "zstd":
            return _compressor(self.setting).compress(np.ascontiguousarray(item).tobytes())
        pixels = np.ascontiguousarray(item.transpose(1, 2, 0))
        if self.name == "jpeg":
            import simplejpeg
            return simplejpeg.encode_jpeg(pixels, quality=self.setting, colorspace="RGB" if len(item) == 3 else "GRAY",
                                          colorsubsampling="444")
        from PIL import Image
        buffer = io.BytesIO()
        image = Image.fromarray(pixels[..., 0] if len(item) == 1 else pixels)
        if self.name == "png":
            image.save(buffer, "PNG", compress_level=self.setting)
        elif self.setting == "lossless":
            image.save(buffer, "WEBP", lossless=True, quality=50, method=2)
        else:
            image.save(buffer, "WEBP", quality=self.setting, method=4)
        return buffer.getvalue()

    def decode(self, data: bytes, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """An item back from its bytes, `shape` and `dtype` as stored."""
        if self.name == "zstd":
            # a writable array (torch refuses to share a read-only buffer): decompressed into a bytearray
            return np.frombuffer(bytearray(_decompressor().decompress(data)), dtype=dtype).reshape(shape)
        if self.name == "jpeg":
            import simplejpeg
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB" if shape[0] == 3 else "GRAY")
        else:
            from PIL import Image
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB" if shape[0] == 3 else "L"))
        pixels = pixels.reshape(shape[1], shape[2], shape[0])
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@lru_cache(maxsize=4)
def _compressor(level: int):
    import zstandard
    return zstandard.ZstdCompressor(level=level)


@lru_cache(maxsize=1)
def _decompressor():
    import zstandard
    return zstandard.ZstdDecompressor()


RAW = Codec("raw")


def parse_codec(text: str | Codec) -> Codec:
    """`jpeg:95`, `zstd`, `webp:lossless`, `raw` as a Codec, its setting defaulted and checked (InputError)."""
    if isinstance(text, Codec):
        return text
    name, _, setting = str(text).strip().lower().partition(":")
    if name not in CODECS:
        raise InputError(f"--codec {text!r}: choose one of {', '.join(CODECS)} (e.g. jpeg:95, zstd:3, webp:lossless)")
    meaning, default, bounds, _, _ = CODECS[name]
    if meaning is None:
        if setting:
            raise InputError(f"--codec raw takes no setting (got {text!r})")
        return RAW
    if not setting:
        return Codec(name, default)
    if name == "webp" and setting == "lossless":
        return Codec(name, "lossless")
    try:
        value = int(setting)
    except ValueError:
        value = None
    if value is None or not bounds[0] <= value <= bounds[1]:
        raise InputError(f"--codec {text!r}: the {name} {meaning} is an integer from {bounds[0]} to {bounds[1]}"
                         + (" or 'lossless'" if name == "webp" else ""))
    return Codec(name, value)


def codec_flag(text: str) -> str:
    """argparse type of `--codec`: the codec's full spelling (`jpeg` -> `jpeg:95`), a bad one in one line."""
    from argparse import ArgumentTypeError
    try:
        return str(parse_codec(text))
    except InputError as error:
        raise ArgumentTypeError(str(error).removeprefix("--codec ")) from None
