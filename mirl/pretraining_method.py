"""The network side of a method's contract: what the one pretraining loop asks of every method.

A method's network takes the views its spec declares (`mirl.method_spec.View`, in that order) and, in a
label-aware run, the label vectors, and returns its loss and an output; everything that differs between methods
lives behind these few methods: its parameter groups (which weights decay), its hooks around the optimizer step
(gradient clipping, freezing a layer, the teacher update) and the numbers it logs.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class PretrainingMethod(nn.Module):
    """A self-supervised method's network. `forward(*views)` (or `forward(*views, labels)` for a label-aware
    method) returns (loss, output) and is what runs under DistributedDataParallel; the hooks run outside it."""

    def feature_encoder(self) -> nn.Module:
        """The encoder a downstream task inherits."""
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: by default every trained parameter, all with weight decay (as the
        MoCo, SimCLR and BYOL code bases give SGD; LARS makes its own groups)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def after_backward(self) -> None:
        """Called once the gradients are final (all-reduced across processes, unscaled), before the optimizer
        step: clip or drop gradients here."""

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step: move a teacher here."""

    def logged_scalars(self) -> dict[str, torch.Tensor]:
        """Numbers of the last training forward worth a curve in TensorBoard (train/NAME), beside the loss."""
        return {}
