"""Flag types and the one-line argument parser every command of MIRL uses."""
from __future__ import annotations

import argparse
import copy
import math
from typing import NoReturn


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows every flag's default, unless its help already says what the default is."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)  # a flag without help text still shows its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line on stderr (exit code 2), without the usage block, and
    shows the defaults in `--help`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


TORCHVISION_ENCODERS = ("resnet18", "resnet50", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
                        "efficientnet_b3")  # `mirl.encoders.ENCODERS`, named here so that flags need no torch
VOLUME_ENCODERS = ("resnet18_3d", "resnet34_3d", "resnet50_3d")  # MONAI's 3-D ResNets (`mirl.encoders`), --dims 3
TIMM_PREFIX = "timm:"
DEFAULT_ARCH = {2: "resnet50", 3: "resnet50_3d"}  # a fresh network's encoder by --dims, when --arch is not given


def architecture_name(text: str) -> str:
    """The `--arch` flag type: a registered torchvision architecture or `timm:NAME` (checked in full, and
    refused in one line if MIRL cannot train it, when the run builds it)."""
    known = TORCHVISION_ENCODERS + VOLUME_ENCODERS
    if text not in known and not (text.startswith(TIMM_PREFIX) and len(text) > len(TIMM_PREFIX)):
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(sorted(known))}, nor timm:NAME")
    return text


SEED_LIMIT = 2 ** 32  # numpy's generators take seeds below this


def random_seed(text: str) -> int:
    """A random seed every generator MIRL seeds accepts: 0 to 2**32 - 1."""
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be from 0 to {SEED_LIMIT - 1}, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return value


def batch_size(text: str) -> int:
    """A training batch: BatchNorm statistics and contrastive pairs need at least two images."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (BatchNorm and contrastive pairs need two images), "
                                         f"got {text}")
    return value


MIN_IMAGE_SIZE = 32  # a ResNet halves its input five times; below 32 px its last stage has no pixel left


def image_size(text: str) -> int:
    value = int(text)
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_IMAGE_SIZE} pixels, got {text}")
    return value


MIN_VOLUME_SIDE = 8  # voxels on each axis of a 3-D input (the smallest a 3-D ResNet's stages keep a voxel of)


def volume_side(text: str) -> int:
    """One axis of `--volume-size D H W`."""
    value = int(text)
    if value < MIN_VOLUME_SIDE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_VOLUME_SIDE} voxels, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def momentum(text: str) -> float:
    """An exponential moving average's rate: the share of the old value kept at each step, in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value
