"""Encoders and projection heads shared by every method.

An encoder is a torchvision model, or a timm model (`--arch timm:NAME`), with its classifier removed, so
the state dict a pretraining run saves loads into `torchvision.models.resnet50()` (or
`timm.create_model("NAME")`) under the same key names. Nothing is ever downloaded.

What the methods assume of an encoder, made explicit here: it maps an image batch to one feature vector
per image; MoCo's shuffle-BN substitute (`SplitBatchNorm2d`/`3d`) replaces whatever BatchNorm2d/3d layers it has
(a network without BatchNorm, such as ConvNeXt with LayerNorm, leaks nothing across a batch and needs
none); random layers (dropout, stochastic depth, timm's DropPath) are kept out of MoCo's key encoder.
Vision transformers (`timm:vit_small_patch16_224`) are built to take any input size (their position
embedding interpolated, as DINO's multi-crop needs) and hand on their class token; only a method with a
recipe for them trains them (DINO: MoCo, SimCLR and BYOL's recipes are the CNN papers'). Volume encoders
(`--arch resnet18_3d`, `resnet34_3d`, `resnet50_3d`, for `--dims 3`) are MONAI's 3-D ResNets on one input channel;
their BatchNorm3d is split or made cross-rank as the 2-D networks' BatchNorm2d is.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import timm
import timm.layers
import torch
import torch.nn as nn
import torchvision

from mirl.checkpoints import load_checkpoint
from mirl.errors import CheckpointError, InputError
from mirl.flags import TIMM_PREFIX, TORCHVISION_ENCODERS, VOLUME_ENCODERS


@dataclass(frozen=True)
class Architecture:
    """A classifier family usable as an encoder: how to build it with `num_classes` outputs, and the
    dotted name of the module that holds its classifier (`fc` for ResNets, `classifier`, a dropout then a
    linear layer, for torchvision's EfficientNets, `head.fc` for timm's ConvNeXt). Everything else (feature
    width, heads, checkpoint keys) follows from the model."""

    build: Callable[[int], nn.Module]
    classifier: str
    transformer: bool = False
    spatial_dims: int = 2  # 3: a volume encoder, B x 1 x D x H x W in

    @property
    def classifier_prefix(self) -> str:
        """How the classifier's parameter names start in a state dict."""
        return f"{self.classifier}."

    def output_layer(self, model: nn.Module) -> nn.Module:
        """The classifier's output layer (the last one of a Sequential)."""
        layer = model.get_submodule(self.classifier)
        return layer[-1] if isinstance(layer, nn.Sequential) else layer

    def output_prefix(self, model: nn.Module) -> str:
        """How the output layer's parameter names start in the model's state dict."""
        layer = model.get_submodule(self.classifier)
        return f"{self.classifier}.{len(layer) - 1}." if isinstance(layer, nn.Sequential) else self.classifier_prefix

    def replace_output_layer(self, model: nn.Module, layer: nn.Module) -> None:
        """Put `layer` where the classifier's output layer is."""
        current = model.get_submodule(self.classifier)
        if isinstance(current, nn.Sequential):
            current[-1] = layer
        else:
            parent, _, name = self.classifier.rpartition(".")
            setattr(model.get_submodule(parent), name, layer)


def torchvision_architecture(builder: Callable[..., nn.Module], classifier: str) -> Architecture:
    return Architecture(lambda num_classes: builder(weights=None, num_classes=num_classes), classifier)


# ResNets keep their classifier in `fc`, EfficientNets in `classifier` (a dropout, then the linear layer)
ENCODERS: dict[str, Architecture] = {
    name: torchvision_architecture(getattr(torchvision.models, name),
                                   "fc" if name.startswith("resnet") else "classifier")
    for name in TORCHVISION_ENCODERS}


def monai_resnet(depth: int) -> Architecture:
    """MONAI's 3-D ResNet of `depth` for one-channel volumes, shaped as torchvision's 2-D ResNet is: a stride-2
    7^3 stem then a max pool (MONAI's default stem keeps stride 1, which costs 5x the compute at 32^3),
    projection shortcuts without bias, BatchNorm3d; its classifier is `fc`, as torchvision's ResNets'."""
    from monai.networks.nets import resnet  # heavy to import: only when a 3-D encoder is asked for
    builder = getattr(resnet, f"resnet{depth}")
    return Architecture(lambda num_classes: builder(spatial_dims=3, n_input_channels=1, conv1_t_stride=2,
                                                    bias_downsample=False, num_classes=num_classes),
                        "fc", spatial_dims=3)


@cache
def timm_architecture(arch: str) -> Architecture:
    """A timm model by name (`timm:convnext_atto`), checked to be one MIRL can train: built once without
    weights to read where its classifier is and whether it is a transformer."""
    name = arch.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        raise InputError(f"--arch {arch}: timm has no model {name!r} (timm.list_models() lists them)")
    probe = timm.create_model(name, pretrained=False, num_classes=1)
    # a transformer's position embedding is sized for one input: built to interpolate it to any size instead
    options = {"dynamic_img_size": True} if hasattr(probe, "patch_embed") else {}
    if options:
        try:
            probe = timm.create_model(name, pretrained=False, num_classes=1, **options)
        except TypeError:
            raise InputError(f"--arch {arch} is a transformer that takes one input size only; MIRL trains those "
                             "whose position embedding adapts (timm's ViTs: timm:vit_small_patch16_224, ...)") from None
    classifier = probe.default_cfg.get("classifier")
    if not isinstance(classifier, str) or not isinstance(probe.get_submodule(classifier), nn.Linear):
        raise InputError(f"--arch {arch}: its classifier is not one linear layer, which MIRL replaces")
    return Architecture(lambda num_classes: timm.create_model(name, pretrained=False, num_classes=num_classes,
                                                              **options), classifier, transformer=bool(options))


