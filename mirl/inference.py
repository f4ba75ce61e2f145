"""Inference over an evaluation split: outputs of every readable image, seen through the evaluation view."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from mirl.errors import InputError


@torch.no_grad()
def evaluation_outputs(model: nn.Module, loader: DataLoader, device: torch.device, precision: torch.dtype | None,
                       view: Callable[[torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's outputs (float32) and the label vectors of every readable image in an unshuffled `loader`,
    seen through the evaluation `view` (`InputSpace.evaluation_view`) in eval mode, and the dataset positions
    they belong to (unreadable images are left out). The model's train or eval mode is as before afterwards."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=precision) if precision else nullcontext()
    outputs, truths, kept = [], [], []
    position = 0
    for images, labels, ok in loader:
        kept.append(position + np.flatnonzero(ok.numpy()))
        position += len(ok)
        if not ok.any():
            continue
        with autocast:
            outputs.append(model(view(images[ok].to(device))).float().cpu())
        truths.append(labels[ok].numpy())
    model.train(was_training)
    if not truths:
        raise InputError("no image of the evaluation split could be read")
    return torch.cat(outputs).numpy(), np.concatenate(truths), np.concatenate(kept)


def predict(model: nn.Module, loader: DataLoader, device: torch.device, precision: torch.dtype | None,
            multilabel: bool, view: Callable[[torch.Tensor], torch.Tensor]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and predicted probabilities (sigmoid or softmax over the last axis of the model's output) of
    every readable image in an unshuffled `loader`, and the dataset positions they belong to."""
    logits, truths, kept = evaluation_outputs(model, loader, device, precision, view)
    logits = torch.from_numpy(logits)
    return truths, (logits.sigmoid() if multilabel else logits.softmax(dim=-1)).numpy(), kept
