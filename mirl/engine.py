"""The one training loop and what every run shares: device and precision, seeding, data loading,
prediction, checkpoints and logs.

Pretraining and downstream training differ only in the `step_loss` function and the end-of-epoch
callback they hand to `train_epochs`.
"""
from __future__ import annotations

import json
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from torchvision.models import ResNet
from tqdm import tqdm

from mirl.augment import normalize
from mirl.datasets import ImageDataset
from mirl.distributed import is_distributed, is_main_process, local_rank, rank
from mirl.errors import CheckpointError, InputError


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


def prepare_network(model: nn.Module, device: torch.device, channels_last: bool, compile_resnets: bool) -> nn.Module:
    """Move a network to its device, in channels_last layout when asked (convolutions then skip layout
    conversions; a convolution runs channels_last when its weight is, whatever its input), and compile
    each ResNet inside it in place with torch.compile, so parameter names and checkpoints are unchanged."""
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    if compile_resnets:
        for module in model.modules():
            if isinstance(module, ResNet):
                module.compile()
    return model


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; each rank gets its own stream so augmentations differ across GPUs."""
    seed = seed + rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loader(dataset: ImageDataset, batch_size: int, workers: int, shuffle: bool, drop_last: bool,
                seed: int) -> DataLoader:
    """A loader of uint8 batches; under DDP each rank reads its own shard, reshuffled every epoch."""
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last) \
        if is_distributed() and shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


@dataclass
class RunLog:
    """Where a run writes: TensorBoard events and JSON files, from the main process only."""

    output_dir: Path

    def __post_init__(self) -> None:
        self.writer = SummaryWriter(str(self.output_dir)) if is_main_process() else None

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(name, value, step)

    def json(self, name: str, payload: dict) -> None:
        if is_main_process():
            atomic_write_text(self.output_dir / name, json.dumps(payload, indent=2, default=str) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file of this process and rename: readers see the old or the new text."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(payload: dict, path: Path) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written checkpoint."""
    if not is_main_process():
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Load with torch's weights-only unpickler: a file carrying pickled code is refused, never run."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a loadable MIRL checkpoint ({reason[:200]})") from None


class TrainingStep:
    """One optimisation step: `step_loss(images, labels)` under autocast, backward (scaled for fp16),
    optimizer and scheduler. A non-finite loss stops training before it corrupts the weights."""

    def __init__(self, step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                 device: torch.device, precision: torch.dtype | None) -> None:
        self.step_loss, self.optimizer, self.scheduler = step_loss, optimizer, scheduler
        self.device, self.precision = device, precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
        self.steps = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.autocast(self.device.type, dtype=self.precision) if self.precision else nullcontext():
            loss = self.step_loss(images, labels)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {self.steps}; "
                                     "lower the learning rate or use --precision fp32")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        return value


def train_epochs(step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 loader: DataLoader, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, epochs: int, device: torch.device,
                 precision: torch.dtype | None, log: RunLog,
                 end_of_epoch: Callable[[int], dict[str, float]], train_mode: Callable[[], None]) -> None:
    """Run `epochs` epochs of `step_loss` (images, labels) -> loss; unreadable images are dropped
    from their batch and counted. `end_of_epoch(epoch)` returns numbers for the progress bar."""
    train_step = TrainingStep(step_loss, optimizer, scheduler, device, precision)
    skipped = 0
    epoch_bar = tqdm(range(epochs), desc="epochs", unit="epoch", disable=not is_main_process())
    for epoch in epoch_bar:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        train_mode()
        batch_bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                         disable=not is_main_process())
        for images, labels, ok in batch_bar:
            skipped += int((~ok).sum())
            if ok.sum() < 2:  # BatchNorm and contrastive pairs need at least two images
                continue
            loss = train_step(images[ok].to(device, non_blocking=True), labels[ok].to(device, non_blocking=True))
            log.scalar("train/loss", loss, train_step.steps)
            log.scalar("train/lr", optimizer.param_groups[0]["lr"], train_step.steps)
            batch_bar.set_postfix(loss=f"{loss:.4f}", skipped=skipped)
        log.scalar("data/skipped_images", skipped, epoch)
        summary = end_of_epoch(epoch)
        epoch_bar.set_postfix({k: f"{v:.4f}" for k, v in summary.items() if v is not None}, skipped=skipped)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, precision: torch.dtype | None,
            multilabel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and predicted probabilities (sigmoid or softmax) of every readable image in an unshuffled
    `loader`, and the dataset positions they belong to (unreadable images are left out)."""
    model.eval()
    autocast = torch.autocast(device.type, dtype=precision) if precision else nullcontext()
    truths, probabilities, kept = [], [], []
    position = 0
    for images, labels, ok in loader:
        kept.append(position + np.flatnonzero(ok.numpy()))
        position += len(ok)
        if not ok.any():
            continue
        with autocast:
            logits = model(normalize(images[ok].to(device))).float()
        probabilities.append((logits.sigmoid() if multilabel else logits.softmax(dim=1)).cpu().numpy())
        truths.append(labels[ok].numpy())
    if not truths:
        raise InputError("no image of the evaluation split could be read")
    return np.concatenate(truths), np.concatenate(probabilities), np.concatenate(kept)
