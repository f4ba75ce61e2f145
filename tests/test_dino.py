"""DINO: its loss against the formula by hand, the centre, the temperatures, the teacher, the frozen last layer,
multi-crop views and recipes; runs from the dataset scripts on a ResNet and a tiny ViT, exact resume, two gloo
processes against one of twice the batch, and no collapse on the sample data."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import run_entry
from test_distributed import free_port

from mirl.augment import BatchAugment, view_recipe
from mirl.datasets import RSNA, ImageDataset
from mirl.dino import DINO, clip_each_gradient, dino_loss, teacher_temperature
from mirl.method_spec import TrainingPlan
from mirl.methods import METHODS, DINOOptions
from mirl.pretrain import build_optimizer
from mirl.teacher import cosine_momentum

SPEC = METHODS["dino"]
SMALL = DINOOptions(out_dim=32, local_crops=2, local_size=32)
DINO_TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--workers", "0", "--device", "cpu",
             "--out-dim", "64", "--local-crops", "2", "--knn-images", "0"]


def small_dino(steps_per_epoch: int = 10, total_steps: int = 100) -> DINO:
    torch.manual_seed(0)
    return DINO("resnet18", SMALL, TrainingPlan(total_steps, steps_per_epoch))


def views(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2 + SMALL.local_crops))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_the_loss_is_the_mean_cross_entropy_over_teacher_and_other_student_view_pairs():
    rng = np.random.default_rng(0)
    student = [rng.normal(size=(3, 5)) for _ in range(4)]
    teacher = [rng.normal(size=(3, 5)) for _ in range(2)]
    center = rng.normal(size=(1, 5))
    terms = [np.mean(-(softmax((teacher[i] - center) / 0.04) * np.log(softmax(student[j] / 0.1))).sum(axis=1))
             for i in range(2) for j in range(4) if j != i]  # 2 x 3 pairs: a global view never meets itself
    got = dino_loss([torch.tensor(s) for s in student], [torch.tensor(t) for t in teacher], torch.tensor(center),
                    0.1, 0.04)
    assert len(terms) == 6 and got.item() == pytest.approx(np.mean(terms), rel=1e-9)


def test_the_teacher_temperature_warms_up_linearly_then_stays():
    options = DINOOptions(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=4)
    expected = np.linspace(0.04, 0.07, 4)
    assert [teacher_temperature(e, options) for e in range(6)] == pytest.approx([*expected, 0.07, 0.07])


def test_the_centre_moves_towards_the_batch_mean_of_the_teacher_outputs():
    model = small_dino().train()
    batch = views()
    with torch.no_grad():
        teacher = model.teacher_head(model.teacher_encoder(torch.cat(batch[:2])))
    model(*batch)
    torch.testing.assert_close(model.center, (1 - 0.9) * teacher.mean(dim=0, keepdim=True), rtol=1e-4, atol=1e-6)
    assert model.logged_scalars()["teacher_entropy"] > 0


def test_the_teacher_gets_no_gradient_and_trails_the_student_after_each_step():
    model = small_dino(total_steps=10).train()
    optimizer = build_optimizer(model, "sgd", 0.5, 0.0)
    loss, _ = model(*views())
    loss.backward()
    assert all(p.grad is None for p in model.teacher.teacher_parameters())
    assert all(p.grad is not None for p in model.student_encoder.parameters())
    teacher_before = [p.detach().clone() for p in model.teacher.teacher_parameters()]
    optimizer.step()
    model.after_optimizer_step()
    m = cosine_momentum(0, 10, 0.996)
    for before, student, after in zip(teacher_before, model.teacher.student_parameters(),
                                      model.teacher.teacher_parameters()):
        torch.testing.assert_close(after, m * before + (1 - m) * student)
    assert int(model.step) == 1


def test_the_last_layer_is_frozen_for_exactly_the_first_epoch():
    model = small_dino(steps_per_epoch=3).train()
    trained = []
    for _ in range(6):
        model.zero_grad(set_to_none=True)
        model(*views())[0].backward()
        model.after_backward()
        trained.append(model.student_head.last_layer.weight.grad is not None)
        model.after_optimizer_step()
    assert trained == [False, False, False, True, True, True]


def test_each_gradient_is_clipped_on_its_own():
    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.full((4,), 3.0), torch.tensor([0.3, 0.4])  # norms 6 and 0.5
    clip_each_gradient([big, small], 3.0)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    torch.testing.assert_close(small.grad, torch.tensor([0.3, 0.4]))


@pytest.mark.parametrize("transformer, global_scale, local_scale", [(False, (0.14, 1.0), (0.05, 0.14)),
                                                                    (True, (0.4, 1.0), (0.05, 0.4))])
def test_multi_crop_sizes_scales_and_per_view_recipes(transformer, global_scale, local_scale):
    chosen = SPEC.views(SPEC.options({}), 224, transformer)
    assert [v.size for v in chosen] == [224, 224] + [96] * 8
    assert [v.teacher for v in chosen] == [True, True] + [False] * 8
    assert {v.crop_scale for v in chosen[:2]} == {global_scale} and {v.crop_scale for v in chosen[2:]} == {local_scale}
    recipes = [view_recipe(v, "paper") for v in chosen]
    assert [(r.blur_p, r.solarize_p) for r in recipes[:3]] == [(1.0, 0.0), (0.1, 0.2), (0.5, 0.0)]
    assert all(r.crop_scale == v.crop_scale for r, v in zip(recipes, chosen))
    assert SPEC.views(SPEC.options({"local_crops": 3}), 64, transformer)[2].size == 32  # 96/224 of 64, at least 32


def test_the_recipes_are_the_repositorys():
    resnet, vit = SPEC.recipe_for(False), SPEC.recipe_for(True)
    assert (resnet.optimizer, resnet.lr_per_256, resnet.weight_decay, resnet.weight_decay_end) == ("sgd", 0.03, 1e-4,
                                                                                                   None)
    assert (vit.optimizer, vit.lr_per_256, vit.weight_decay, vit.weight_decay_end) == ("adamw", 0.0005, 0.04, 0.4)
    assert resnet.warmup_epochs == vit.warmup_epochs == 10
    defaults = SPEC.options({})
    assert (defaults.out_dim, defaults.teacher_momentum, defaults.center_momentum, defaults.student_temp,
            defaults.clip_grad, defaults.freeze_last_layer) == (65536, 0.996, 0.9, 0.1, 3.0, 1)


def dino_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(small_dino())
    mine = slice(rank * 4, (rank + 1) * 4)
    loss, _ = model(*(v[mine] for v in views(batch=8)))
    loss.backward()
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "center": model.module.center,
                    "grads": {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_like_one_of_twice_the_batch(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(dino_rank, args=(free_port(), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    model = small_dino().train()
    loss, _ = model(*views(batch=8))
    loss.backward()
    # the loss is a mean over images; BatchNorm and the centre see the global batch on both sides
    assert two["loss"].item() == pytest.approx(loss.item(), rel=1e-4)
    torch.testing.assert_close(two["center"], model.center, rtol=1e-4, atol=1e-6)
    for name, grad in two["grads"].items():
        # equal up to float32 rounding: the two sides sum the batch in another order
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_the_teacher_neither_collapses_to_one_dimension_nor_to_uniform_on_the_sample_data(rsna_root):
    """Centring pushes towards uniform (entropy log K), sharpening towards one dimension (entropy 0)."""
    images = ImageDataset(RSNA.find_labelled(rsna_root)[:16], 32, len(RSNA.classes))
    batch = torch.stack([images[i][0] for i in range(16)])
    model = DINO("resnet18", DINOOptions(out_dim=256, local_crops=2, local_size=32), TrainingPlan(60, 10)).train()
    optimizer = build_optimizer(model, "sgd", 0.03 * 16 / 256 * 10, 1e-4)
    augments = [BatchAugment(view_recipe(v, "grey"), v.size) for v in SPEC.views(model.options, 32, False)]
    torch.manual_seed(0)
    entropies = []
    for _ in range(60):
        loss, _ = model(*(augment(batch) for augment in augments))
        optimizer.zero_grad()
        loss.backward()
        model.after_backward()
        optimizer.step()
        model.after_optimizer_step()
        entropies.append(float(model.logged_scalars()["teacher_entropy"]))
    assert all(0.05 * math.log(256) < e < 0.95 * math.log(256) for e in entropies[-10:]), entropies[-10:]


@pytest.mark.slow
@pytest.mark.parametrize("arch, mode", [("resnet18", "--frozen"), ("timm:test_vit", None)])
def test_dino_pretrains_and_trains_a_classifier_from_the_dataset_scripts(arch, mode, rsna_root, tmp_path, capsys):
    common = ["--data-root", rsna_root, "--split-dir", tmp_path / "splits"]
    result = run_entry(capsys, "RSNA_MoCo", "trainDINO.py", *common, *DINO_TINY, "--arch", arch, "--epochs", "1",
                       "--output-dir", tmp_path / "dino")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "dino" / "config.json").read_text())
    assert config["optimizer"] == ("adamw" if arch.startswith("timm") else "sgd")
    assert [v["size"] for v in config["views"]] == [32] * 4 and config["identity"]["out_dim"] == 64
    state = torch.load(tmp_path / "dino" / "checkpoint.pth", weights_only=True)
    assert state["model"]["step"].item() == state["steps"] and "center" in state["model"]
    result = run_entry(capsys, "RSNA_MoCo", "DINO_downstream.py", *common, *DINO_TINY[2:10], *([mode] if mode else []),
                       "--epochs", "1", "--pretrained", tmp_path / "dino" / "checkpoint.pth",
                       "--output-dir", tmp_path / "down")
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0 <= json.loads((tmp_path / "down" / "metrics.json").read_text())["test"]["auc_macro"] <= 1


@pytest.mark.slow
def test_a_dino_run_resumed_from_a_mid_epoch_state_ends_exactly_where_the_unbroken_run_does(rsna_root, tmp_path,
                                                                                          capsys):
    """The state after batch 2 of epoch 2 holds the teacher, the centre, the step that drives the schedules and
    the unfrozen last layer's momentum."""
    args = ["--data-root", rsna_root, "--split-dir", tmp_path / "splits", *DINO_TINY, "--epochs", "2",
            "--save-every", "2", "--keep", "20", "--keep-states", "--deterministic"]
    assert run_entry(capsys, "RSNA_MoCo", "trainDINO.py", *args, "--output-dir", tmp_path / "a").returncode == 0
    middle = tmp_path / "a" / "checkpoints" / "state-e0001-b000002.pth"
    result = run_entry(capsys, "RSNA_MoCo", "trainDINO.py", *args, "--output-dir", tmp_path / "b", "--resume", middle)
    assert result.returncode == 0 and "(epoch 1, batch 2)" in result.stderr, result.stderr[-2000:]
    unbroken, resumed = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True)["model"] for run in "ab")
    assert all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)
