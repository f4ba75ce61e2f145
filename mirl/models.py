"""The registry of pretraining methods and the one place the scripts' shared model code is found.

Each method is one module holding its network, its loss as a named function and its registered
`MethodSpec`: `mirl.moco` (MoCo v1 and v2, label-aware MoCo), `mirl.simclr`, `mirl.byol`. Encoders and
projection heads shared by all of them are in `mirl.encoders`. A new method is one new module and one
line here, plus its two scripts per dataset folder.
"""
from __future__ import annotations

from mirl.byol import BYOL, BYOL_METHOD, byol_loss
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
from mirl.moco import (
                           MOCO_METHOD,
                           MOCOV2_METHOD,
                           MoCo,
                           MomentumQueue,
                           SplitBatchNorm2d,
                           infonce,
                           jaccard_overlap,
                           label_aware_infonce,
)
from mirl.simclr import SIMCLR_METHOD, SimCLR, nt_xent

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (MOCO_METHOD, MOCOV2_METHOD, SIMCLR_METHOD,
                                                                BYOL_METHOD)}

__all__ = ["BYOL", "ENCODERS", "METHODS", "STOCHASTIC_LAYERS", "Architecture", "MethodSpec", "MoCo", "MomentumQueue",
           "SimCLR", "SplitBatchNorm2d", "architecture", "build_classifier", "build_encoder", "byol_loss", "infonce",
           "jaccard_overlap", "known_architecture", "label_aware_infonce", "nt_xent", "projection_head"]
