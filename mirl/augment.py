"""Augmentation of whole batches on the training device, with random parameters drawn per image.

Data-loader workers only decode files into uint8 tensors; the crop, flip, rotation, intensity
jitter and blur of every view happen here in a few batched tensor operations. Each image draws its
own parameters (a torchvision transform applied to a batch tensor would draw one set for all).

Each method names the papers' recipe of each of its views (`RECIPES`); a modality's recipe family
(`--augment`, `MODALITY_RECIPES`) turns a paper recipe into one that fits the images: the crops, blur and a
method's asymmetry between views stay, the intensity and orientation transforms change (hue means nothing
on a CT window, colour is diagnostic on a dermoscopy photograph, which has no canonical orientation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from mirl.method_spec import View

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_SIZE = 224  # blur sigmas in the papers are in pixels of a 224-pixel image
# Images reach the augmentation at SOURCE_SCALE x the network's input side, so a crop is cut from the
# source resolution, as torchvision's RandomResizedCrop cuts it from the original: a 0.2-area crop for a
# 224-pixel input is backed by 200 source pixels, not by 100 pixels upsampled from an already shrunk image.
SOURCE_SCALE = 2
# evaluation sees the centre of the image, as MoCo's Resize(256) + CenterCrop(224)
CENTRE_CROP = 224 / 256


def source_side(image_size: int) -> int:
    """The side of the square images the loaders deliver for a network input of `image_size`."""
    return SOURCE_SCALE * image_size


@dataclass(frozen=True)
class AugmentRecipe:
    """Ranges of the random transforms; a zero strength or probability switches a transform off."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    quarter_turns: bool = False  # also turn by 0, 90, 180 or 270 degrees: with the flip, all 8 symmetries of a square
    rotation_degrees: float = 0.0
    jitter_p: float = 0.0
    brightness: float = 0.0  # intensity x U(1 - b, 1 + b)
    contrast: float = 0.0  # around the image's mean grey level
    saturation: float = 0.0
    hue: float = 0.0
    level: float = 0.0  # + U(-l, l): a window's level moved by l of its width (CT), an MR intensity offset
    width: float = 0.0  # around mid-grey x U(1 - w, 1 + w): a window's width changed (CT)
    gamma: float = 0.0  # intensity ** exp(U(-g, g)) (MR)
    grayscale_p: float = 0.0
    grayscale_first: bool = False  # fb/moco's v1 turns images grey before the colour jitter, v2 after it
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


