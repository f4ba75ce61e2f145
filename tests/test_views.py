"""The views every method trains on, against the papers' code: crops redrawn as torchvision's RandomResizedCrop
draws them, BYOL's per-view BatchNorm, losses in fp32 under autocast, MoCo v1's grayscale before its jitter,
SimCLR's scale-only last BatchNorm, the split-BatchNorm groups reported, test patients kept out of
pretraining; and the modality recipes' transforms against their formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from mirl.augment import (
    RECIPES,
    AugmentRecipe,
    BatchAugment,
    luminance,
    normalize,
    random_resized_boxes,
    recipe_for,
)
from mirl.byol import BYOL, byol_loss
from mirl.config import PretrainConfig
from mirl.datasets import RSNA
from mirl.encoders import LearnedScale
from mirl.imaging import dicom_patient_group
from mirl.moco import batch_infonce, infonce, label_aware_infonce
from mirl.models import MoCo, SimCLR, nt_xent
from mirl.pretrain import pretraining_records
from mirl.splits import split_file_names

SQUARE = (3 / 4, 4 / 3)


def torchvision_boxes(scale: tuple[float, float], draws: int, side: int = 448) -> tuple[np.ndarray, np.ndarray]:
    """Width and height (fractions of the side) of torchvision's RandomResizedCrop on a square image."""
    torch.manual_seed(1)
    image = torch.zeros(1, side, side)
    boxes = np.array([RandomResizedCrop.get_params(image, list(scale), list(SQUARE))[2:] for _ in range(draws)])
    return boxes[:, 1] / side, boxes[:, 0] / side


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 1.0)])
def test_crops_are_redrawn_as_torchvisions_random_resized_crop(scale):
    """A box that does not fit is redrawn, not shrunk to the side. Shrinking put 14-17 % of the crops at the
    full side (torchvision: under 1 %) and raised the mean area by 0.055; the tolerances are a fifth of that."""
    torch.manual_seed(0)
    width, height = (t.numpy() for t in random_resized_boxes(100_000, scale, SQUARE, torch.device("cpu")))
    tv_width, tv_height = torchvision_boxes(scale, 20_000)
    area, tv_area = width * height, tv_width * tv_height
    assert abs(area.mean() - tv_area.mean()) < 0.01
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(tv_area, q)) < 0.015
    full, tv_full = np.mean((width > 0.999) | (height > 0.999)), np.mean((tv_width > 0.999) | (tv_height > 0.999))
    assert full < 0.01 and abs(full - tv_full) < 0.006
    log_ratio, tv_log_ratio = np.log(width / height), np.log(tv_width / tv_height)
    assert abs(log_ratio.std() - tv_log_ratio.std()) < 0.01 and abs(log_ratio.mean()) < 0.005
    # every box lies within the image and within the recipe's bounds: nothing is clipped
    assert width.max() <= 1 and height.max() <= 1
    assert area.min() >= scale[0] - 1e-6 and area.max() <= scale[1] + 1e-6


def test_when_no_box_fits_the_fallback_is_torchvisions_centre_crop():
    """Area 1 at ratios 2-3 never fits a square: torchvision then takes the whole width at the nearest
    ratio, 2 (a 448 x 224 box)."""
    width, height = random_resized_boxes(16, (1.0, 1.0), (2.0, 3.0), torch.device("cpu"))
    _, _, tv_height, tv_width = RandomResizedCrop.get_params(torch.zeros(1, 448, 448), [1.0, 1.0], [2.0, 3.0])
    torch.testing.assert_close(width, torch.full((16,), tv_width / 448))
    torch.testing.assert_close(height, torch.full((16,), tv_height / 448))


def test_byol_normalises_each_view_with_its_own_batch_statistics():
    """The BYOL paper's code and solo-learn pass the views separately: view 1's prediction does not depend
    on what view 2 holds (in one BatchNorm batch of both views it would)."""
    torch.manual_seed(0)
    model = BYOL("resnet18", total_steps=10, hidden_dim=64, dim=16).train()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    _, p1 = model(x1, x2)
    _, p1_again = model(x1, 5 * x2 + 3)
    torch.testing.assert_close(p1, p1_again)


