"""torch.distributed glue: process-group set-up under torchrun and the collectives the methods need.

Every function also works in a single process, where the collectives reduce to the identity, so the
methods are written once for one device and many.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from mirl.errors import InputError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_environment(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU).

    On CUDA the rank's own GPU (LOCAL_RANK) becomes the current device first: NCCL's object collectives
    (checkpoint saving) and every tensor made without a device go to the current device, which is
    otherwise GPU 0 on every rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(value: object) -> list:
    """Every rank's `value`, in rank order (a one-item list in a single process)."""
    if not is_distributed():
        return [value]
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all ranks along dim 0 (no gradient)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the summed gradient of its own slice.

    A plain all_gather is not differentiable: a loss over gathered negatives would then train only
    on the local half of the similarities.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank() * ctx.batch:(rank() + 1) * ctx.batch]


class _SumWithGrad(torch.autograd.Function):
    """all_reduce (sum) whose backward sums the gradients the same way: every rank's loss depends
    on every rank's contribution."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from all ranks along dim 0, gradients flowing back."""
    return _GatherWithGrad.apply(tensor) if is_distributed() else tensor


@torch.no_grad()
def shuffle_across_ranks(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a batch shuffled across all ranks, and the permutation to undo it.

    MoCo's shuffle-BN: the key encoder sees a different mix of images in each BatchNorm than the
    query encoder, so the batch statistics cannot give away which key matches which query.
    """
    everything = gather_no_grad(batch)
    permutation = torch.randperm(everything.shape[0], device=batch.device)
    if is_distributed():
        dist.broadcast(permutation, src=0)
    local = permutation.view(world_size(), -1)[rank()]
    return everything[local], torch.argsort(permutation)


@torch.no_grad()
def unshuffle_across_ranks(batch: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Undo `shuffle_across_ranks` on the key encoder's output."""
    everything = gather_no_grad(batch)
    return everything[inverse.view(world_size(), -1)[rank()]]


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the whole global batch, all ranks together, with gradients through the statistics.

    SimCLR's global BN: with per-GPU statistics a view could find its twin by BN artefacts alone.
    torch's SyncBatchNorm does this on CUDA only; this version also runs on gloo (CPU), from one
    differentiable all_reduce of the per-channel sums. In one process it is plain BatchNorm.
    """

    mirl_batchnorm = True  # one of MIRL's own

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        channels, dims = x.shape[1], [0] + list(range(2, x.dim()))
        xf = x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([xf.numel() / channels])])
        total = _SumWithGrad.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean * mean
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), self.momentum)
            self.num_batches_tracked += 1
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def is_plain_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm MIRL may swap for another kind holding the same parameters: torch's BatchNorm1d/2d/3d, or one
    of MIRL's own (marked `mirl_batchnorm`). timm's BatchNormAct2d folds an activation in, so it is not."""
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) or \
        getattr(type(module), "mirl_batchnorm", False)


def batchnorm_variants(model: nn.Module) -> list[str]:
    """The names of the BatchNorm kinds in `model` that are not plain (`is_plain_batchnorm`): ones MIRL cannot
    swap for its split-batch or cross-process BatchNorm without changing the network."""
    return sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and not is_plain_batchnorm(m)})


def convert_to_cross_rank_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm in `module` use global-batch statistics: torch's SyncBatchNorm under NCCL,
    else (gloo on CPUs, or one process) a CrossRankBatchNorm holding the same parameters. Under torchrun a
    BatchNorm variant that cannot be swapped is refused (on either backend); in one process it is left as it
    is, since its own batch statistics are then the global batch's."""
    if is_distributed():
        variants = batchnorm_variants(module)
        if variants:
            raise InputError(f"{', '.join(variants)} cannot be made a cross-process BatchNorm without changing the "
                             "network; choose an encoder with plain BatchNorm (torchvision's, or timm's ResNets)")
        if dist.get_backend() == "nccl":
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _with_cross_rank_batchnorm(module)


def _with_cross_rank_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not is_plain_batchnorm(module):
            return module
        converted = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                       module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        return converted
    for name, child in module.named_children():
        module.add_module(name, _with_cross_rank_batchnorm(child))
    return module
