"""The registry of pretraining methods: each one's options, views and paper recipes (no torch imported here).

A new method is its network module (a `PretrainingMethod` and a `build_...` function), its options dataclass
and spec here, and its two scripts per dataset folder. Every number below is a paper's or its reference
code's; `source` says which.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

from mirl.errors import InputError
from mirl.flags import (
    MIN_IMAGE_SIZE,
    image_size,
    momentum,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from mirl.method_spec import MethodSpec, TrainingRecipe, View, option, paired_views

MAX_QUEUE = 65536  # MoCo's K


def default_queue_size(images: int) -> int:
    """MoCo's K for a dataset of `images`: the largest power of two <= images / 4, at most the paper's 65536.

    A queue as large as the data holds older keys of each query's own image as negatives; a quarter of the
    data keeps the queue's keys at most a quarter of an epoch old and never the query's own image."""
    return min(MAX_QUEUE, 1 << max(0, (images // 4).bit_length() - 1))


def checked_queue_size(requested: int | None, images: int) -> int:
    """The queue size a run uses: `requested`, refused when it is not smaller than the data, else the default."""
    if requested is None:
        return default_queue_size(images)
    if requested >= images:
        raise InputError(f"--queue-size {requested} is not smaller than the {images} pretraining images: the queue "
                         f"would hold each query's own image as a negative; leave it out (default "
                         f"{default_queue_size(images)} for this data) or choose a smaller one")
    return requested


@dataclass(frozen=True)
class MoCoOptions:
    temperature: float = option(0.07, positive_float, "InfoNCE's softmax temperature")
    queue_size: int | None = option(None, positive_int, "MoCo's K negatives (default: the largest power of two <= "
                                    "images / 4, at most 65536; must be smaller than the number of images)")
    moco_momentum: float = option(0.999, momentum, "key encoder momentum m")
    bn_splits: int = option(8, positive_int, "BatchNorm groups standing in for shuffle-BN on one device")


@dataclass(frozen=True)
class MoCoV2Options(MoCoOptions):
    temperature: float = option(0.2, positive_float, "InfoNCE's softmax temperature")


def settle_queue_size(options: MoCoOptions, images: int) -> MoCoOptions:
    """The queue size follows from the number of images, so it is settled once they are listed."""
    return replace(options, queue_size=checked_queue_size(options.queue_size, images))


@dataclass(frozen=True)
class SimCLROptions:
    temperature: float = option(0.1, positive_float, "NT-Xent's softmax temperature")


@dataclass(frozen=True)
class BYOLOptions:
    target_momentum: float = option(0.996, momentum, "the EMA target's rate at the start; it rises to 1 along a "
                                    "cosine")


@dataclass(frozen=True)
class DINOOptions:
    out_dim: int = option(65536, positive_int, "prototypes: the width of the head's weight-normalised last layer")
    local_crops: int = option(8, non_negative_int, "small local views per image, besides the two global ones")
    local_size: int | None = option(None, image_size, "side of the local views (default: 96/224 of --image-size, "
                                    f"at least {MIN_IMAGE_SIZE})")
    teacher_temp: float = option(0.04, positive_float, "the teacher's softmax temperature after its warm-up")
    warmup_teacher_temp: float = option(0.04, positive_float, "the teacher's temperature at the start")
    warmup_teacher_temp_epochs: int = option(30, non_negative_int, "epochs of the teacher temperature's linear "
                                             "warm-up")
    student_temp: float = option(0.1, positive_float, "the student's softmax temperature")
    center_momentum: float = option(0.9, momentum, "EMA rate of the centre subtracted from the teacher's output")
    teacher_momentum: float = option(0.996, momentum, "the teacher's EMA rate at the start; it rises to 1 along a "
                                     "cosine")
    clip_grad: float = option(3.0, non_negative_float, "largest gradient norm of each parameter (0: no clipping)")
    freeze_last_layer: int = option(1, non_negative_int, "epochs during which the head's last layer is not "
                                    "trained")


def dino_local_size(options: DINOOptions, image_size: int) -> int:
    """The local views' side: `--local-size`, else 96/224 of the global one (DINO's 96 px for 224)."""
    return options.local_size or max(MIN_IMAGE_SIZE, round(image_size * 96 / 224))


def dino_views(options: DINOOptions, image_size: int, transformer: bool) -> tuple[View, ...]:
    """Multi-crop: two global views at the input size, which the teacher sees too, and `local_crops` small ones.
    The crops' area ranges are the DINO repository's: 0.4-1 and 0.05-0.4 for ViTs, 0.14-1 and 0.05-0.14 for
    its ResNet-50 recipe."""
    global_scale, local_scale = ((0.4, 1.0), (0.05, 0.4)) if transformer else ((0.14, 1.0), (0.05, 0.14))
    local = View("dino_local", dino_local_size(options, image_size), local_scale, teacher=False)
    return (View("dino_global1", image_size, global_scale), View("dino_global2", image_size, global_scale),
            *[local] * options.local_crops)


MOCO_SOURCE = "He et al. 2020 and facebookresearch/moco main_moco.py"
MOCOV2_SOURCE = "Chen et al. 2020 (MoCo v2) and facebookresearch/moco main_moco.py --mlp --aug-plus --cos"
MOCO_RECIPE = TrainingRecipe("sgd", lr_per_256=0.03, weight_decay=1e-4, schedule="step", warmup_epochs=0, epochs=200,
                             source=MOCO_SOURCE)

MOCO_METHOD = MethodSpec("moco", "MoCo", "trainMoCo.py", "mirl.moco:build_moco", MoCoOptions, MOCO_RECIPE,
                         partial(paired_views, "moco", "moco"), prepare=settle_queue_size,
                         settled_options=("queue_size",), label_aware=True, paper_options={"queue_size": MAX_QUEUE})
MOCOV2_METHOD = MethodSpec("mocov2", "MoCo v2", "trainMoCoV2.py", "mirl.moco:build_moco_v2", MoCoV2Options,
                           replace(MOCO_RECIPE, schedule="cosine", source=MOCOV2_SOURCE),
                           partial(paired_views, "mocov2", "mocov2"), prepare=settle_queue_size,
                           settled_options=("queue_size",), label_aware=True, paper_options={"queue_size": MAX_QUEUE})
# LARS at 0.3 per 256 images, weight decay 1e-6, 10 warm-up epochs, cosine, 100 epochs (the paper's batch-size study)
SIMCLR_METHOD = MethodSpec("simclr", "SimCLR", "trainSimCLR.py", "mirl.simclr:build_simclr", SimCLROptions,
                           TrainingRecipe("lars", lr_per_256=0.3, weight_decay=1e-6, schedule="cosine",
                                          warmup_epochs=10, epochs=100,
                                          source="Chen et al. 2020, appendix B.1 and B.9"),
                           partial(paired_views, "simclr", "simclr"))
# LARS at 0.2 per 256 images, weight decay 1.5e-6, 10 warm-up epochs, cosine, 300 epochs; asymmetric views
BYOL_METHOD = MethodSpec("byol", "BYOL", "trainBYOL.py", "mirl.byol:build_byol", BYOLOptions,
                         TrainingRecipe("lars", lr_per_256=0.2, weight_decay=1.5e-6, schedule="cosine",
                                        warmup_epochs=10, epochs=300,
                                        source="Grill et al. 2020, appendix C (300-epoch schedule)"),
                         partial(paired_views, "byol_view1", "byol_view2"))
# ResNet-50: the DINO repository README's command (SGD, lr 0.03, weight decay 1e-4 constant); ViT-S/16:
# main_dino.py's defaults (AdamW, lr 0.0005 per 256, weight decay 0.04 to 0.4 on a cosine); both 10 warm-up epochs
# and 100 epochs, main_dino.py's defaults
DINO_METHOD = MethodSpec("dino", "DINO", "trainDINO.py", "mirl.dino:build_dino", DINOOptions,
                         TrainingRecipe("sgd", lr_per_256=0.03, weight_decay=1e-4, schedule="cosine", warmup_epochs=10,
                                        epochs=100, source="facebookresearch/dino README, ResNet-50 command"),
                         dino_views,
                         transformer_recipe=TrainingRecipe(
                             "adamw", lr_per_256=0.0005, weight_decay=0.04, weight_decay_end=0.4, schedule="cosine",
                             warmup_epochs=10, epochs=100, source="Caron et al. 2021; facebookresearch/dino "
                                                                  "main_dino.py defaults (ViT-S/16)"))

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (MOCO_METHOD, MOCOV2_METHOD, SIMCLR_METHOD,
                                                                BYOL_METHOD, DINO_METHOD)}