def bf16_rounds(loss_fn, *args) -> None:
    """The loss under bf16 autocast equals the loss in fp32 (autocast would lower its matrix products)."""
    exact = loss_fn(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(*args)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(exact.item(), rel=1e-6)


def unit_rows(n: int, dim: int = 128, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_contrastive_and_byol_losses_are_computed_in_fp32_under_autocast():
    q, k, queue = unit_rows(32, seed=0), unit_rows(32, seed=1), unit_rows(256, seed=2)
    # the rounding is real: the same logits computed in bf16 move the loss by more than the tolerance
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / 0.07,
                                  torch.zeros(32, dtype=torch.long))
    assert rounded.item() != pytest.approx(infonce(q, k, queue, 0.07)[0].item(), rel=1e-5)
    bf16_rounds(lambda *a: infonce(*a)[0], q, k, queue, 0.07)
    bf16_rounds(lambda *a: batch_infonce(*a)[0], q, k, torch.arange(32), 0.07)
    labels = torch.eye(4)[torch.arange(32) % 4]
    bf16_rounds(lambda *a: label_aware_infonce(*a)[0], q, k, queue, labels, labels,
                torch.eye(4)[torch.arange(256) % 4], torch.arange(32), 0.07)
    bf16_rounds(nt_xent, q, k, 0.1)
    bf16_rounds(byol_loss, q, k)


def test_moco_v1_turns_images_grey_before_its_colour_jitter():
    """fb/moco's v1 augmentation applies RandomGrayscale before ColorJitter: a grey image stays grey and a
    hue shift then changes nothing, so a view turned grey is the image's luminance."""
    recipe = RECIPES["moco"]
    assert recipe.grayscale_first and not RECIPES["mocov2"].grayscale_first
    only_hue = AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=1.0, hue=recipe.hue,
                             grayscale_p=1.0, grayscale_first=True)
    batch = torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch.manual_seed(0)
    out = BatchAugment(only_hue, 16)(batch)
    grey = luminance(batch.float() / 255).expand(-1, 3, -1, -1)
    torch.testing.assert_close(out, normalize(grey), rtol=0, atol=1e-5)
    # jitter first (v2's order), the hue turns before the grey: not the luminance
    torch.manual_seed(0)
    after = BatchAugment(AugmentRecipe(**{**only_hue.__dict__, "grayscale_first": False}), 16)(batch)
    assert (after - normalize(grey)).abs().max() > 0.05


def test_simclrs_last_batchnorm_scales_but_does_not_shift():
    """google-research/simclr's output layer: BatchNorm with center=False, scale=True."""
    torch.manual_seed(0)
    model = SimCLR("resnet18").train()
    batchnorm, scale = model.head[-2], model.head[-1]
    assert isinstance(scale, LearnedScale) and not batchnorm.affine
    with torch.no_grad():
        scale.weight.copy_(torch.linspace(0.5, 2.0, scale.weight.numel()))
    x = torch.randn(8, model.head[0].in_features)
    hidden = model.head[:-2](x)
    by_hand = (hidden - hidden.mean(0)) / torch.sqrt(hidden.var(0, unbiased=False) + batchnorm.eps) * scale.weight
    torch.testing.assert_close(model.head(x), by_hand, rtol=1e-4, atol=1e-4)
    assert "head.5.weight" in model.state_dict() and "head.5.bias" not in model.state_dict()


def test_fewer_split_batchnorm_groups_than_asked_are_reported_once(capsys):
    torch.manual_seed(0)
    small = MoCo("resnet18", queue_size=64, bn_splits=8).train()
    small(torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32))  # layer4 is 1 x 1: one group of 16 values
    note = capsys.readouterr().err
    assert "fewer groups than --bn-splits 8" in note and "as few as 1" in note
    small(torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32))
    assert capsys.readouterr().err == ""  # once per run
    large = MoCo("resnet18", queue_size=64, bn_splits=8).train()
    large(torch.randn(16, 3, 128, 128), torch.randn(16, 3, 128, 128))  # layer4 4 x 4: 8 groups keep 32 values
    assert capsys.readouterr().err == "" and large.report_batchnorm_groups() is None


