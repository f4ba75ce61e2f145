"""MoCo v1 and v2 (He et al. 2020; Chen et al. 2020): a query encoder trained by gradient, a key encoder
that trails it by momentum, and a queue of past keys as negatives; with labels, the supervised
contrastive loss over the queue (label-aware MoCo). Their specs (options, views, recipes) are in `mirl.methods`.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from mirl.distributed import (
    batchnorm_variants,
    gather_no_grad,
    is_distributed,
    is_main_process,
    rank,
    shuffle_across_ranks,
    unshuffle_across_ranks,
)
from mirl.encoders import STOCHASTIC_LAYERS, build_encoder, projection_head
from mirl.errors import InputError
from mirl.method_spec import TrainingPlan
from mirl.methods import MoCoOptions
from mirl.pretraining_method import PretrainingMethod
from mirl.runtime import full_precision
from mirl.teacher import MomentumTeacher

MIN_VALUES_PER_GROUP = 16


def _channels_to_end(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, *spatial, C), for images (4-D) and volumes (5-D) alike."""
    return x.permute(0, *range(2, x.dim()), 1)


def _side_by_side(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, *spatial) -> (N / groups * spatial, groups * C): the channels of the batch's `groups` equal
    chunks side by side, so each (chunk, channel) pair is one column of a batch-norm kernel."""
    return _channels_to_end(x).reshape(groups, -1, x.shape[1]).transpose(0, 1).reshape(-1, groups * x.shape[1])


def _back_to_images(columns: torch.Tensor, like: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of `_side_by_side`, in channels_last layout (channels_last_3d for volumes; a tensor of its own,
    not a view, so that in-place layers may follow)."""
    layout = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    images = torch.empty(like.shape, dtype=columns.dtype, device=columns.device, memory_format=layout)
    _channels_to_end(images).view(groups, -1, like.shape[1]).copy_(columns.view(-1, groups, like.shape[1])
                                                                   .transpose(0, 1))
    return images