def architecture(arch: str) -> Architecture:
    """The registered torchvision architecture, or a timm one (`timm:NAME`); an unknown name is an input error."""
    if arch in ENCODERS:
        return ENCODERS[arch]
    if arch in VOLUME_ENCODERS:
        return monai_resnet(int(arch.removeprefix("resnet").removesuffix("_3d")))
    if arch.startswith(TIMM_PREFIX):
        return timm_architecture(arch)
    raise InputError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ENCODERS))}, "
                     f"{', '.join(VOLUME_ENCODERS)} (--dims 3), or timm:NAME")


def known_architecture(arch: object) -> bool:
    """Whether a checkpoint's `arch` names an architecture MIRL can build."""
    if not isinstance(arch, str):
        return False
    try:
        architecture(arch)
    except InputError:
        return False
    return True


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised model with `num_classes` outputs (never downloads weights)."""
    model = architecture(arch).build(num_classes)
    model.is_mirl_encoder = True  # what --compile compiles in place
    return model


def build_encoder(arch: str) -> tuple[nn.Module, int]:
    """The model without its classifier, and the width of the features it returns."""
    family = architecture(arch)
    model = build_classifier(arch, 1)
    feature_dim = family.output_layer(model).in_features
    parent, _, name = family.classifier.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.Identity())
    return model, feature_dim


def input_shape(size: int | tuple[int, ...]) -> tuple[int, ...]:
    """One input of `size`: C x S x S for a 2-D side, 1 x D x H x W for a volume's (D, H, W)."""
    return (3, size, size) if isinstance(size, int) else (1, *size)


@cache
def check_input_size(arch: str, size: int | tuple[int, ...]) -> None:
    """Refuse, before any data is listed, an architecture that cannot take inputs of `size` (a 2-D side in
    pixels, or a volume's D, H, W): its dimensions must be the input's, and one forward pass of a tiny batch
    decides the rest, whatever the model contains (a window or grid attention that needs a multiple of its
    window, a stage that runs out of pixels), not its name."""
    family = architecture(arch)
    dims = 2 if isinstance(size, int) else len(size)
    if family.spatial_dims != dims:
        hint = f"with --dims 3 choose {', '.join(VOLUME_ENCODERS)}" if dims == 3 else "it needs --dims 3"
        raise InputError(f"--arch {arch} is a {family.spatial_dims}-D encoder and the run's inputs are {dims}-D; "
                         f"{hint}")
    encoder, _ = build_encoder(arch)
    shown = f"{size} px images" if dims == 2 else f"{'x'.join(map(str, size))} voxel volumes"
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(2, *input_shape(size)))
    except Exception as error:  # a model's own check is an assert, a shape error, a ValueError...
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        flag = "--image-size" if dims == 2 else "--volume-size"
        raise InputError(f"--arch {arch} cannot take {shown} ({type(error).__name__}"
                         f"{': ' + reason if reason else ''}); choose another {flag} or --arch") from None


def local_weights(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """A local state dict of the architecture (`--init-weights`: ImageNet weights saved beforehand; nothing is
    downloaded), without its classifier; checked to fit the architecture now, before any data is read."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors)")
    weights = {k: v for k, v in state.items() if not k.startswith(architecture(arch).classifier_prefix)}
    load_encoder(build_classifier(arch, 1), weights, path, arch)
    return weights


def load_encoder(model: nn.Module, encoder: dict[str, torch.Tensor], source: Path, arch: str) -> None:
    """Load encoder weights into a classifier or an encoder; only a classifier may be left out."""
    head = architecture(arch).classifier_prefix
    try:
        missing, unexpected = model.load_state_dict(encoder, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"{source} does not fit the model: {str(error).splitlines()[1].strip()}") from None
    if unexpected or any(not k.startswith(head) for k in missing):
        raise CheckpointError(f"{source} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def start_encoders_from(model: nn.Module, weights: dict[str, torch.Tensor], source: Path, arch: str) -> None:
    """Load `weights` into every encoder inside a method's network (MoCo's query and key encoders, BYOL's
    online and target ones), so that they start equal, from those weights."""
    encoders = [m for m in model.modules() if getattr(m, "is_mirl_encoder", False)]
    for encoder in encoders:
        load_encoder(encoder, weights, source, arch)


# layers whose output is random in train mode; only BatchNorm's train mode is wanted in MoCo's key encoder
STOCHASTIC_LAYERS = (nn.Dropout, nn.Dropout2d, torchvision.ops.StochasticDepth, timm.layers.DropPath)


class LearnedScale(nn.Module):
    """A learned scale per feature, starting at 1: after a BatchNorm without affine parameters it is a
    BatchNorm that scales but does not shift (TensorFlow's `center=False, scale=True`)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def projection_head(kind: str, in_dim: int, out_dim: int = 128) -> nn.Module:
    """MoCo v1's linear layer, MoCo v2's 2-layer MLP, or SimCLR's MLP with BatchNorm (its last BatchNorm
    scales but does not shift, as google-research/simclr's `center=False` output layer)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
    if kind == "mlp_bn":
        return nn.Sequential(nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
                             nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False),
                             LearnedScale(out_dim))
    raise ValueError(f"unknown head {kind}")
