"""Typed, frozen run configurations: what a pretraining or downstream run is asked to do.

The scripts build one from their flags at the command-line edge (`from_flags`); `mirl.study` and a
notebook build them directly. Library functions take a config and never change it: what a run settles
on its own (the checkpoint's architecture, MoCo's queue size from the number of images, default epochs)
is a new config made with `dataclasses.replace`. `flags()` gives the flag values back, which is what
`config.json` records so that `--config OUTPUT/config.json` relaunches the run.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, TypeVar

from mirl.codecs import IMAGE_CODECS, parse_codec
from mirl.errors import InputError

AnyConfig = TypeVar("AnyConfig", bound="RunConfig")
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)

# The fields of a config that change neither what a run trains nor what it measures: where it writes and what
# it continues from, how fast it goes (loader processes, device, decoded-image cache, memory format,
# compilation) and how it keeps its states; and `transfer`, which only allows a check to pass. Every other
# field, a method's options included, is part of the run identity (the codec when it is not raw: a lossy one
# changes the pixels, a sharded store the epoch order); of the split folder, its files' contents are
# (`splits`, added by the run), not its path.
OUTSIDE_IDENTITY = ("output_dir", "resume", "workers", "device", "cache", "channels_last", "compile", "save_every",
                    "save_minutes", "keep", "keep_states", "transfer", "script", "split_dir")
NOT_FLAGS = ("options", "method", "script")  # fields a script binds itself, not from a flag

# The choices of a run's fields, here so that a script's flags are defined without importing torch
FRACTIONS = (100, 50, 20, 10, 5, 1)  # percent of the training labels, one split file each
POSITIVES = ("views", "study", "patient")  # what a pair's two views come from (`mirl.positives`)
AUGMENT_STYLES = ("paper", "grey", "ct", "mr", "dermoscopy")  # `mirl.augment.MODALITY_RECIPES`
SPATIAL_DIMS = (2, 3)  # images or volumes (`mirl.spatial`)
VOLUME_FIELDS = ("dims", "volume_size", "voxel_size")  # a 2-D run's identity leaves them out: it is as it was
CHECKPOINT_NAME = "checkpoint.pth"  # a run's published state, beside its config.json and metrics


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What every run takes: data, outputs, the training budget, the device and how states are kept.

    `arch` None: resnet50 for a fresh network, the checkpoint's for a pretrained one. `epochs` None:
    the method's paper default (pretraining) or the mode's (downstream). `lr` None: the method's rate
    scaled to the batch (pretraining), chosen on validation from a grid (linear probe) or the
    fine-tuning default."""

    data_root: Path
    output_dir: Path
    split_dir: Path
    epochs: int | None = None
    batch_size: int = 256
    arch: str | None = None
    image_size: int = 224
    dims: int = 2
    volume_size: tuple[int, int, int] | None = None  # --dims 3: the input in voxels (D, H, W); None: the dataset's
    voxel_size: tuple[float, float, float] | None = None  # --dims 3: mm (z, y, x); None: the dataset's, else fitted
    workers: int = DEFAULT_WORKERS
    device: str = "auto"
    precision: str = "auto"
    lr: float | None = None
    seed: int = 0
    deterministic: bool = False
    resume: str | None = None
    save_every: int = 500
    save_minutes: float = 10.0  # an epoch's end saves a state only when this long has passed since the last save
    keep: int = 2
    keep_states: bool = False  # keep the training states once the run has published its result
    cache: Path | None = None
    codec: str = "raw"  # how --cache stores items (`mirl.codecs`): raw, or a compressed, sharded store
    channels_last: bool = True
    compile: bool = False
    labels: Path | None = None
    group_column: str | None = None
    init_weights: Path | None = None  # a local state dict the encoder(s) start from (never downloaded)
    script: str | None = None  # the script that made the run (`isic/trainSimCLR.py`): what `--config` relaunches

    def __post_init__(self) -> None:
        # absolute paths, links resolved: a record (config.json) and a relaunch mean the same folders from any
        # working directory, and two spellings of one data folder read one cache
        for name, value in vars(self).items():
            if isinstance(value, Path):
                object.__setattr__(self, name, value.resolve())
            if isinstance(value, list):  # a shape from a flag or a config.json: held as the tuple it is
                object.__setattr__(self, name, tuple(value))
        codec = parse_codec(self.codec)  # its full spelling (`jpeg` -> `jpeg:95`): one codec, one identity
        object.__setattr__(self, "codec", str(codec))
        if not codec.is_raw and self.cache is None:
            raise InputError(f"--codec {codec} says how --cache stores the decoded images; pass --cache DIR with it")
        if codec.name in IMAGE_CODECS and self.dims == 3:
            raise InputError(f"--codec {codec.name} stores 8-bit 2-D images; volumes (--dims 3, int16) take "
                             "--codec zstd or raw")

    @classmethod
    def from_flags(cls: type[AnyConfig], flags: Mapping[str, object]) -> AnyConfig:
        """The config of a script's parsed flags (`vars(args)`); flags that are no field of the config are a
        method's own options (pretraining) or the edge's (`--config`)."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in flags.items() if k in names and k != "options"}
        if "options" in names:
            given["options"] = {k: v for k, v in flags.items() if k not in names and k != "config"}
        return cls(**given)

    def identity(self) -> dict[str, object]:
        """What makes two runs the same run, as JSON values: every field outside OUTSIDE_IDENTITY and the
        method's options. A run adds what only it knows (the dataset, the world size, the hash of the
        encoder it starts from) and compares the whole on resume; a study compares it before reusing."""
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in OUTSIDE_IDENTITY and f.name != "options"
                  and not (self.dims == 2 and f.name in VOLUME_FIELDS) and not (f.name == "codec" and
                                                                               self.codec == "raw")}
        values.update(getattr(self, "options", {}))
        return json_values(values)

    def flags(self) -> dict[str, object]:
        """The flag values this config was made from, by argparse name: what a `--config` relaunch passes again."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_FLAGS}
        values.update(getattr(self, "options", {}))
        return values


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(RunConfig):
    """A self-supervised pretraining run of `method` (a key of `mirl.models.METHODS`). `options` are the
    method's own flags by argparse name (MoCo's `queue_size`, `temperature`, ...); those left out take the
    method's defaults. `supervised` (methods with a label-aware form: MoCo): trained on the `fraction` split's
    labels too."""

    method: str
    optimizer: str | None = None  # None: the method's recipe for the architecture (SGD, LARS or AdamW)
    augment: str | None = None  # None: grey for CT and MR datasets, the paper's colour recipe otherwise
    positives: str = "views"
    knn_images: int = 2000
    supervised: bool = False
    fraction: int = 100
    options: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))  # frozen all the way down


