"""3-D views of whole batches of volumes on the training device, each volume with its own random draw.

The 2-D views' ideas in three dimensions (`mirl.augment`): a random resized crop cut from the source grid (a
share of the volume, and the box's aspect bounded on each axis against the others), flips per axis, intensity
jitter that fits the modality, and a Gaussian blur, then a resampling to the input size with antialiasing.
Volumes arrive as 1 x D x H x W int16 on one grid whose voxel size the run fixed (`mirl.volumes`), so a crop's
fractions of each axis are fractions of a physical extent: an anisotropic grid stays anisotropic, up to the
aspect jitter.

Intensities: a CT volume holds HU, shown through `CT_WINDOW` whose level and width the `ct` family jitters in HU
(level by up to a tenth of the width, width by up to 20 %); the `mr` family scales (20 %), shifts (0.1) and
gamma-corrects (0.3) grey levels; `grey` and `paper` jitter brightness and contrast (0.4). Solarisation, hue and
colour have no meaning on one grey channel and are off. Each method's view keeps its paper recipe's crop areas,
blur probability and jitter probability (`volume_recipe`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from mirl.augment import CROP_ATTEMPTS, RECIPES, REFERENCE_SIZE, blend
from mirl.errors import InputError
from mirl.imaging import SUBDURAL_WINDOW
from mirl.method_spec import View

# CT volumes are seen through one window (one input channel): the subdural window (level 80, width 200 HU) shows
# brain, fresh blood and thin bleeds against the skull, which the narrower brain window clips
CT_WINDOW = SUBDURAL_WINDOW
GREY_WINDOW = (127.5, 255.0)  # grey levels 0-255 to [0, 1]
VOLUME_MEAN, VOLUME_STD = 0.5, 0.25  # [0, 1] intensities to the network's input
VOLUME_STYLES = ("paper", "grey", "ct", "mr")  # `--augment` families that exist in 3-D


@dataclass(frozen=True)
class VolumeRecipe:
    """Ranges of the random 3-D transforms; a zero strength or probability switches a transform off."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # share of the volume
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # any two sides' ratio, as the 2-D crop's width to height
    flip_p: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per axis: D, H, W
    jitter_p: float = 0.0
    level: float = 0.0  # a window's level moved by up to this share of its width (CT), an offset (MR)
    width: float = 0.0  # a window's width x U(1 - w, 1 + w) (CT)
    brightness: float = 0.0  # intensity x U(1 - b, 1 + b)
    contrast: float = 0.0  # around the volume's mean
    gamma: float = 0.0  # intensity ** exp(U(-g, g))
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in voxels of a 224-voxel side, scaled to the output


def volume_recipe(view: View | str, style: str) -> VolumeRecipe:
    """The 3-D recipe of a method's view (or of `finetune`/`linear`): the paper recipe's crop areas (the view's
    own where the method sets them), jitter and blur probabilities, with the intensity jitter of `style`.
    Downstream recipes flip left-right only and jitter nothing, as the 2-D ones."""
    name = view if isinstance(view, str) else view.recipe
    paper = RECIPES[name]
    if style not in VOLUME_STYLES:
        raise InputError(f"--augment {style} has no 3-D form; with --dims 3 choose one of {', '.join(VOLUME_STYLES)}")
    if name in ("finetune", "linear"):
        return VolumeRecipe(crop_scale=paper.crop_scale, flip_p=(0.0, 0.0, paper.flip_p))
    scale = paper.crop_scale if isinstance(view, str) or view.crop_scale is None else view.crop_scale
    recipe = VolumeRecipe(crop_scale=scale, jitter_p=paper.jitter_p, blur_p=paper.blur_p,
                          blur_sigma=paper.blur_sigma)
    if style == "ct":
        return replace(recipe, level=0.1, width=0.2)
    if style == "mr":
        return replace(recipe, brightness=0.2, level=0.1, gamma=0.3)
    return replace(recipe, brightness=min(paper.brightness, 0.4), contrast=min(paper.contrast, 0.4))


def window_for(intensity: str) -> tuple[float, float]:
    """The (level, width) that maps a run's stored values to [0, 1]: CT_WINDOW in HU, or all grey levels."""
    return CT_WINDOW if intensity == "hu" else GREY_WINDOW


def random_resized_boxes_3d(n: int, scale: tuple[float, float], ratio: tuple[float, float], device: torch.device,
                            attempts: int = CROP_ATTEMPTS) -> torch.Tensor:
    """The sides (fractions of each axis, n x 3 as D, H, W) of `n` random resized 3-D crops: a share U(`scale`)
    of the volume, each side its cube root times a factor log-uniform in sqrt(`ratio`) (the three divided by
    their geometric mean, so the share is kept), so that any two sides' ratio lies in `ratio` when it is
    symmetric in log (3/4 to 4/3); redrawn until the box fits (up to `attempts` times, as torchvision's 2-D
    crop), else the whole volume."""
    share = torch.empty(n, attempts, 1, device=device).uniform_(*scale)
    log_factor = torch.empty(n, attempts, 3, device=device).uniform_(math.log(ratio[0]) / 2, math.log(ratio[1]) / 2)
    sides = share.pow(1 / 3) * (log_factor - log_factor.mean(dim=2, keepdim=True)).exp()
    fits = (sides <= 1).all(dim=2)
    first = fits.to(torch.uint8).argmax(dim=1)
    chosen = sides[torch.arange(n, device=device), first]
    return torch.where(fits.any(dim=1, keepdim=True), chosen, torch.ones_like(chosen))


