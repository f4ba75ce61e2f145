"""The methods as the papers run them: views cropped at source resolution, a queue that fits the data,
noise-free keys, SimCLR's BatchNorm over all 2N views, independent epoch orders across seeds, Kaggle's
log-loss clip, the linear probe's protocol with its rate chosen on validation, and the fine-tuning recipe."""
import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY, assert_one_line_error, run_entry, run_script, script_folder
from torchvision.transforms.v2 import functional as TF

from mirl.augment import affine_crop, evaluation_view, source_side
from mirl.datasets import square_uint8
from mirl.downstream import FINETUNE_ENCODER_LR_SCALE, PROBE_LRS
from mirl.errors import InputError
from mirl.loaders import EpochSampler
from mirl.methods import checked_queue_size, default_queue_size
from mirl.metrics import weighted_log_loss
from mirl.models import MoCo, SimCLR


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An H x W x 3 uint8 image with detail at two scales: smoothed noise plus fine stripes."""
    coarse = torch.nn.functional.interpolate(torch.rand(1, 3, height // 8, width // 8, generator=torch.Generator()
                                                        .manual_seed(seed)), size=(height, width), mode="bicubic")[0]
    y, x = np.mgrid[0:height, 0:width]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (x / 9.0 + y / 13.0))
    image = 0.6 * coarse.permute(1, 2, 0).numpy() + 0.4 * stripes[..., None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def test_a_small_crop_keeps_the_detail_of_the_original():
    """A 0.19-area crop for a 64-pixel input, cut as MIRL cuts it (from the image kept at source_side, 128
    pixels), against torchvision's antialiased resized crop of the same box of the 256-pixel original.

    Stated tolerances, in mean absolute grey levels of 255 on an image whose detail has sd 48: MIRL's
    sampler equals torchvision's resized crop of the same stored image within 1; the stored image's own
    resolution costs under 10 against the original; cutting the box from the image already shrunk to
    64 pixels, as MIRL did before, costs more than twice that (the fine stripes are gone)."""
    original = textured(256, 256)
    size, box = 64, 112  # a 112-pixel box of the original: 0.19 of its area
    top = left = 64
    reference = TF.resized_crop(torch.from_numpy(original).permute(2, 0, 1).float(), top, left, box, box,
                                [size, size], antialias=True)
    fraction = torch.tensor([box / 256])
    centre = torch.tensor([(left + box / 2) / 256 * 2 - 1])

    def crop_of(stored: torch.Tensor) -> torch.Tensor:
        return affine_crop(stored[None].float(), fraction, fraction, centre, centre, size)[0]

    stored = square_uint8(original, source_side(size))
    same_box_by_torchvision = TF.resized_crop(stored.float(), top // 2, left // 2, box // 2, box // 2, [size, size],
                                              antialias=True)
    now, before = crop_of(stored), crop_of(square_uint8(original, size))
    assert (now - same_box_by_torchvision).abs().mean() < 1.0
    error_now, error_before = (reference - now).abs().mean().item(), (reference - before).abs().mean().item()
    assert error_now < 10.0, error_now
    assert error_before > 2 * error_now, (error_before, error_now)


def test_a_photograph_keeps_its_aspect_ratio():
    """A 4:3 photograph: the shorter side is resized and the longer one centre-cropped, as torchvision's
    Resize + CenterCrop do, never squashed."""
    photo = textured(300, 400, seed=1)
    stored = square_uint8(photo, 128)
    expected = TF.center_crop(TF.resize(torch.from_numpy(photo).permute(2, 0, 1), [128], antialias=True), [128])
    assert stored.shape == (3, 128, 128)
    assert (stored.int() - expected.int()).abs().float().mean() < 1.0


def test_evaluation_sees_the_centre_as_moco_resize_and_centre_crop():
    original = torch.from_numpy(textured(128, 128, seed=2)).permute(2, 0, 1)
    view = evaluation_view(original[None], 64)[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = (view * std + mean) * 255
    # the central 224/256 of the side: 112 of 128 pixels, offset 8
    expected = TF.resized_crop(original.float(), 8, 8, 112, 112, [64, 64], antialias=True)
    assert (pixels - expected).abs().mean() < 4.0


@pytest.mark.parametrize("images, queue", [(20_000, 4096), (19_000, 4096), (300_000, 65536), (4786, 1024),
                                           (100, 16), (3, 1)])
def test_the_default_queue_is_the_largest_power_of_two_within_a_quarter_of_the_data(images, queue):
    assert default_queue_size(images) == queue
    assert queue <= max(1, images / 4) and queue * 2 > min(images / 4, 65536)


def test_a_queue_as_large_as_the_data_is_refused():
    with pytest.raises(InputError, match="not smaller than the 500"):
        checked_queue_size(500, 500)
    assert checked_queue_size(499, 500) == 499
    assert checked_queue_size(None, 500) == 64


@pytest.mark.slow
def test_pretraining_records_its_queue_and_refuses_one_that_holds_the_data(isic_root, tmp_path, capsys):
    result = run_script("ISIC", "trainMoCoV2.py", "--data-root", isic_root, "--output-dir", tmp_path / "run",
                        "--split-dir", tmp_path / "splits", "--knn-images", "0", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["queue_size"] == default_queue_size(config["images"])
    refused = run_entry(capsys, "ISIC", "trainMoCoV2.py", "--data-root", isic_root, "--output-dir", tmp_path / "big",
                        "--split-dir", tmp_path / "splits", "--queue-size", "100000", *TINY)
    assert_one_line_error(refused, "--queue-size 100000", "not smaller than")
    assert not (tmp_path / "big" / "checkpoints").exists()


def test_keys_depend_on_the_weights_and_the_view_alone():
    """EfficientNet's stochastic depth would make two key passes of one view differ; in MoCo's key encoder
    only BatchNorm keeps its train mode."""
    model = MoCo("efficientnet_b0", head="mlp", queue_size=16, bn_splits=1)
    model.train()
    views = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    first = model.keys(views)
    torch.manual_seed(2)
    second = model.keys(views)
    assert (first - second).abs().max() < 1e-4
    assert model.encoder_q.training and model.encoder_k.training
    assert any(m.training for m in model.encoder_q.modules() if isinstance(m, torchvision.ops.StochasticDepth))


def test_simclr_batchnorm_sees_all_two_n_views_at_once():
    model = SimCLR("resnet18").train()
    seen = []
    model.encoder.bn1.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    first, second = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model(first, second)
    assert seen == [8]
    # the running mean moved towards the mean over both views together
    conv = model.encoder.conv1(torch.cat([first, second])).mean(dim=(0, 2, 3))
    assert torch.allclose(model.encoder.bn1.running_mean, 0.1 * conv, atol=1e-5)


def test_epoch_orders_of_different_seeds_are_independent():
    orders = {(seed, epoch): EpochSampler(1000, seed, drop_last=False).order(epoch)
              for seed in range(3) for epoch in range(3)}
    assert len({tuple(order) for order in orders.values()}) == len(orders)
    assert EpochSampler(1000, 1, drop_last=False).order(0) != EpochSampler(1000, 0, drop_last=False).order(1)
    assert EpochSampler(1000, 1, drop_last=False).order(2) == orders[1, 2]  # and reproducible


def test_the_weighted_log_loss_clips_as_kaggle_does():
    """A confident wrong answer costs -log(1e-15) per class weight, not -log(1e-7); float32 input included."""
    truth = np.array([[1.0, 0.0]])
    probability = np.array([[0.0, 1.0]], dtype=np.float32)
    weights = np.array([2.0, 1.0])
    assert weighted_log_loss(truth, probability, weights) == pytest.approx(-math.log(1e-15), rel=1e-4)


@pytest.fixture(scope="module")
def isic_pretrained(isic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    result = run_script("ISIC", "trainMoCoV2.py", "--data-root", isic_root, "--output-dir", out / "mocov2",
                        "--split-dir", out / "splits", "--knn-images", "0", "--queue-size", "8", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_the_linear_probe_chooses_its_rate_on_validation(isic_root, isic_pretrained):
    out = isic_pretrained
    result = run_script("ISIC", "MoCov2_downstream.py", "--data-root", isic_root, "--split-dir", out / "splits",
                        "--pretrained", out / "mocov2" / "checkpoint.pth", "--output-dir", out / "probe", "--frozen",
                        *TINY[:-4], "--epochs", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "probe" / "config.json").read_text())
    metrics = json.loads((out / "probe" / "metrics.json").read_text())
    assert config["learning_rates"] == list(PROBE_LRS) and config["optimizer"] == "SGD"
    assert metrics["lr"] in PROBE_LRS
    # the saved model is a plain torchvision classifier holding the chosen head
    checkpoint = torch.load(out / "probe" / "checkpoint.pth", weights_only=True)
    torchvision.models.resnet18(num_classes=9).load_state_dict(checkpoint["model"])


@pytest.mark.slow
def test_fine_tuning_warms_up_with_the_encoder_rate_chosen_on_validation(isic_root, isic_pretrained):
    out = isic_pretrained
    # the baseline is only checked for its one rate: a single epoch does
    runs = {"finetune": ["--pretrained", out / "mocov2" / "checkpoint.pth"],
            "resnet": ["--resnet", "--arch", "resnet18", "--epochs", "1"]}
    for name, extra in runs.items():
        # config.json records the schedule before the first step: the run is stopped (Ctrl-C) once it is written
        process = subprocess.Popen(
            [sys.executable, "MoCov2_downstream.py", "--data-root", str(isic_root), "--split-dir", str(out / "splits"),
             "--output-dir", str(out / name), "--fraction", "1", *map(str, extra),
             *[a for a in TINY if a not in ("--arch", "resnet18", "--epochs", "1")]],
            cwd=script_folder("ISIC"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not (out / name / "config.json").is_file():
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)
        assert process.returncode in (0, 130)
    finetune = json.loads((out / "finetune" / "config.json").read_text())
    resnet = json.loads((out / "resnet" / "config.json").read_text())
    head, encoder = finetune["learning_rates"]
    assert encoder == pytest.approx(FINETUNE_ENCODER_LR_SCALE * head)
    assert resnet["learning_rates"][0] == resnet["learning_rates"][1]
    assert finetune["warmup_steps"] == round(0.1 * finetune["steps"]) > 0
    # a 1 % split is one batch: without --epochs each of the 30 epochs passes over it several times, so the
    # run takes at least 200 optimizer steps
    assert finetune["epochs"] == 30 and finetune["passes_per_epoch"] > 1 and finetune["steps"] >= 200


def test_an_epoch_of_several_passes_sees_every_image_once_per_pass_in_a_new_order():
    sampler = EpochSampler(10, seed=3, drop_last=False, passes=3)
    order = sampler.order(0)
    passes = [order[i * 10:(i + 1) * 10] for i in range(3)]
    assert all(sorted(p) == list(range(10)) for p in passes) and len({tuple(p) for p in passes}) == 3
    assert EpochSampler(10, seed=3, drop_last=False).order(0) == passes[0]  # one pass: the order as before