class _GroupBatchNorm(torch.autograd.Function):
    """Batch norm of each of `groups` equal chunks of a batch, all in one call of the native kernel (and
    one of its backward): a Python loop of one call per chunk, or autograd through a generic reduction,
    made batch norm the largest cost of a MoCo step.

    The running statistics move towards the mean of the chunks' statistics, as fb/moco's single-GPU
    split BN keeps them (and as each GPU's BN does under shuffle-BN, each from its own share).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, groups: int, momentum: float, eps: float) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        columns = _side_by_side(x, groups)
        weights, means, variances = (torch.cat([t] * groups) for t in (weight, running_mean, running_var))
        out, mean, invstd = torch.native_batch_norm(columns, weights, torch.cat([bias] * groups), means, variances,
                                                    True, momentum, eps)
        for running, updated in ((running_mean, means), (running_var, variances)):
            torch.sum(updated.view(groups, -1), 0, out=running).div_(groups)
        ctx.save_for_backward(columns, weights, mean, invstd)
        ctx.groups, ctx.eps = groups, eps
        return _back_to_images(out, x, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        columns, weights, mean, invstd = ctx.saved_tensors
        groups = ctx.groups
        grad_columns, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            _side_by_side(grad, groups), columns, weights, None, None, mean, invstd, True, ctx.eps,
            [True, True, True])
        return (_back_to_images(grad_columns, grad, groups), grad_weight.view(groups, -1).sum(0),
                grad_bias.view(groups, -1).sum(0), None, None, None, None, None)


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are computed separately on `splits` chunks of the batch.

    The single-device stand-in for MoCo's shuffle-BN: with the key batch shuffled, query and key
    of a pair land in different BN groups, as they would on different GPUs. The running statistics
    follow the mean of the groups' statistics, as each GPU's would follow its own share. One class for
    images and volumes (`SplitBatchNorm2d`, `SplitBatchNorm3d` only check the input's rank).
    """

    mirl_batchnorm = True  # one of MIRL's own: not a variant that `batchnorm_variants` warns of
    spatial_dims = 2

    def __init__(self, num_features: int, splits: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.splits = splits
        self.groups_used: int | None = None  # at the last training forward

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected {self.spatial_dims + 2}-D input, got {x.dim()}-D")

    def groups_for(self, batch: int, values_per_image: int) -> int:
        """How many equal groups a batch of `batch` images is normalised in: at most `splits`, each of at
        least two images and MIN_VALUES_PER_GROUP values per channel (with two images at 1 x 1, a small
        input's last stage, a group would normalise 2 numbers and gradients explode), dividing the batch."""
        most = min(self.splits, batch // 2, batch * values_per_image // MIN_VALUES_PER_GROUP)
        return next(g for g in range(max(1, most), 0, -1) if batch % g == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.groups_for(x.shape[0], math.prod(x.shape[2:])) if self.training else 1
        if self.training:
            self.groups_used = groups
        if groups == 1:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        return _GroupBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, groups,
                                     self.momentum, self.eps)


class SplitBatchNorm2d(SplitBatchNorm):
    spatial_dims = 2


class SplitBatchNorm3d(SplitBatchNorm):
    spatial_dims = 3


SPLIT_KINDS: dict[type[nn.Module], type[SplitBatchNorm]] = {nn.BatchNorm2d: SplitBatchNorm2d,
                                                            nn.BatchNorm3d: SplitBatchNorm3d}


def split_batchnorm(encoder: nn.Module, splits: int, arch: str) -> nn.Module:
    """`encoder` with every BatchNorm2d (BatchNorm3d) replaced by a SplitBatchNorm2d (3d) of `splits` groups with the
    same settings.
    An encoder without BatchNorm (ConvNeXt's LayerNorm) is returned as it is: it mixes nothing across the
    batch, so a key cannot cheat through it; one with BatchNorm variants MIRL cannot split is refused."""
    variants = batchnorm_variants(encoder)
    if variants:
        raise InputError(f"--arch {arch} normalises with {', '.join(variants)}, which MoCo's split-batch BatchNorm "
                         "cannot replace without changing the network: use --bn-splits 1 (no shuffle-BN stand-in) "
                         "or train under torchrun (shuffle-BN across processes)")
    for parent in list(encoder.modules()):
        for name, child in parent.named_children():
            if type(child) in SPLIT_KINDS:
                split = SPLIT_KINDS[type(child)](child.num_features, splits, eps=child.eps, momentum=child.momentum)
                split.load_state_dict(child.state_dict())
                setattr(parent, name, split)
    return encoder


class MomentumQueue(nn.Module):
    """A FIFO of the most recent K keys, stored as a ring buffer (any K, any batch size), with each
    key's label vector beside it when `label_dim` > 0 (label-aware MoCo).

    Only keys that were really enqueued serve as negatives. The reference starts from K random
    unit vectors instead; on a dataset of similar-looking scans those are such easy negatives that
    the cheapest way to lower the loss is to map every image to one point, and training collapses
    before the queue has filled with real keys.

    Enqueued keys wait until the next `negatives()` (or `state_dict()`) to enter the buffer: by then the
    step that used the buffer has run its backward, so `negatives()` can hand out the buffer itself
    instead of a copy (fb/moco clones the whole queue every step). How full the queue is lives on the
    host too, so no step waits for the device to say it.
    """

    def __init__(self, dim: int, size: int, label_dim: int = 0) -> None:
        super().__init__()
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, label_dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._host_filled: int | None = 0
        self.register_load_state_dict_pre_hook(self._forget_host_count)

    def negatives(self) -> torch.Tensor:
        """The keys enqueued so far (all K once the queue has wrapped around): a view of the buffer, valid
        until the next `negatives()`."""
        self._flush()
        return self.keys[:self._count()]

    def negative_labels(self) -> torch.Tensor:
        """The label vectors of `negatives()`, row for row."""
        self._flush()
        return self.labels[:self._count()]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Let `keys` replace the oldest entries (only the newest K if more than K are given)."""
        self._flush()
        self._pending = (keys.detach(), None if labels is None else labels.detach())

    def _count(self) -> int:
        if self._host_filled is None:  # after loading a state: asked of the device once
            self._host_filled = int(self.filled)
        return self._host_filled

    def _forget_host_count(self, *_: object) -> None:
        self._pending, self._host_filled = None, None

    @torch.no_grad()
    def _flush(self) -> None:
        if self._pending is None:
            return
        keys, labels = self._pending
        self._pending = None
        size = self.keys.shape[0]
        keys = keys[-size:]
        slots = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.keys[slots] = keys.to(self.keys.dtype)
        if labels is not None:
            self.labels[slots] = labels[-size:].to(self.labels.dtype)
        self.pointer.copy_((self.pointer + keys.shape[0]) % size)
        self.filled.copy_(torch.clamp(self.filled + keys.shape[0], max=size))
        self._host_filled = min(self._count() + keys.shape[0], size)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._flush()  # a saved state holds every key enqueued so far
        super()._save_to_state_dict(destination, prefix, keep_vars)


@full_precision
def infonce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's InfoNCE: each query (unit vector) against its own key (the positive, logit 0) and every key of
    the queue; the cross-entropy of picking the positive, and the logits (N x (1 + K))."""
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ negatives.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device)), logits


