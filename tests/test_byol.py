"""BYOL against the paper's formulas: the normalised MSE, the cosine EMA schedule, a target that only
follows, the asymmetric views with solarisation; and its scripts end to end."""
import json
import math

import pytest
import torch
import torchvision
from conftest import TINY, run_in_process

from mirl.augment import AugmentRecipe, BatchAugment, normalize, recipe_for
from mirl.byol import BYOL, byol_loss
from mirl.models import METHODS
from mirl.teacher import cosine_momentum


def test_byol_loss_is_the_normalised_squared_error():
    torch.manual_seed(0)
    p, z = torch.randn(5, 8), torch.randn(5, 8)
    by_hand = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(byol_loss(p, z), by_hand)
    assert byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)  # the scale of a prediction is free


def test_target_rate_rises_from_the_base_to_one_along_a_cosine():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


def test_a_training_forward_moves_the_target_towards_the_online_network_first():
    torch.manual_seed(0)
    model = BYOL("resnet18", total_steps=10, hidden_dim=64, dim=16).train()
    with torch.no_grad():
        for p in model.online_encoder.parameters():
            p.add_(0.5)
    online = [p.detach().clone() for p in model._online_params()]
    target = [p.detach().clone() for p in model._target_params()]
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = model(x1, x2)
    tau = cosine_momentum(0, 10, 0.996)
    for before, theta, after in zip(target, online, model._target_params()):
        torch.testing.assert_close(after, tau * before + (1 - tau) * theta)
    assert model.step.item() == 1
    loss.backward()
    assert all(p.grad is None for p in model._target_params())
    assert all(p.grad is not None for p in model.predictor.parameters())
    model.eval()
    model(x1, x2)
    assert model.step.item() == 1  # evaluation does not move the target


def test_the_loss_is_symmetric_in_the_two_views():
    torch.manual_seed(0)
    model = BYOL("resnet18", total_steps=10, hidden_dim=64, dim=16).eval()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x1, x2)[0], model(x2, x1)[0], rtol=1e-4, atol=1e-5)


def test_the_online_encoder_loads_into_plain_torchvision():
    model = BYOL("resnet18", total_steps=10, hidden_dim=64, dim=16)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(model.feature_encoder().state_dict(),
                                                                        strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_the_views_are_asymmetric_as_in_the_paper():
    spec = METHODS["byol"]
    first, second = (recipe_for(view.recipe, "paper") for view in spec.views(spec.options({}), 224, False))
    assert (first.blur_p, first.solarize_p) == (1.0, 0.0) and (second.blur_p, second.solarize_p) == (0.1, 0.2)
    assert first.crop_scale == second.crop_scale == (0.08, 1.0)
    assert recipe_for("byol_view2", "grey").solarize_p == 0.0  # inverting a CT window would change its meaning


def test_solarisation_inverts_the_bright_half():
    images = torch.arange(0, 256, 4, dtype=torch.uint8).view(1, 1, 8, 8).expand(2, 3, 8, 8).contiguous()
    recipe = AugmentRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, solarize_p=1.0)
    x = images.float() / 255
    torch.testing.assert_close(BatchAugment(recipe, 8)(images), normalize(torch.where(x >= 0.5, 1 - x, x)),
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_byol_pretraining_then_its_downstream_scripts(rsna_root, tmp_path):
    common = ["--data-root", rsna_root, "--split-dir", tmp_path / "splits", *TINY]
    result = run_in_process("RSNA_MoCo", "trainBYOL.py", *common, "--output-dir", tmp_path / "byol", "--epochs", "2",
                        "--knn-images", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(tmp_path / "byol" / "checkpoint.pth", weights_only=True)
    config = json.loads((tmp_path / "byol" / "config.json").read_text())
    assert state["method"] == "byol" and config["optimizer"] == "lars"
    assert state["model"]["step"].item() == state["steps"]  # the EMA schedule's position is saved with the state
    result = run_in_process("RSNA_MoCo", "BYOL_downstream.py", *common, "--frozen", "--output-dir", tmp_path / "probe",
                        "--pretrained", tmp_path / "byol" / "checkpoint.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0.0 <= json.loads((tmp_path / "probe" / "metrics.json").read_text())["test"]["auc_macro"] <= 1.0
