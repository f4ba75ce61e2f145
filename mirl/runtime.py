"""Where and how a run computes: its device, its autocast precision, its network's memory layout and
compilation, and its random seeds."""
from __future__ import annotations

import functools
import os
import random
import sys
import time
from contextlib import ExitStack
from typing import Callable, ParamSpec, TypeVar

import numpy as np
import torch
import torch.nn as nn

from mirl.distributed import local_rank, rank
from mirl.errors import InputError

Args = ParamSpec("Args")
Result = TypeVar("Result")


def full_precision(loss: Callable[Args, Result]) -> Callable[Args, Result]:
    """`loss` computed in fp32 whatever autocast a run trains under: its floating-point tensor arguments are
    cast to fp32 (at least) and autocast is off inside it. Casting the inputs alone is not enough: autocast lowers a
    matrix product of fp32 tensors to bf16 or fp16 anyway, which rounds contrastive logits (q.k / T with
    T = 0.07 magnifies the rounding 14 times)."""
    def fp32(value: object) -> object:  # at least fp32: a float64 input keeps its precision
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(torch.promote_types(value.dtype, torch.float32))
        return value

    @functools.wraps(loss)
    def in_fp32(*args: Args.args, **kwargs: Args.kwargs) -> Result:
        devices = {v.device.type for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)}
        with ExitStack() as stack:
            for device in sorted(devices):
                stack.enter_context(torch.autocast(device, enabled=False))
            return loss(*map(fp32, args), **{k: fp32(v) for k, v in kwargs.items()})
    return in_fp32


def resolve_device(requested: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; asking for CUDA without one is an input error."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None for fp32). `auto`: bf16 on Ampere+ GPUs and on CPUs with AMX/AVX-512
    bf16 (with AMX a MoCo v2 ResNet-50 step ran 1.8x faster than fp32), fp16 on older GPUs, fp32 elsewhere."""
    if requested == "fp32":
        return None
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_name(precision: torch.dtype | None) -> str:
    """The `--precision` name of an autocast dtype (None: fp32), as a run records it."""
    return PRECISION_NAMES[precision]


def prepare_network(model: nn.Module, device: torch.device, channels_last: bool, compile_encoders: bool,
                    spatial_dims: int = 2) -> nn.Module:
    """Move a network to its device, in channels_last layout when asked (channels_last_3d for a volume encoder:
    convolutions then skip layout conversions; a convolution runs channels_last when its weight is, whatever its
    input), and compile each encoder network inside it in place with torch.compile, so parameter names and
    checkpoints are unchanged."""
    layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    model = model.to(device, memory_format=layout) if channels_last else model.to(device)
    if compile_encoders:
        for module in model.modules():
            if getattr(module, "is_mirl_encoder", False):
                module.compile()
    return model


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; each rank gets its own stream so augmentations differ across GPUs.

    `deterministic` also forbids kernels whose result depends on scheduling (cuDNN autotuning, atomic
    adds on the GPU), so the same seed gives the same weights and a resumed run matches an unbroken one.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    seed = seed + rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class OtherProcessesLoad:
    """How many cores other processes kept busy while this run started, from the kernel's CPU counters
    (/proc/stat) less this process's own CPU time, over the run's start-up (listing data, building the
    model): no extra wait. On 2 cores a second torch job slows a run up to 15x, so a run says so at once
    instead of after an hour. None where /proc/stat does not exist."""

    def __init__(self) -> None:
        self.started = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(busy seconds of all cores, this process's CPU seconds, wall time), or None without /proc/stat."""
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and waiting for I/O
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system  # its finished workers too
        return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), own, time.monotonic()

    def cores(self) -> float | None:
        """The cores other processes kept busy since this object was made, on average."""
        now = self._sample()
        if self.started is None or now is None or now[2] - self.started[2] < 0.2:
            return None
        busy, own, wall = (b - a for a, b in zip(self.started, now))
        return max(0.0, (busy - own) / wall)

    def warn_if_busy(self) -> None:
        """One warning line on stderr when others kept at least half a core, and a quarter of the cores, busy."""
        cores, available = self.cores(), os.cpu_count() or 1
        if cores is not None and cores >= 0.5 and cores >= available / 4:
            print(f"warning: other processes kept {cores:.1f} of the {available} cores busy while this run started; "
                  "it will run slower than alone (two torch jobs on 2 cores: up to 15 times slower)", file=sys.stderr)
