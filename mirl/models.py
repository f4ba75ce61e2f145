"""Encoders, projection heads and the contrastive methods: MoCo (v1 and v2) and SimCLR.

The encoder is a plain torchvision model with its classifier removed, so the state dict a
pretraining run saves loads into `torchvision.models.resnet50()` under the same key names.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mirl.distributed import convert_to_cross_rank_batchnorm, gather_no_grad, gather_with_grad, is_distributed, \
    shuffle_across_ranks, unshuffle_across_ranks

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision model with `num_classes` outputs (never downloads weights)."""
    return ENCODERS[arch](weights=None, num_classes=num_classes)


def build_encoder(arch: str, norm_layer: Callable[[int], nn.Module] | None = None) -> tuple[nn.Module, int]:
    """The torchvision model without its classifier, and the width of the features it returns."""
    kwargs = {"norm_layer": norm_layer} if norm_layer is not None else {}
    model = ENCODERS[arch](weights=None, **kwargs)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, feature_dim


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed separately on `splits` chunks of the batch.

    The single-device stand-in for MoCo's shuffle-BN: with the key batch shuffled, query and key
    of a pair land in different BN groups, as they would on different GPUs. Running statistics
    are updated once per step from the whole batch.
    """

    def __init__(self, num_features: int, splits: int) -> None:
        super().__init__(num_features)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits <= 1:
            return super().forward(x)
        groups = x.chunk(max(1, min(self.splits, x.shape[0] // 2)))  # 2+ images per group
        # momentum 1 makes batch_norm leave each group's mean and unbiased variance in its buffers, so the
        # whole batch's statistics come without another pass over x (a separate x.var took 40 % of a step)
        means = [torch.zeros_like(self.running_mean) for _ in groups]
        variances = [torch.ones_like(self.running_var) for _ in groups]
        chunks = [F.batch_norm(group, mean, var, self.weight, self.bias, True, 1.0, self.eps)
                  for group, mean, var in zip(groups, means, variances)]
        with torch.no_grad():
            counts = torch.tensor([g.numel() // g.shape[1] for g in groups], dtype=self.running_mean.dtype,
                                  device=x.device)[:, None]
            means, variances = torch.stack(means), torch.stack(variances)
            mean = (counts * means).sum(0) / counts.sum()
            squares = ((counts - 1) * variances + counts * (means - mean) ** 2).sum(0)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(squares / (counts.sum() - 1), self.momentum)
            self.num_batches_tracked += 1
        return torch.cat(chunks)


def projection_head(kind: str, in_dim: int, out_dim: int = 128) -> nn.Module:
    """MoCo v1's linear layer, MoCo v2's 2-layer MLP, or SimCLR's MLP with BatchNorm."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    if kind == "mlp_bn":
        return nn.Sequential(nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                             nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))
    raise ValueError(f"unknown head {kind}")


class MomentumQueue(nn.Module):
    """A FIFO of the most recent K keys, stored as a ring buffer (any K, any batch size).

    Only keys that were really enqueued serve as negatives. The reference starts from K random
    unit vectors instead; on a dataset of similar-looking scans those are such easy negatives that
    the cheapest way to lower the loss is to map every image to one point, and training collapses
    before the queue has filled with real keys.
    """

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def negatives(self) -> torch.Tensor:
        """The keys enqueued so far (all K once the queue has wrapped around), as a copy."""
        return self.keys[:int(self.filled)].clone()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest entries with `keys` (only the newest K if more than K are given)."""
        size = self.keys.shape[0]
        keys = keys[-size:]
        slots = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.pointer.copy_((self.pointer + keys.shape[0]) % size)
        self.filled.copy_(torch.clamp(self.filled + keys.shape[0], max=size))


class MoCo(nn.Module):
    """Momentum Contrast: a query encoder trained by gradient, a key encoder that trails it by
    momentum, and a queue of past keys as negatives (He et al. 2020; v2 head and temperature by flags)."""

    def __init__(self, arch: str, head: str = "linear", dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.07, bn_splits: int = 8) -> None:
        super().__init__()
        self.momentum = momentum
        self.temperature = temperature
        # under DDP the batch is shuffled across GPUs; on one device BN groups stand in for them
        splits = 1 if is_distributed() else bn_splits
        norm = (lambda n: SplitBatchNorm2d(n, splits)) if splits > 1 else None
        self.encoder_q, feature_dim = build_encoder(arch, norm)
        self.encoder_k, _ = build_encoder(arch, norm)
        self.head_q = projection_head(head, feature_dim, dim)
        self.head_k = projection_head(head, feature_dim, dim)
        self.queue = MomentumQueue(dim, queue_size)
        for online, target in zip(self._online_params(), self._target_params()):
            target.data.copy_(online.data)
            target.requires_grad = False

    def _online_params(self) -> list[nn.Parameter]:
        return list(self.encoder_q.parameters()) + list(self.head_q.parameters())

    def _target_params(self) -> list[nn.Parameter]:
        return list(self.encoder_k.parameters()) + list(self.head_k.parameters())

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_k <- m p_k + (1 - m) p_q, as one fused operation over all parameters."""
        torch._foreach_lerp_(self._target_params(), self._online_params(), 1.0 - self.momentum)

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor) -> torch.Tensor:
        shuffled, inverse = shuffle_across_ranks(im_k)
        k = F.normalize(self.head_k(self.encoder_k(shuffled)), dim=1)
        return unshuffle_across_ranks(k, inverse)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE loss of a batch of queries against their keys and the queue; also the logits."""
        q = F.normalize(self.head_q(self.encoder_q(im_q)), dim=1)
        self.momentum_update()
        k = self.keys(im_k)
        q, k = q.float(), k.float()  # logits and loss in fp32 under autocast
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ self.queue.negatives().float().t()
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        self.queue.enqueue(gather_no_grad(k))
        return loss, logits

    def feature_encoder(self) -> nn.Module:
        """The encoder a downstream task inherits: the query encoder."""
        return self.encoder_q


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over 2N views: each view's positive is its twin, the other 2N - 2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    similarity = z @ z.t() / temperature
    similarity.fill_diagonal_(float("-inf"))  # a view is not its own negative
    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, twin)


class SimCLR(nn.Module):
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
        z1 = gather_with_grad(self.head(self.encoder(x1)))
        z2 = gather_with_grad(self.head(self.encoder(x2)))
        loss = nt_xent(z1, z2, self.temperature)
        return loss, z1

    def feature_encoder(self) -> nn.Module:
        return self.encoder
