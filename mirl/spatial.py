"""The `spatial_dims` seam: what differs between a run on 2-D images and one on 3-D volumes, in one place.

A run's `InputSpace` (from `--dims`, `--image-size` and, for volumes, `--volume-size`/`--voxel-size`) names the
records' dataset (`ImageDataset` or `VolumeDataset`), the training and evaluation views (`mirl.augment` or
`mirl.volume_views`), the encoder's input (for `check_input_size`), `spatial_dims` (which picks channels_last
or channels_last_3d) and what a decoded cache stores. Everything else (methods, losses, momentum teachers, queues,
optimizers, the loop, splits, metrics, the run identity) is the same code for both, as MONAI's `spatial_dims`
picks 2-D or 3-D layers and leaves the rest alone.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from mirl.augment import RECIPES, BatchAugment, evaluation_view, source_side, view_recipe
from mirl.config import RunConfig
from mirl.datasets import DatasetDescription, DecodedImages, ImageDataset, ImageRecord
from mirl.datasets.volumes import VolumeDataset
from mirl.errors import InputError
from mirl.method_spec import View
from mirl.volume_views import VolumeAugment, volume_evaluation_view, volume_recipe
from mirl.volumes import VolumeGeometry


@dataclass(frozen=True)
class InputSpace:
    """The inputs of a run: 2-D images of `image_size` px, or volumes on the `volume` grid."""

    image_size: int
    volume: VolumeGeometry | None = None

    @property
    def spatial_dims(self) -> int:
        return 2 if self.volume is None else 3

    @property
    def size(self) -> int | tuple[int, int, int]:
        """The network's input: a side in pixels, or a volume's (D, H, W)."""
        return self.image_size if self.volume is None else self.volume.size

    def dataset(self, records: list[ImageRecord], num_classes: int, cache: DecodedImages | None = None) -> Dataset:
        """The Dataset that decodes `records` at source resolution."""
        if self.volume is None:
            return ImageDataset(records, self.image_size, num_classes, cache)
        return VolumeDataset(records, self.volume, num_classes, cache)

    def view_size(self, view: View) -> int | tuple[int, int, int]:
        """The network's input in one of a method's views: its side, or the volume's size (a 3-D view of another
        size than the input, as DINO's local crops, is refused)."""
        if self.volume is None:
            return view.size
        if view.size != self.image_size:
            raise InputError("multi-crop views of another size (DINO's local crops) are 2-D only; with --dims 3 "
                             "pretrain with MoCo, MoCo v2, SimCLR or BYOL")
        return self.volume.size

    def training_view(self, view: View, style: str) -> torch.nn.Module:
        """A method's view: its paper recipe fitted to the modality family `style`."""
        if self.volume is None:
            return BatchAugment(view_recipe(view, style), view.size)
        return VolumeAugment(volume_recipe(view, style), self.view_size(view), self.volume.intensity)

    def downstream_view(self, frozen: bool) -> torch.nn.Module:
        """The view a classifier trains on: MoCo's linear protocol's, or fine-tuning's."""
        name = "linear" if frozen else "finetune"
        if self.volume is None:
            return BatchAugment(RECIPES[name], self.image_size)
        return VolumeAugment(volume_recipe(name, "grey"), self.volume.size, self.volume.intensity)

    def evaluation_view(self, images: torch.Tensor) -> torch.Tensor:
        """The deterministic view a batch is evaluated through."""
        if self.volume is None:
            return evaluation_view(images, self.image_size)
        return volume_evaluation_view(images, self.volume.size, self.volume.intensity)

    @property
    def stored_item(self) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and type of one decoded image or volume as a cache stores it."""
        if self.volume is None:
            return (3, source_side(self.image_size), source_side(self.image_size)), np.dtype(np.uint8)
        return (1, *self.volume.source_shape), np.dtype(np.int16)

    def cache_settings(self) -> dict[str, object]:
        """What a decoded cache's key holds of the inputs (a 2-D cache's key is as it always was)."""
        if self.volume is None:
            return {"image_size": self.image_size, "source_side": source_side(self.image_size)}
        return self.describe()

    def cache_name(self) -> str:
        """How a cache folder names the inputs: `224px`, `32x128x128vox`."""
        return f"{self.image_size}px" if self.volume is None else f"{'x'.join(map(str, self.volume.size))}vox"

    def describe(self) -> dict[str, object]:
        """What config.json and checkpoints record of a volume run's inputs (nothing for 2-D: as it always was)."""
        if self.volume is None:
            return {}
        return {"dims": 3, "volume_size": list(self.volume.size), "voxel_size": self.volume.voxel_size and
                list(self.volume.voxel_size), "source_shape": list(self.volume.source_shape),
                "intensity": self.volume.intensity}


def settled_inputs(config: RunConfig, description: DatasetDescription) -> RunConfig:
    """`config` with a volume run's grid completed from the dataset's defaults (recorded in config.json and the
    run identity); a 2-D config as it is. `description` is the dataset read with the run's dims."""
    if config.dims == 2:
        if config.volume_size is not None or config.voxel_size is not None:
            raise InputError("--volume-size and --voxel-size describe volumes; pass --dims 3 with them")
        return config
    volumes = description.volumes
    return replace(config, volume_size=config.volume_size or volumes.size,
                   voxel_size=config.voxel_size or volumes.voxel_size)


def input_space(config: RunConfig, description: DatasetDescription) -> InputSpace:
    """The input space of a settled config (`settled_inputs`) on `description`."""
    if config.dims == 2:
        return InputSpace(config.image_size)
    return InputSpace(config.image_size, VolumeGeometry(tuple(config.volume_size), config.voxel_size and
                                                        tuple(config.voxel_size), description.volumes.intensity))