@dataclass(frozen=True, kw_only=True)
class DownstreamConfig(RunConfig):
    """A classifier trained on `fraction` % of the labels: fine-tuning the encoder of `pretrained` (a
    checkpoint of `method`), a linear probe on it (`frozen`), or a supervised network without
    self-supervised pretraining (`resnet`, from `init_weights` when given)."""

    method: str
    pretrained: Path | None = None
    fraction: int = 100
    frozen: bool = False
    resnet: bool = False
    encoder_lr_scale: float | None = None
    transfer: bool = False  # `pretrained` was made on other data on purpose

    @property
    def mode(self) -> str:
        if self.resnet:  # no pretrained encoder: the supervised network, or a probe on random features (`frozen`)
            return "random_frozen" if self.frozen else "resnet"
        return "frozen" if self.frozen else "finetune"


def json_values(values: Mapping[str, object]) -> dict[str, object]:
    """`values` as JSON reads them back (paths as text, tuples as lists), so a recorded identity and a new
    one compare equal exactly when their settings are equal."""
    return json.loads(json.dumps(dict(values), default=str, sort_keys=True))


def identity_differences(recorded: Mapping[str, object], current: Mapping[str, object]) -> list[str]:
    """The fields of `current` that `recorded` holds with another value or does not hold at all (a record of
    an older MIRL did not hold every field: what it cannot vouch for is treated as different)."""
    recorded, current = json_values(recorded), json_values(current)
    return [key for key in current if key not in recorded or recorded[key] != current[key]]


def describe_differences(recorded: Mapping[str, object], current: Mapping[str, object], keys: list[str]) -> str:
    """`seed 0 -> 1, temperature 0.2 -> 0.5`: what a refusal names, the recorded value first."""
    def shown(values: Mapping[str, object], key: str) -> str:
        return "(not recorded)" if key not in values else json.dumps(json_values(values)[key])[:80]
    return ", ".join(f"{key} {shown(recorded, key)} -> {shown(current, key)}" for key in keys[:6]) + \
        (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def identity_digest(identity: Mapping[str, object]) -> str:
    """A short name of a run identity (`run_id` in config.json and metrics.json): equal identities, equal ids."""
    return hashlib.sha256(json.dumps(json_values(identity), sort_keys=True).encode()).hexdigest()[:12]
