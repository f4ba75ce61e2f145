"""BYOL, Bootstrap Your Own Latent (Grill et al. 2020): no negatives at all.

An online network (encoder, projector, predictor) learns to predict a target network's projection of
another view of the same image; the target is an exponential moving average of the online encoder and
projector, whose rate rises from 0.996 to 1 along a cosine over training. The predictor and the slowly
moving target are what keep the two networks from collapsing to a constant.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirl.distributed import convert_to_cross_rank_batchnorm
from mirl.encoders import build_encoder
from mirl.method_spec import TrainingPlan
from mirl.methods import BYOLOptions
from mirl.pretraining_method import PretrainingMethod
from mirl.runtime import full_precision
from mirl.teacher import MomentumTeacher, cosine_momentum

BASE_TARGET_MOMENTUM = 0.996
HIDDEN_DIM, PROJECTION_DIM = 4096, 256


@full_precision
def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The normalised mean squared error of each prediction and its target projection, averaged over
    the batch: |p/|p| - z/|z||^2 = 2 - 2 cos(p, z)."""
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=-1)).mean()


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector and predictor: Linear, BatchNorm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class BYOL(PretrainingMethod):
    """The online encoder, projector and predictor, and their target twins moved by EMA.

    Each view passes each network on its own, so BatchNorm normalises a view's batch with its own statistics
    (across every rank, as the paper's global BN), as the BYOL code and solo-learn do: one BatchNorm batch of
    both views would mix them. The loss is symmetric, each view's prediction against the other view's target.
    The step count is a buffer, so a resumed run continues the EMA schedule exactly.
    """

    def __init__(self, arch: str, total_steps: int, base_momentum: float = BASE_TARGET_MOMENTUM,
                 hidden_dim: int = HIDDEN_DIM, dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        self.total_steps, self.base_momentum = total_steps, base_momentum
        encoder, feature_dim = build_encoder(arch)
        self.online_encoder = convert_to_cross_rank_batchnorm(encoder)
        self.online_projector = convert_to_cross_rank_batchnorm(mlp(feature_dim, hidden_dim, dim))
        self.predictor = convert_to_cross_rank_batchnorm(mlp(dim, hidden_dim, dim))
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        self.teacher = MomentumTeacher([self.online_encoder, self.online_projector],
                                       [self.target_encoder, self.target_projector])
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _online_params(self) -> list[nn.Parameter]:
        return self.teacher.student_parameters()

    def _target_params(self) -> list[nn.Parameter]:
        return self.teacher.teacher_parameters()

    def update_target(self) -> None:
        """xi <- tau xi + (1 - tau) theta with tau on its schedule, as one fused operation; then one step on."""
        self.teacher.update(cosine_momentum(int(self.step), self.total_steps, self.base_momentum))
        self.step += 1

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:  # the online weights moved in the last optimizer step: the target follows first
            self.update_target()
        p1, p2 = (self.predictor(self.online_projector(self.online_encoder(view))) for view in (x1, x2))
        with torch.no_grad():
            z1, z2 = (self.target_projector(self.target_encoder(view)) for view in (x1, x2))
        return byol_loss(p1, z2) + byol_loss(p2, z1), p1

    def feature_encoder(self) -> nn.Module:
        """The encoder a downstream task inherits: the online encoder."""
        return self.online_encoder


def build_byol(arch: str, options: BYOLOptions, plan: TrainingPlan) -> BYOL:
    return BYOL(arch, plan.total_steps, base_momentum=options.target_momentum)