def affine_crop_3d(x: torch.Tensor, sides: torch.Tensor, centres: torch.Tensor, output: tuple[int, int, int],
                   flips: torch.Tensor | None = None) -> torch.Tensor:
    """Per volume, the box of `sides` (fractions of D, H, W) centred at `centres` (in [-1, 1], D, H, W), flipped
    where `flips` is -1, resampled to `output`: what `F.grid_sample` (trilinear, zero padding, align_corners
    False) gives on that box's grid. An axis the box shrinks is antialiased as the 2-D crop does it: each output
    voxel averages samples spread over the source voxels it covers (up to the 2x reduction the source grid asks
    for).

    A box without rotation is separable: one resampling matrix per axis and volume (out x in, each row a
    linear interpolation, or the mean of two where the axis shrinks), applied as three batched matrix products.
    The same result as 2 x 2 x 2 grid samples, at a tenth of their cost on a CPU."""
    n = x.shape[0]
    flips = torch.ones_like(sides) if flips is None else flips
    source = x.shape[2:]
    out = x.reshape(n * x.shape[1], *source) if x.shape[1] == 1 else x.flatten(0, 1)
    channels = x.shape[1]
    # each product shrinks (or grows) what the next one reads: the axis with the smallest output first costs least
    for axis in sorted((2, 1, 0), key=lambda a: output[a]):
        matrix = resampling_matrix(source[axis], output[axis], sides[:, axis], centres[:, axis], flips[:, axis])
        matrix = matrix.repeat_interleave(channels, dim=0)
        moved = out.movedim(axis + 1, -1)
        out = torch.matmul(moved, matrix.transpose(1, 2).unsqueeze(1)).movedim(-1, axis + 1)
    return out.reshape(n, channels, *output)


def resampling_matrix(size: int, output: int, side: torch.Tensor, centre: torch.Tensor,
                      flip: torch.Tensor) -> torch.Tensor:
    """n x `output` x `size`: row i of volume k holds the weights of the source voxels its output voxel i
    samples along one axis, as grid_sample's linear interpolation with zero padding (align_corners False) at
    `centre` + `side` x `flip` x u_i, u_i the output voxel's centre in [-1, 1]; where the box shrinks the axis
    beyond 1:1, the mean of two samples a quarter of an output step either side, spread by the shrink."""
    n, device, dtype = side.shape[0], side.device, torch.float32
    u = (2 * torch.arange(output, device=device, dtype=dtype) + 1) / output - 1
    grid = centre[:, None] + (side * flip)[:, None] * u[None, :]
    shrink = (side * size / output).clamp(1, 2) - 1
    spread = 0.25 * (2 / output) * side * shrink
    matrix = torch.zeros(n, output, size + 2, device=device, dtype=dtype)  # one column of padding either side
    for offset in (-1.0, 1.0):
        position = ((grid + offset * spread[:, None] + 1) * size - 1) / 2  # source voxel coordinate
        low = position.floor()
        weight = position - low
        for index, value in ((low, 1 - weight), (low + 1, weight)):
            column = (index + 1).clamp(0, size + 1).long()  # outside the volume: the padding columns, dropped
            matrix.scatter_add_(2, column[..., None], (value / 2)[..., None])
    return matrix[:, :, 1:-1].to(dtype)


def to_unit_range(x: torch.Tensor, level: torch.Tensor | float, width: torch.Tensor | float) -> torch.Tensor:
    """Stored values through a window of `level` and `width` (per volume or one for all) to [0, 1]."""
    return ((x - (level - width / 2)) / width).clamp_(0.0, 1.0)


def normalize_volume(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] intensities to the network's input."""
    return (x - VOLUME_MEAN) / VOLUME_STD


