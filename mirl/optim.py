"""Optimizers and learning-rate schedules of the papers: SGD with step or cosine decay, and LARS."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), as SimCLR trains with it.

    Each weight matrix's step is scaled by trust * |w| / (|g| + wd |w|), so layers learn at a pace set
    by their own size. Parameter groups with `lars=False` (biases and BatchNorm) get plain SGD with
    momentum and no weight decay.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 1e-3) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        # every parameter group in a handful of foreach calls (one kernel per group on a GPU), not a few
        # calls per parameter
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if group["lars"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
                weight_norms = torch.stack(torch._foreach_norm(params))
                update_norms = torch.stack(torch._foreach_norm(updates))
                trust = torch.where((weight_norms > 0) & (update_norms > 0),
                                    group["trust_coefficient"] * weight_norms / update_norms,
                                    torch.ones_like(weight_norms))
                torch._foreach_mul_(updates, list(trust.unbind()))
            # a parameter's first step starts its momentum buffer at the update; later steps decay it
            started = [(p, u) for p, u in zip(params, updates) if "momentum_buffer" in self.state[p]]
            for p, update in zip(params, updates):
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.clone(update).detach()
            if started:
                buffers = [self.state[p]["momentum_buffer"] for p, _ in started]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, [u for _, u in started])
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
        return loss


def lars_parameter_groups(model: nn.Module) -> list[dict]:
    """Weights adapt by LARS; biases and normalisation parameters (1-D) are excluded, as in SimCLR."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0}]


def schedule_factor(kind: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then cosine or step decay
    (x0.1 at 60 % and 80 % of training: MoCo's 120 and 160 of 200 epochs)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if kind == "step":
        return 0.1 ** sum(progress >= milestone for milestone in (0.6, 0.8))
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {kind}")


def cosine_between(start: float, end: float, step: int, total_steps: int) -> float:
    """`start` at step 0, `end` at `total_steps`, along a half cosine."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))


class PaperSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The learning rate of `schedule_factor` and, where `weight_decay_end` is given, the weight decay of every
    group that decays on a cosine from its own value to `weight_decay_end` (DINO's ViT recipe: 0.04 to 0.4).
    Both follow the step count, which the scheduler's state keeps, so a resumed run continues them exactly."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0,
                 weight_decay_end: float | None = None) -> None:
        self.total_steps, self.weight_decay_end = total_steps, weight_decay_end
        if weight_decay_end is not None:
            for group in optimizer.param_groups:
                group.setdefault("initial_weight_decay", group["weight_decay"])
        super().__init__(optimizer, lambda step: schedule_factor(kind, step, total_steps, warmup_steps))

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.weight_decay_end is None:
            return
        for group in self.optimizer.param_groups:
            if group["initial_weight_decay"] > 0:  # biases and norms stay without decay
                group["weight_decay"] = cosine_between(group["initial_weight_decay"], self.weight_decay_end,
                                                       self.last_epoch, self.total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0,
                    weight_decay_end: float | None = None) -> PaperSchedule:
    return PaperSchedule(optimizer, kind, total_steps, warmup_steps, weight_decay_end)
