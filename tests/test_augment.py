"""The batch augmentation against what each transform must do: an identity recipe is plain normalisation,
crops stay within their area and aspect bounds, every image draws its own parameters, grayscale gives equal
channels."""
import math

import pytest
import torch

import mirl.augment as augment
from mirl.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentRecipe, BatchAugment, normalize, recipe_for

IDENTITY = AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)


def images(n: int = 6, side: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=generator, dtype=torch.uint8)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def test_an_identity_recipe_is_plain_normalisation():
    batch = images()
    torch.testing.assert_close(BatchAugment(IDENTITY, 32)(batch), normalize(batch), rtol=0, atol=1e-5)


def test_a_horizontal_flip_with_probability_one_mirrors_every_image():
    batch = images()
    flipped = BatchAugment(AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0), 32)(batch)
    torch.testing.assert_close(flipped, normalize(batch).flip(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["moco", "mocov2", "simclr"])
def test_crop_areas_and_aspect_ratios_stay_within_the_recipe(method, monkeypatch):
    recipe = recipe_for(method, "paper")
    boxes = []
    real = augment.affine_crop

    def record(x, width, height, *args, **kwargs):
        boxes.append((width.clone(), height.clone()))
        return real(x, width, height, *args, **kwargs)
    monkeypatch.setattr(augment, "affine_crop", record)
    torch.manual_seed(0)
    BatchAugment(recipe, 16)(images(n=2000, side=16))
    width, height = boxes[0]
    assert width.max() <= 1 and height.max() <= 1  # a box that does not fit is redrawn, never clipped
    area, ratio = width * height, width / height
    low, high = recipe.crop_scale
    assert area.min() >= low - 1e-6 and area.max() <= high + 1e-6
    assert ratio.min() >= recipe.crop_ratio[0] - 1e-6 and ratio.max() <= recipe.crop_ratio[1] + 1e-6
    # the draws cover the range, not one corner of it
    assert area.min() < low + 0.05 * (high - low) and area.max() > high - 0.2 * (high - low)
    assert math.log(ratio.max() / ratio.min()) > 0.9 * math.log(recipe.crop_ratio[1] / recipe.crop_ratio[0])


def test_every_image_draws_its_own_parameters():
    one = images(n=1)
    batch = one.expand(8, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    views = BatchAugment(recipe_for("mocov2", "paper"), 32)(batch)
    distinct = {tuple(v.flatten()[:64].tolist()) for v in views}
    assert len(distinct) == 8


def test_grayscale_gives_equal_channels():
    recipe = AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, grayscale_p=1.0)
    out = unnormalize(BatchAugment(recipe, 32)(images()))
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 1], out[:, 2], rtol=0, atol=1e-5)


def test_the_grey_recipes_keep_crops_and_drop_colour():
    for method in ("moco", "mocov2", "simclr"):
        grey, paper = recipe_for(method, "grey"), recipe_for(method, "paper")
        assert grey.crop_scale == paper.crop_scale and grey.saturation == grey.hue == grey.grayscale_p == 0
        assert grey.rotation_degrees == 10.0


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_colour_jitter_is_torchvisions_per_image_in_the_drawn_order(order, monkeypatch):
    """The jitter equals torchvision's functional brightness, contrast, saturation and hue (HSV) adjustments
    applied to each image with its own factors, in the order drawn for the batch."""
    import torchvision.transforms.functional as TF
    recipe = AugmentRecipe(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    jitter = BatchAugment(recipe, 16)
    x = images(n=4, side=16, seed=3).float() / 255
    draws = iter([torch.tensor(v) for v in ([0.7, 1.3, 1.0, 0.9], [1.2, 0.8, 0.6, 1.4], [1.1, 0.9, 0.7, 1.3],
                                            [0.05, -0.1, 0.02, 0.0])])
    monkeypatch.setattr(BatchAugment, "_uniform", lambda self, n, low, high, device: next(draws))
    monkeypatch.setattr(torch, "randperm", lambda n: torch.tensor(order))
    ours = jitter._jitter(x)
    factors = ([0.7, 1.3, 1.0, 0.9], [1.2, 0.8, 0.6, 1.4], [1.1, 0.9, 0.7, 1.3], [0.05, -0.1, 0.02, 0.0])
    steps = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(4):
        expected = x[i]
        for step in order:
            expected = steps[step](expected, factors[step][i])
        torch.testing.assert_close(ours[i], expected, rtol=0, atol=1e-5)


def test_a_hue_shift_of_half_a_turn_turns_red_into_cyan():
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    torch.testing.assert_close(augment.adjust_hue(red, torch.tensor([0.5]))[0, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]))