RECIPES: dict[str, AugmentRecipe] = {
    # He et al. 2020, MoCo v1
    "moco": AugmentRecipe(crop_scale=(0.2, 1.0), jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4,
                          hue=0.4, grayscale_p=0.2, grayscale_first=True),
    # Chen et al. 2020, MoCo v2: weaker hue, jitter with p 0.8, Gaussian blur
    "mocov2": AugmentRecipe(crop_scale=(0.2, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
                            hue=0.1, grayscale_p=0.2, blur_p=0.5),
    # Chen et al. 2020, SimCLR (colour strength s = 1)
    "simclr": AugmentRecipe(crop_scale=(0.08, 1.0), jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8,
                            hue=0.2, grayscale_p=0.2, blur_p=0.5),
    # Grill et al. 2020, BYOL: asymmetric views, blur always on the first and rarely on the second, which is
    # solarised now and then
    "byol_view1": AugmentRecipe(crop_scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                                hue=0.1, grayscale_p=0.2, blur_p=1.0),
    "byol_view2": AugmentRecipe(crop_scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                                hue=0.1, grayscale_p=0.2, blur_p=0.1, solarize_p=0.2),
    # Caron et al. 2021, DINO (facebookresearch/dino DataAugmentationDINO): BYOL's colour, and per view blur always
    # on the first global view, rarely on the second (then solarised now and then), half the time on the local
    # ones; the crop areas here are the ViT recipe's, the ResNet recipe's come with the method's views
    "dino_global1": AugmentRecipe(crop_scale=(0.4, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                                  hue=0.1, grayscale_p=0.2, blur_p=1.0),
    "dino_global2": AugmentRecipe(crop_scale=(0.4, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                                  hue=0.1, grayscale_p=0.2, blur_p=0.1, solarize_p=0.2),
    "dino_local": AugmentRecipe(crop_scale=(0.05, 0.4), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                                hue=0.1, grayscale_p=0.2, blur_p=0.5),
    # fine-tuning and the supervised baseline: mild crop and flip only
    "finetune": AugmentRecipe(crop_scale=(0.7, 1.0), flip_p=0.5),
    # MoCo's linear protocol (main_lincls): RandomResizedCrop with torchvision's default scale, and flip
    "linear": AugmentRecipe(crop_scale=(0.08, 1.0), flip_p=0.5),
}


def _grey(paper: AugmentRecipe) -> AugmentRecipe:
    """Any grey-scale image (X-ray; the CT and MR default): brightness and contrast of the image, at most the
    papers' 0.4, and a rotation of up to 10 degrees in place of hue, saturation, grayscale and solarisation."""
    return replace(paper, saturation=0.0, hue=0.0, grayscale_p=0.0, solarize_p=0.0, rotation_degrees=10.0,
                   brightness=min(paper.brightness, 0.4), contrast=min(paper.contrast, 0.4))


def _ct(paper: AugmentRecipe) -> AugmentRecipe:
    """CT: the meaning is in Hounsfield units, so the jitter moves the window (its level by up to a tenth of
    its width, its width by up to 20 %) rather than scaling intensities or hue; small rotations."""
    return replace(_grey(paper), brightness=0.0, contrast=0.0, level=0.1, width=0.2)


def _mr(paper: AugmentRecipe) -> AugmentRecipe:
    """MR: intensities are arbitrary per scanner and sequence: an intensity scale (up to 20 %), an offset and
    a gamma; small rotations."""
    return replace(_grey(paper), brightness=0.2, contrast=0.0, level=0.1, gamma=0.3)


def _dermoscopy(paper: AugmentRecipe) -> AugmentRecipe:
    """Dermoscopy: a lesion photographed from above has no up or left, so every flip and quarter turn is
    another valid view; colour is diagnostic (the blue-white veil, a melanoma's many colours), so the jitter
    is mild (brightness, contrast and saturation 0.2, hue 0.02 of a turn) and no view turns grey or solarises."""
    return replace(paper, quarter_turns=True, brightness=min(paper.brightness, 0.2), contrast=min(paper.contrast, 0.2),
                   saturation=min(paper.saturation, 0.2), hue=min(paper.hue, 0.02), grayscale_p=0.0, solarize_p=0.0)


# `--augment NAME` (one of `mirl.config.AUGMENT_STYLES`): how a method's paper recipes are adapted to a modality
# (recorded in config.json)
MODALITY_RECIPES: dict[str, Callable[[AugmentRecipe], AugmentRecipe]] = {
    "paper": lambda paper: paper,  # the papers' recipes, tuned on ImageNet photographs
    "grey": _grey,
    "ct": _ct,
    "mr": _mr,
    "dermoscopy": _dermoscopy,
}


def recipe_for(name: str, style: str) -> AugmentRecipe:
    """The paper recipe `name` (a key of RECIPES) adapted by the modality family `style` (a key of
    MODALITY_RECIPES). The downstream recipes (`finetune`, `linear`) are the same for every modality."""
    paper = RECIPES[name]
    if name in ("finetune", "linear"):
        return paper
    return MODALITY_RECIPES[style](paper)


def view_recipe(view: View, style: str) -> AugmentRecipe:
    """The recipe of one of a method's views: its paper recipe adapted to the modality, with the crop's area
    range the method sets for the architecture where it sets one (DINO)."""
    recipe = recipe_for(view.recipe, style)
    return recipe if view.crop_scale is None else replace(recipe, crop_scale=view.crop_scale)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float batch to the ImageNet-normalised float input torchvision models expect."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class BatchAugment(torch.nn.Module):
    """Applies one recipe to a uint8 batch B x 3 x H x W, each image with its own random draw."""

    def __init__(self, recipe: AugmentRecipe, output_size: int) -> None:
        super().__init__()
        self.recipe = recipe
        self.output_size = output_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        x = self._crop_flip_rotate(x)
        if self.recipe.grayscale_first:
            x = self._jitter(self._grayscale(x))
        else:
            x = self._grayscale(self._jitter(x))
        x = self._blur(x)
        x = self._solarize(x)
        return normalize(x.clamp_(0.0, 1.0))

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(low, high)

    def _chance(self, n: int, p: float, device: torch.device) -> torch.Tensor:
        return torch.rand(n, device=device) < p

    def _crop_flip_rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Random resized crop, horizontal flip and rotation as one affine resampling per image."""
        r, n, device = self.recipe, x.shape[0], x.device
        width, height = random_resized_boxes(n, r.crop_scale, r.crop_ratio, device)
        centre_x = (torch.rand(n, device=device) * 2 - 1) * (1 - width)
        centre_y = (torch.rand(n, device=device) * 2 - 1) * (1 - height)
        flip = torch.where(self._chance(n, r.flip_p, device), -1.0, 1.0)
        angle = self._uniform(n, -r.rotation_degrees, r.rotation_degrees, device) * (math.pi / 180)
        if r.quarter_turns:
            angle = angle + torch.randint(0, 4, (n,), device=device) * (math.pi / 2)
        return affine_crop(x, width, height, centre_x, centre_y, self.output_size, flip, angle)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ColorJitter per image: brightness, contrast, saturation and hue (in HSV), each with
        its own factor per image, clamped to [0, 1] after each step, in a random order (drawn per batch,
        as kornia does; torchvision draws it per image)."""
        r, n, device = self.recipe, x.shape[0], x.device
        if r.jitter_p <= 0:
            return x
        apply = self._chance(n, r.jitter_p, device).view(n, 1, 1, 1)

        def factor(strength: float) -> torch.Tensor:
            return self._uniform(n, 1 - strength, 1 + strength, device).view(n, 1, 1, 1)

        steps = []
        if r.brightness > 0:
            steps.append(lambda y, f=factor(r.brightness): y * f)
        if r.contrast > 0:
            steps.append(lambda y, f=factor(r.contrast): blend(y, luminance(y).mean(dim=(1, 2, 3), keepdim=True), f))
        if r.saturation > 0:
            steps.append(lambda y, f=factor(r.saturation): blend(y, luminance(y), f))
        if r.hue > 0:
            steps.append(lambda y, shift=self._uniform(n, -r.hue, r.hue, device): adjust_hue(y, shift))
        if r.level > 0:
            steps.append(lambda y, shift=self._uniform(n, -r.level, r.level, device).view(n, 1, 1, 1): y + shift)
        if r.width > 0:
            steps.append(lambda y, f=factor(r.width): blend(y, torch.full_like(y[:, :1], 0.5), f))
        if r.gamma > 0:
            steps.append(lambda y, g=self._uniform(n, -r.gamma, r.gamma, device).exp().view(n, 1, 1, 1):
                         y.clamp(min=0.0) ** g)
        out = x
        for step in torch.randperm(len(steps)).tolist():
            out = steps[step](out).clamp(0.0, 1.0)
        return torch.where(apply, out, x)

    def _grayscale(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.grayscale_p <= 0:
            return x
        apply = self._chance(x.shape[0], self.recipe.grayscale_p, x.device).view(-1, 1, 1, 1)
        return torch.where(apply, luminance(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with a sigma drawn per image (scaled from 224-pixel terms)."""
        r, (n, c, h, w) = self.recipe, x.shape
        if r.blur_p <= 0:
            return x
        scale = self.output_size / REFERENCE_SIZE
        sigma = self._uniform(n, *r.blur_sigma, x.device) * scale
        radius = max(1, math.ceil(3 * r.blur_sigma[1] * scale))
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-offsets[None, :] ** 2 / (2 * sigma[:, None] ** 2))
        kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
        flat = x.reshape(1, n * c, h, w)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1),
                        groups=n * c)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * c, 1, -1, 1),
                        groups=n * c)
        apply = self._chance(n, r.blur_p, x.device).view(n, 1, 1, 1)
        return torch.where(apply, flat.view(n, c, h, w), x)


    def _solarize(self, x: torch.Tensor) -> torch.Tensor:
        """Invert every value at or above one half, in the images the draw picks."""
        if self.recipe.solarize_p <= 0:
            return x
        apply = self._chance(x.shape[0], self.recipe.solarize_p, x.device).view(-1, 1, 1, 1)
        return torch.where(apply & (x >= 0.5), 1.0 - x, x)


CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before it falls back to the centre


def random_resized_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float], device: torch.device,
                         attempts: int = CROP_ATTEMPTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The width and height (fractions of a square image's side) of `n` random resized crops, drawn as
    torchvision's `RandomResizedCrop.get_params` draws them: a box of area U(`scale`) and log-uniform aspect
    `ratio` is redrawn until it fits (up to `attempts` times), then the fallback is the centre crop of the
    allowed ratio nearest to the image's (the whole square when 1 is allowed).

    A box that does not fit is never shrunk to the side: clamping put one crop in seven at the full side
    (torchvision: one in 500) and made every view easier than the papers'. All images draw their
    `attempts` candidates at once and keep their first that fits."""
    area = torch.empty(n, attempts, device=device).uniform_(*scale)
    aspect = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp_()
    width, height = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (width <= 1) & (height <= 1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first candidate that fits (0 when none does)
    width, height = width.gather(1, first).squeeze(1), height.gather(1, first).squeeze(1)
    nearest = min(max(1.0, ratio[0]), ratio[1])  # the square's own ratio, or the nearest one allowed
    fallback_width, fallback_height = min(1.0, nearest), min(1.0, 1 / nearest)
    none_fits = ~fits.any(dim=1)
    return (torch.where(none_fits, torch.full_like(width, fallback_width), width),
            torch.where(none_fits, torch.full_like(height, fallback_height), height))


def affine_crop(x: torch.Tensor, width: torch.Tensor, height: torch.Tensor, centre_x: torch.Tensor,
                centre_y: torch.Tensor, output_size: int, flip: torch.Tensor | None = None,
                angle: torch.Tensor | None = None) -> torch.Tensor:
    """Per image, the box of `width` x `height` (fractions of the side) centred at (`centre_x`, `centre_y`)
    (in [-1, 1]), flipped by `flip` (-1 or 1) and rotated by `angle` (radians), resampled to
    `output_size` pixels.

    A box larger than the output is shrunk with antialiasing, as torchvision resizes: each output pixel
    is the mean of 2 x 2 bilinear samples spread over the source pixels it covers (up to the 2x
    reduction SOURCE_SCALE asks for). A box no larger than the output is plainly bilinear: its samples
    coincide. Plain bilinear sampling of a shrinking box would alias.
    """
    n, channels, side = x.shape[0], x.shape[1], x.shape[-1]
    flip = torch.ones_like(width) if flip is None else flip
    angle = torch.zeros_like(width) if angle is None else angle
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([width * cos * flip, -width * sin, centre_x], dim=1),
        torch.stack([height * sin * flip, height * cos, centre_y], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [n, channels, output_size, output_size], align_corners=False)
    if side <= output_size:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # one output pixel's step in source coordinates along the output's x and y, scaled by how much the
    # box shrinks on that axis beyond 1:1 (0 when it does not, 1 at a 2x reduction)
    shrink_x = (width * side / output_size).clamp(1, 2) - 1
    shrink_y = (height * side / output_size).clamp(1, 2) - 1
    step_x = theta[:, :, 0] * (2 / output_size) * shrink_x[:, None]
    step_y = theta[:, :, 1] * (2 / output_size) * shrink_y[:, None]
    total = torch.zeros(n, channels, output_size, output_size, device=x.device, dtype=x.dtype)
    for a in (-0.25, 0.25):
        for b in (-0.25, 0.25):
            offset = (a * step_x + b * step_y)[:, None, None, :]
            total += F.grid_sample(x, grid + offset, mode="bilinear", padding_mode="zeros", align_corners=False)
    return total / 4


def evaluation_view(images: torch.Tensor, output_size: int) -> torch.Tensor:
    """The deterministic test-time view of a uint8 batch: its centre (MoCo's Resize(256) + CenterCrop(224)),
    resized to `output_size` and normalised."""
    n = images.shape[0]
    side = torch.full((n,), CENTRE_CROP, device=images.device)
    centre = torch.zeros(n, device=images.device)
    x = affine_crop(images.float().div_(255.0), side, side, centre, centre, output_size)
    return normalize(x.clamp_(0.0, 1.0))


def luminance(x: torch.Tensor) -> torch.Tensor:
    """The grey level of an RGB batch as torchvision computes it, B x 1 x H x W."""
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def blend(x: torch.Tensor, towards: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`factor` x `x` + (1 - `factor`) x `towards`: torchvision's contrast and saturation adjustment."""
    return (x - towards) * factor + towards


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """An RGB batch in [0, 1] to hue (in turns), saturation and value, B x 3 x H x W."""
    r, g, b = x.unbind(1)
    value, low = x.amax(dim=1), x.amin(dim=1)
    spread = value - low
    grey = spread == 0
    saturation = spread / torch.where(grey, torch.ones_like(value), value)
    spread = torch.where(grey, torch.ones_like(spread), spread)
    # the hue sector: red, green or blue is the largest channel, the other two place it within the sector
    hue = torch.where(value == r, (g - b) / spread,
                      torch.where(value == g, 2.0 + (b - r) / spread, 4.0 + (r - g) / spread))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.stack([(hue / 6.0) % 1.0, saturation, value], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Hue (turns), saturation and value, B x 3 x H x W, back to RGB in [0, 1]."""
    hue, saturation, value = hsv.unbind(1)
    # each channel is the same piecewise-linear function of the hue, a third of a turn apart (R, G, B)
    channels = []
    for offset in (5.0, 3.0, 1.0):
        position = (offset + hue * 6.0) % 6.0
        channels.append(value - value * saturation * torch.minimum(position, 4.0 - position).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image of an RGB batch by `shift` turns (per image), in HSV as torchvision does."""
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))
