"""The one place the scripts' shared model code is found: the method registry (`mirl.methods`), each method's
network and loss, and the encoders and projection heads shared by all of them (`mirl.encoders`).

A method is one network module (`mirl.moco`: MoCo v1 and v2, label-aware MoCo; `mirl.simclr`; `mirl.byol`;
`mirl.dino`) and its spec in `mirl.methods`, plus its two scripts per dataset folder.
"""
from __future__ import annotations

from mirl.byol import BYOL, byol_loss
from mirl.dino import DINO, DINOHead, dino_loss
from mirl.encoders import (
    ENCODERS,
    STOCHASTIC_LAYERS,
    Architecture,
    architecture,
    build_classifier,
    build_encoder,
    known_architecture,
    projection_head,
)
from mirl.method_spec import MethodSpec
from mirl.methods import METHODS
from mirl.moco import MoCo, MomentumQueue, SplitBatchNorm2d, infonce, jaccard_overlap, label_aware_infonce
from mirl.simclr import SimCLR, nt_xent

__all__ = ["BYOL", "DINO", "DINOHead", "ENCODERS", "METHODS", "STOCHASTIC_LAYERS", "Architecture", "MethodSpec",
           "MoCo", "MomentumQueue", "SimCLR", "SplitBatchNorm2d", "architecture", "build_classifier", "build_encoder",
           "byol_loss", "dino_loss", "infonce", "jaccard_overlap", "known_architecture", "label_aware_infonce",
           "nt_xent", "projection_head"]
