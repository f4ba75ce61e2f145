"""Encoders and projection heads shared by every method.

The encoder is a plain torchvision model with its classifier removed, so the state dict a
pretraining run saves loads into `torchvision.models.resnet50()` (or `efficientnet_b0()`...) under
the same key names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
import torchvision


@dataclass(frozen=True)
class Architecture:
    """A torchvision classifier family usable as an encoder: its builder and the attribute that holds
    its ImageNet classifier (`fc` for ResNets, `classifier`, a dropout then a linear layer, for
    EfficientNets). Everything else (feature width, heads, checkpoint keys) follows from the model."""

    build: Callable[..., nn.Module]
    classifier: str

    @property
    def classifier_prefix(self) -> str:
        """How the classifier's parameter names start in a state dict."""
        return f"{self.classifier}."

    def output_layer(self, model: nn.Module) -> nn.Module:
        """The classifier's output layer (the last one of a Sequential)."""
        layer = getattr(model, self.classifier)
        return layer[-1] if isinstance(layer, nn.Sequential) else layer

    def output_prefix(self, model: nn.Module) -> str:
        """How the output layer's parameter names start in the model's state dict."""
        layer = getattr(model, self.classifier)
        return f"{self.classifier}.{len(layer) - 1}." if isinstance(layer, nn.Sequential) else self.classifier_prefix

    def replace_output_layer(self, model: nn.Module, layer: nn.Module) -> None:
        """Put `layer` where the classifier's output layer is."""
        current = getattr(model, self.classifier)
        if isinstance(current, nn.Sequential):
            current[-1] = layer
        else:
            setattr(model, self.classifier, layer)


ENCODERS: dict[str, Architecture] = {
    "resnet18": Architecture(torchvision.models.resnet18, "fc"),
    "resnet50": Architecture(torchvision.models.resnet50, "fc"),
    "efficientnet_b0": Architecture(torchvision.models.efficientnet_b0, "classifier"),
    "efficientnet_b1": Architecture(torchvision.models.efficientnet_b1, "classifier"),
    "efficientnet_b2": Architecture(torchvision.models.efficientnet_b2, "classifier"),
    "efficientnet_b3": Architecture(torchvision.models.efficientnet_b3, "classifier"),
}
# the network classes inside these encoders, compiled in place by --compile
ENCODER_CLASSES = (torchvision.models.ResNet, torchvision.models.EfficientNet)


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision model with `num_classes` outputs (never downloads weights)."""
    return ENCODERS[arch].build(weights=None, num_classes=num_classes)


def build_encoder(arch: str, norm_layer: Callable[[int], nn.Module] | None = None) -> tuple[nn.Module, int]:
    """The torchvision model without its classifier, and the width of the features it returns."""
    architecture = ENCODERS[arch]
    kwargs = {"norm_layer": norm_layer} if norm_layer is not None else {}
    model = architecture.build(weights=None, **kwargs)
    feature_dim = architecture.output_layer(model).in_features
    setattr(model, architecture.classifier, nn.Identity())
    return model, feature_dim


# layers whose output is random in train mode; only BatchNorm's train mode is wanted in MoCo's key encoder
STOCHASTIC_LAYERS = (nn.Dropout, nn.Dropout2d, torchvision.ops.StochasticDepth)

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
