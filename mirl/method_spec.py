"""What a pretraining method registers: its paper defaults and how it plugs into the one training loop.

Each method module (`mirl.moco`, `mirl.simclr`, `mirl.byol`) defines its network, its loss as a named
function and one or more `MethodSpec`s; `mirl.models.METHODS` collects them. Nothing outside a method's
module needs to know which method it is.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Callable, Mapping

import torch.nn as nn

from mirl.config import PretrainConfig
from mirl.errors import InputError

Options = Mapping[str, object]  # a method's own flags by argparse name, e.g. {"temperature": 0.2}


def no_flags(parser: argparse.ArgumentParser) -> None:
    """A method without flags of its own."""


def no_preparation(options: Options, images: int) -> dict[str, object]:
    """A method that needs nothing settled from the data before its network is built."""
    return {}


@dataclass(frozen=True)
class MethodSpec:
    """A pretraining method: its paper defaults (learning rate per 256 images, scaled linearly to the
    global batch), the augmentation recipe of each of its two views (names in `mirl.augment.RECIPES`),
    its own flags (`add_flags`: their argparse defaults are the options' defaults), what it settles once
    the number of pretraining images is known (`prepare`: MoCo's queue size, returned as options that
    join the run's identity), and how its network is built from the architecture, the options, the size
    of the label vectors (label-aware MoCo) and the number of optimizer steps (BYOL's EMA schedule)."""

    name: str
    title: str
    script: str
    schedule: str
    optimizer: str
    lr_per_256: float
    weight_decay: float
    warmup_epochs: int
    epochs: int
    recipes: tuple[str, str]
    build: Callable[[str, Options, int, int], nn.Module]
    add_flags: Callable[[argparse.ArgumentParser], None] = no_flags
    prepare: Callable[[Options, int], dict[str, object]] = field(default=no_preparation)
    # the options `prepare` settles (their requested value may be None): a resumed run compares them once settled
    settled_options: tuple[str, ...] = ()
    # trains on the labels of a fraction's split too when a run asks (`--supervised`, its flags added by add_flags)
    label_aware: bool = False
    # what a paper-scale run sets where the data would otherwise settle it (MoCo's K = 65,536): the benchmark's
    paper_options: Options = field(default_factory=dict)

    def option_defaults(self) -> dict[str, object]:
        """The method's own options at their defaults, as its flags declare them (flags that set a field of
        the run config, such as `--supervised`, are the config's, not options)."""
        parser = argparse.ArgumentParser(add_help=False)
        self.add_flags(parser)
        run_fields = {f.name for f in fields(PretrainConfig)}
        return {k: v for k, v in vars(parser.parse_args([])).items() if k not in run_fields}

    def options(self, given: Options) -> dict[str, object]:
        """`given` completed with the defaults; an option the method does not have is an input error."""
        defaults = self.option_defaults()
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise InputError(f"{self.title} has no option {', '.join(unknown)} (its options: "
                             f"{', '.join(sorted(defaults)) or 'none'})")
        return {**defaults, **given}
