"""SimCLR (Chen et al. 2020): one encoder, a projection MLP, and NT-Xent over both views of the batch
gathered from every rank. Its spec (options, views, recipe) is in `mirl.methods`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirl.distributed import convert_to_cross_rank_batchnorm, gather_with_grad
from mirl.encoders import build_encoder, projection_head
from mirl.method_spec import TrainingPlan
from mirl.methods import SimCLROptions
from mirl.pretraining_method import PretrainingMethod
from mirl.runtime import full_precision


@full_precision
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over 2N views: each view's positive is its twin, the other 2N - 2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    similarity = z @ z.t() / temperature
    similarity.fill_diagonal_(float("-inf"))  # a view is not its own negative
    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, twin)


class SimCLR(PretrainingMethod):
    """A Simple framework for Contrastive Learning (Chen et al. 2020): one encoder, a projection
    MLP, and NT-Xent over both views of the batch gathered from every rank."""

    def __init__(self, arch: str, dim: int = 128, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature
        encoder, feature_dim = build_encoder(arch)
        # BN statistics over the global batch, as SimCLR computes them across its accelerators
        self.encoder = convert_to_cross_rank_batchnorm(encoder)
        self.head = convert_to_cross_rank_batchnorm(projection_head("mlp_bn", feature_dim, dim))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # both views in one pass: BatchNorm normalises over all 2N views, as in the paper
        z = self.head(self.encoder(torch.cat([x1, x2])))
        z1, z2 = (gather_with_grad(half) for half in z.split(x1.shape[0]))
        loss = nt_xent(z1, z2, self.temperature)
        return loss, z1

    def feature_encoder(self) -> nn.Module:
        return self.encoder


def build_simclr(arch: str, options: SimCLROptions, plan: TrainingPlan) -> SimCLR:
    return SimCLR(arch, temperature=options.temperature)