class VolumeAugment(torch.nn.Module):
    """Applies one 3-D recipe to an int16 batch B x 1 x D x H x W of stored values, each volume with its own
    random draw, giving the normalised float input of size `output` (D, H, W)."""

    def __init__(self, recipe: VolumeRecipe, output: tuple[int, int, int], intensity: str) -> None:
        super().__init__()
        self.recipe, self.output, self.window = recipe, tuple(output), window_for(intensity)
        self.ct = intensity == "hu"  # CT's jitter moves its window; other volumes' moves their grey levels

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        r, n, device = self.recipe, volumes.shape[0], volumes.device
        x = volumes.float()
        sides = random_resized_boxes_3d(n, r.crop_scale, r.crop_ratio, device)
        centres = (torch.rand(n, 3, device=device) * 2 - 1) * (1 - sides)
        flips = torch.where(torch.rand(n, 3, device=device) < torch.tensor(r.flip_p, device=device), -1.0, 1.0)
        # the crop resamples stored values: windowing after it is the same window, applied to fewer voxels
        x = affine_crop_3d(x, sides, centres, self.output, flips)
        x = self._window(x)
        x = self._jitter(x)
        x = self._blur(x)
        return normalize_volume(x.clamp_(0.0, 1.0))

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return torch.empty(n, 1, 1, 1, 1, device=device).uniform_(low, high)

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        """The stored values through the run's window; for CT, each volume's level and width jittered in HU
        (with the jitter's probability)."""
        r, n = self.recipe, x.shape[0]
        level, width = self.window
        if not self.ct or r.width <= 0 and r.level <= 0:
            return to_unit_range(x, level, width)
        apply = torch.rand(n, 1, 1, 1, 1, device=x.device) < r.jitter_p
        widths = torch.where(apply, width * self._uniform(n, 1 - r.width, 1 + r.width, x.device), width)
        levels = torch.where(apply, level + width * self._uniform(n, -r.level, r.level, x.device), level)
        return to_unit_range(x, levels, widths)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        """MR and grey intensity jitter per volume: scale, contrast, offset and gamma in a random order, each
        step clamped to [0, 1] (CT's jitter is its window's)."""
        r, n, device = self.recipe, x.shape[0], x.device
        if r.jitter_p <= 0 or self.ct:
            return x
        apply = torch.rand(n, 1, 1, 1, 1, device=device) < r.jitter_p
        steps = []
        if r.brightness > 0:
            steps.append(lambda y, f=self._uniform(n, 1 - r.brightness, 1 + r.brightness, device): y * f)
        if r.contrast > 0:
            steps.append(lambda y, f=self._uniform(n, 1 - r.contrast, 1 + r.contrast, device):
                         blend(y, y.mean(dim=(1, 2, 3, 4), keepdim=True), f))
        if r.level > 0:
            steps.append(lambda y, shift=self._uniform(n, -r.level, r.level, device): y + shift)
        if r.gamma > 0:
            steps.append(lambda y, g=self._uniform(n, -r.gamma, r.gamma, device).exp(): y.clamp(min=0.0) ** g)
        out = x
        for step in torch.randperm(len(steps)).tolist():
            out = steps[step](out).clamp(0.0, 1.0)
        return torch.where(apply, out, x)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        """Separable 3-D Gaussian blur with a sigma drawn per volume (the papers' 224-pixel sigmas scaled to each
        axis' output size)."""
        r, n = self.recipe, x.shape[0]
        if r.blur_p <= 0:
            return x
        sigma = torch.empty(n, device=x.device).uniform_(*r.blur_sigma)
        blurred = x
        for axis, size in enumerate(self.output):
            scale = size / REFERENCE_SIZE
            radius = max(1, math.ceil(3 * r.blur_sigma[1] * scale))
            if radius >= size:  # reflect padding needs a radius below the side
                radius = size - 1
            offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
            kernel = torch.exp(-offsets[None, :] ** 2 / (2 * (sigma[:, None] * scale).clamp(min=1e-3) ** 2))
            kernel = kernel / kernel.sum(dim=1, keepdim=True)
            blurred = separable_blur(blurred, kernel, axis, radius)
        apply = (torch.rand(n, device=x.device) < r.blur_p).view(n, 1, 1, 1, 1)
        return torch.where(apply, blurred, x)


def separable_blur(x: torch.Tensor, kernel: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """`x` (n x 1 x D x H x W) convolved along spatial `axis` (0, 1, 2) with each volume's own 1-D `kernel`
    (n x 2 radius + 1), reflect-padded."""
    n, c = x.shape[:2]
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
    shape = [n * c, 1, 1, 1, 1]
    shape[2 + axis] = 2 * radius + 1
    flat = F.pad(x.reshape(1, n * c, *x.shape[2:]), pad, mode="reflect")
    return F.conv3d(flat, kernel.repeat_interleave(c, dim=0).view(shape), groups=n * c).view_as(x)


def volume_evaluation_view(volumes: torch.Tensor, output: tuple[int, int, int], intensity: str) -> torch.Tensor:
    """The deterministic test-time view of an int16 batch: the whole volume (its field of view is already the
    run's grid), resampled to `output`, windowed and normalised."""
    n = volumes.shape[0]
    whole = torch.ones(n, 3, device=volumes.device)
    x = affine_crop_3d(volumes.float(), whole, torch.zeros_like(whole), tuple(output))
    return normalize_volume(to_unit_range(x, *window_for(intensity)))