def test_a_test_patients_other_slices_never_reach_pretraining_through_image_level_splits(rsna_root, tmp_path):
    """RSNA records carry no patient (their reader leaves `group` empty; the patient is in each DICOM's
    header): split files that put one slice of a patient in test and the others in train must still keep
    every slice of that patient out of pretraining."""
    records = RSNA.find_labelled(rsna_root)
    ids = [r.image_id for r in records]
    split_dir = tmp_path / "image_level_splits"
    split_dir.mkdir()
    test = ids[::7]  # every seventh slice, whatever its patient
    for name in split_file_names():
        chosen = test if name == "test.txt" else ids[1::7] if name == "val.txt" else [i for i in ids if i not in test]
        (split_dir / name).write_text("".join(f"{i}\n" for i in chosen))
    config = PretrainConfig(method="mocov2", data_root=rsna_root, output_dir=tmp_path / "run", split_dir=split_dir,
                            batch_size=4)
    kept, _, _ = pretraining_records(RSNA, config)
    test_patients = {dicom_patient_group(r.path) for r in records if r.image_id in set(test)}
    assert kept and not {dicom_patient_group(r.path) for r in kept} & test_patients
    assert len({dicom_patient_group(r.path) for r in records}) > len(test_patients)  # some patients remain


def uniform_draws(monkeypatch, *values: list[float]) -> None:
    draws = iter([torch.tensor(v) for v in values])
    monkeypatch.setattr(BatchAugment, "_uniform", lambda self, n, low, high, device: next(draws))


def test_window_level_width_and_gamma_follow_their_formulas(monkeypatch):
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "randperm", lambda n: torch.arange(n))
    uniform_draws(monkeypatch, [0.1, -0.05, 0.0], [1.2, 0.8, 1.0], [0.2, -0.3, 0.0])
    out = BatchAugment(AugmentRecipe(jitter_p=1.0, level=0.1, width=0.2, gamma=0.3), 8)._jitter(x)
    level = (x + torch.tensor([0.1, -0.05, 0.0]).view(3, 1, 1, 1)).clamp(0, 1)
    width = ((level - 0.5) * torch.tensor([1.2, 0.8, 1.0]).view(3, 1, 1, 1) + 0.5).clamp(0, 1)
    gamma = (width ** torch.tensor([0.2, -0.3, 0.0]).exp().view(3, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(out, gamma)


def test_dermoscopy_views_take_every_quarter_turn_and_keep_their_colour():
    recipe = recipe_for("mocov2", "dermoscopy")
    assert recipe.quarter_turns and recipe.grayscale_p == 0 and recipe.solarize_p == 0 and recipe.hue <= 0.02
    assert recipe.crop_scale == RECIPES["mocov2"].crop_scale and recipe.blur_p == RECIPES["mocov2"].blur_p
    turns = AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, quarter_turns=True)
    image = torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch.manual_seed(0)
    out = BatchAugment(turns, 8)(image.expand(64, -1, -1, -1))
    rotations = [normalize(torch.rot90(image, k, dims=(2, 3))) for k in range(4)]
    seen = {next(k for k, r in enumerate(rotations) if torch.allclose(view[None], r, atol=1e-4)) for view in out}
    assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("style", ["grey", "ct", "mr"])
def test_grey_scale_recipes_drop_colour_and_keep_each_methods_crops_and_blur(style):
    for method in ("moco", "mocov2", "simclr", "byol_view1", "byol_view2"):
        recipe, paper = recipe_for(method, style), RECIPES[method]
        assert recipe.saturation == recipe.hue == recipe.grayscale_p == recipe.solarize_p == 0
        assert (recipe.crop_scale, recipe.blur_p) == (paper.crop_scale, paper.blur_p)
        assert math.isclose(recipe.rotation_degrees, 10.0)
    assert recipe_for("simclr", "ct").level > 0 and recipe_for("simclr", "ct").brightness == 0
    assert recipe_for("simclr", "mr").gamma > 0