def own_positions(q: torch.Tensor) -> torch.Tensor:
    """Where this rank's queries' own keys sit in the batch of keys gathered from all ranks."""
    return rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device)


@full_precision
def batch_infonce(q: torch.Tensor, batch_keys: torch.Tensor, own: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with the other keys of the (gathered) batch as the negatives: query i's positive is key
    `own[i]`. MoCo uses it on the first step of a run only, when the queue holds no key yet: against an
    empty queue the loss is 0 and the step would train nothing."""
    logits = q @ batch_keys.t() / temperature
    return F.cross_entropy(logits, own), logits


def jaccard_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|A and B| / |A or B| of every row of the 0/1 matrix `a` with every row of `b`; 0 where both are empty.

    For one-hot labels this is 1 for the same class and 0 otherwise; for multi-label sets it weighs a
    pair by how much of their findings they share."""
    dtype = torch.promote_types(a.dtype, torch.float32) if a.is_floating_point() else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    shared = a @ b.t()
    union = a.sum(dim=1, keepdim=True) + b.sum(dim=1)[None, :] - shared
    return torch.where(union > 0, shared / union.clamp(min=1e-12), torch.zeros_like(shared))


@full_precision
def label_aware_infonce(q: torch.Tensor, batch_keys: torch.Tensor, queue_keys: torch.Tensor,
                        labels: torch.Tensor, batch_labels: torch.Tensor, queue_labels: torch.Tensor,
                        own: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The supervised contrastive loss of Khosla et al. (2020) over MoCo's keys, and its logits (N x (batch
    keys + queue)).

    Query i (unit vector) is compared with every key of the batch (gathered from all ranks) and of the
    queue. Its positives are its own key (index `own[i]` among the batch keys, weight 1) and every key
    whose labels overlap its own, weighted by the Jaccard overlap; the loss is the weighted mean of
    -log softmax over those positives. Label rows are all zero for unlabelled images: such a query has
    only its own key as positive and keeps plain MoCo's objective, its key against the queue (the
    batch's other keys, which MoCo never uses, are hidden from it). When no two images share a label
    the loss is InfoNCE with the batch and the queue as negatives.
    """
    keys = torch.cat([batch_keys, queue_keys])
    logits = q @ keys.t() / temperature
    rows = torch.arange(q.shape[0], device=q.device)
    weights = jaccard_overlap(labels, torch.cat([batch_labels, queue_labels]))
    weights[rows, own] = 1.0
    labelled = labels.sum(dim=1) > 0
    hidden = ~labelled[:, None] & (torch.arange(keys.shape[0], device=q.device) < batch_keys.shape[0])[None, :]
    hidden[rows, own] = False
    log_probability = logits.masked_fill(hidden, float("-inf")).log_softmax(dim=1)
    weighted = torch.where(weights > 0, weights * log_probability, torch.zeros_like(log_probability))
    return (-weighted.sum(dim=1) / weights.sum(dim=1)).mean(), logits


class MoCo(PretrainingMethod):
    """Momentum Contrast: a query encoder trained by gradient, a key encoder that trails it by
    momentum, and a queue of past keys as negatives (He et al. 2020; v2 head and temperature by flags).

    With `label_dim` > 0 the queue keeps each key's labels and the loss is `label_aware_infonce`:
    images of the same class are positives too, unlabelled ones keep the self-supervised objective.
    """

    def __init__(self, arch: str, head: str = "linear", dim: int = 128, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.07, bn_splits: int = 8,
                 label_dim: int = 0) -> None:
        super().__init__()
        self.momentum = momentum
        self.temperature = temperature
        # under DDP the batch is shuffled across GPUs; on one device BN groups stand in for them
        splits = 1 if is_distributed() else bn_splits
        self.encoder_q, feature_dim = build_encoder(arch)
        self.encoder_k, _ = build_encoder(arch)
        if splits > 1:
            self.encoder_q = split_batchnorm(self.encoder_q, splits, arch)
            self.encoder_k = split_batchnorm(self.encoder_k, splits, arch)
        self.head_q = projection_head(head, feature_dim, dim)
        self.head_k = projection_head(head, feature_dim, dim)
        self.queue = MomentumQueue(dim, queue_size, label_dim)
        self._groups_reported = splits == 1
        self.teacher = MomentumTeacher([self.encoder_q, self.head_q], [self.encoder_k, self.head_k])

    def train(self, mode: bool = True) -> "MoCo":
        """Train mode for both encoders' BatchNorm, but never random layers in the key encoder (EfficientNet's
        stochastic depth): a key must be a function of the key encoder's weights and its view alone."""
        super().train(mode)
        for module in self.encoder_k.modules():
            if isinstance(module, STOCHASTIC_LAYERS):
                module.eval()
        return self

    def _online_params(self) -> list[nn.Parameter]:
        return self.teacher.student_parameters()

    def report_batchnorm_groups(self) -> str | None:
        """After a training forward: a note when split-batch BatchNorm normalised some layers in fewer groups
        than `--bn-splits` (a small batch, or late feature maps too small for groups of 16 values per
        channel), else None. The stand-in for shuffle-BN is then weaker in those layers."""
        layers = [m for m in self.encoder_q.modules() if isinstance(m, SplitBatchNorm) and m.groups_used]
        fewer = [m.groups_used for m in layers if m.groups_used < m.splits]
        if not fewer:
            return None
        return (f"split-batch BatchNorm normalises {len(fewer)} of {len(layers)} layers in fewer groups than "
                f"--bn-splits {layers[0].splits} (as few as {min(fewer)}): each group keeps at least two images and "
                f"{MIN_VALUES_PER_GROUP} values per channel; a larger batch or input keeps more groups")

    def _target_params(self) -> list[nn.Parameter]:
        return self.teacher.teacher_parameters()

    def momentum_update(self) -> None:
        """p_k <- m p_k + (1 - m) p_q, as one fused operation over all parameters."""
        self.teacher.update(self.momentum)

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor) -> torch.Tensor:
        shuffled, inverse = shuffle_across_ranks(im_k)
        k = F.normalize(self.head_k(self.encoder_k(shuffled)), dim=1)
        return unshuffle_across_ranks(k, inverse)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE loss of a batch of queries against their keys and the queue; also the logits.
        `labels` (label-aware MoCo) are label vectors with "no finding", all zero when unknown."""
        q = F.normalize(self.head_q(self.encoder_q(im_q)), dim=1)
        if not self._groups_reported and self.training:  # said once, at a run's first step
            self._groups_reported = True
            note = self.report_batchnorm_groups()
            if note and is_main_process():
                print(f"note: {note}", file=sys.stderr)
        self.momentum_update()
        k = self.keys(im_k)
        # the losses compute their logits in fp32 under autocast (`full_precision`)
        if labels is not None:
            batch_keys, batch_labels = gather_no_grad(k), gather_no_grad(labels.float())
            loss, logits = label_aware_infonce(q, batch_keys, self.queue.negatives(), labels, batch_labels,
                                               self.queue.negative_labels(), own_positions(q), self.temperature)
            self.queue.enqueue(batch_keys, batch_labels)
            return loss, logits
        negatives = self.queue.negatives()
        if len(negatives) == 0:  # the first step: the batch's other keys are the negatives
            batch_keys = gather_no_grad(k)
            loss, logits = batch_infonce(q, batch_keys, own_positions(q), self.temperature)
            self.queue.enqueue(batch_keys)
            return loss, logits
        loss, logits = infonce(q, k, negatives, self.temperature)
        self.queue.enqueue(gather_no_grad(k))
        return loss, logits

    def feature_encoder(self) -> nn.Module:
        """The encoder a downstream task inherits: the query encoder."""
        return self.encoder_q


def build_moco(arch: str, options: MoCoOptions, plan: TrainingPlan, head: str = "linear") -> MoCo:
    """MoCo v1: a linear projection."""
    return MoCo(arch, head=head, queue_size=options.queue_size, momentum=options.moco_momentum,
                temperature=options.temperature, bn_splits=options.bn_splits, label_dim=plan.label_dim)


def build_moco_v2(arch: str, options: MoCoOptions, plan: TrainingPlan) -> MoCo:
    """MoCo v2: a 2-layer MLP projection."""
    return build_moco(arch, options, plan, head="mlp")
