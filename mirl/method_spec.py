"""What a pretraining method registers, without importing torch: its options, its views and its recipes.

A method is two things. Its spec (here, collected in `mirl.methods`): the paper's training recipe, the
views it trains on (how many, each one's augmentation recipe and size), its options as one frozen dataclass
whose fields generate its command-line flags, and the name of the function that builds its network. And its
network (`mirl.moco`, `mirl.simclr`, `mirl.byol`, `mirl.dino`), a `mirl.pretraining_method.PretrainingMethod`
that owns its training step and hooks. The spec imports no torch, so a script answers `--help` or a bad flag
before torch is loaded; the network's module is imported when a run builds it.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping

from mirl.errors import InputError


def option(default: object, parse: Callable[[str], object], help: str) -> Any:
    """A field of a method's options dataclass: its default, the function that parses its flag's text (the
    flag types of `mirl.flags`) and its help."""
    return field(default=default, metadata={"parse": parse, "help": help})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class View:
    """One view a training step takes: the paper recipe of its augmentation (a key of `mirl.augment.RECIPES`),
    its side in pixels and, where the method sets it per architecture (DINO), the crop's area range instead of
    the recipe's. `teacher` views are the ones a teacher network also sees (DINO's global views)."""

    recipe: str
    size: int
    crop_scale: tuple[float, float] | None = None
    teacher: bool = True


@dataclass(frozen=True)
class TrainingRecipe:
    """A paper's optimisation: the optimizer (sgd, lars or adamw), the learning rate per 256 images (scaled
    linearly to the global batch), the weight decay (on a cosine to `weight_decay_end` where that is given),
    the schedule after `warmup_epochs` of linear warm-up, the number of epochs, and where the numbers come
    from."""

    optimizer: str
    lr_per_256: float
    weight_decay: float
    schedule: str
    warmup_epochs: int
    epochs: int
    source: str
    weight_decay_end: float | None = None


@dataclass(frozen=True)
class TrainingPlan:
    """What a method's network needs to know of the run it trains in: the optimizer steps in all and per
    epoch (schedules that move per step, BYOL's and DINO's teacher momentum; DINO's first-epoch freeze), and
    the width of the label vectors a label-aware run gives it (0: none)."""

    total_steps: int
    steps_per_epoch: int
    label_dim: int = 0


def no_preparation(options: Any, images: int) -> Any:
    """A method that settles nothing from the data."""
    return options


@dataclass(frozen=True)
class MethodSpec:
    """A pretraining method: its paper recipe (`recipe`; `transformer_recipe` for vision transformers, None
    where the method has none and refuses them), its views (`views(options, image_size, transformer)`), its
    options dataclass, what it settles once the number of images is known (`prepare`: MoCo's queue size; the
    options it settles are `settled_options`), whether it can also train on a split's labels (`label_aware`,
    the runs' `--supervised`), the options a paper-scale benchmark sets (MoCo's K = 65,536), and `builder`,
    the `module:function` that builds its network from (arch, options, plan)."""

    name: str
    title: str
    script: str
    builder: str
    options_type: type
    recipe: TrainingRecipe
    views: Callable[[Any, int, bool], tuple[View, ...]]
    transformer_recipe: TrainingRecipe | None = None
    prepare: Callable[[Any, int], Any] = no_preparation
    settled_options: tuple[str, ...] = ()
    label_aware: bool = False
    paper_options: Mapping[str, object] = field(default_factory=dict)

    def recipe_for(self, transformer: bool) -> TrainingRecipe:
        """The paper recipe for a convolutional network or a vision transformer; a method without one for
        transformers refuses them."""
        if not transformer:
            return self.recipe
        if self.transformer_recipe is None:
            raise InputError(f"{self.title} has no recipe for vision transformers (its paper trains CNNs); use a "
                             "convolutional network (resnet50, timm:convnext_tiny, ...) or DINO")
        return self.transformer_recipe

    def option_defaults(self) -> dict[str, object]:
        """The method's options at their defaults, by field name."""
        return asdict(self.options_type())

    def options(self, given: Mapping[str, object]) -> Any:
        """The options dataclass of `given` (values by field name) completed with the defaults; an option the
        method does not have is an input error."""
        names = [f.name for f in fields(self.options_type)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InputError(f"{self.title} has no option {', '.join(unknown)} (its options: "
                             f"{', '.join(names) or 'none'})")
        return self.options_type(**given)

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """One flag per option, with its type, default and help."""
        group = parser.add_argument_group(f"{self.title} options")
        for option_field in fields(self.options_type):  # every field is an `option`, with its default
            group.add_argument(flag_name(option_field.name), dest=option_field.name,
                               type=option_field.metadata["parse"], default=option_field.default,
                               help=option_field.metadata["help"])

    def build(self, arch: str, options: Any, plan: TrainingPlan) -> Any:
        """The method's network (a `PretrainingMethod`), its module imported now."""
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(arch, options, plan)


def paired_views(first: str, second: str, options: Any, image_size: int, transformer: bool) -> tuple[View, ...]:
    """The two views of a two-view method, both at the input size: `first` and `second` paper recipes."""
    return View(first, image_size), View(second, image_size)

