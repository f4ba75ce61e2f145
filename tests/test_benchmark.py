"""The benchmark runs and reports every figure (no timing is asserted), and its reference path
really is the reference: the per-parameter momentum loop gives what the fused update gives."""
import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from mirl.benchmark import main, pretraining_model
from mirl.models import MoCo
from mirl.teacher import momentum_teachers

FIGURES = ("model_only_per_s", "pipeline_per_s", "efficiency", "baseline_per_s", "speedup_vs_baseline",
           "decode_per_s", "cache_read_per_s", "peak_memory_mb", "gflop_per_item", "matmul_tflop_per_s", "mfu",
           "operator_calls_per_step")


@pytest.mark.slow
def test_benchmark_writes_every_figure(rsna_root, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--method", "mocov2", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8",
                 "--steps", "2", "--warmup", "1", "--workers", "0", "--device", "cpu", "--data-root",
                 str(rsna_root), "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for name in FIGURES:
        assert figures[name] > 0, name
    assert figures["efficiency"] == pytest.approx(figures["pipeline_per_s"] / figures["model_only_per_s"])
    assert figures["speedup_vs_baseline"] == pytest.approx(figures["pipeline_per_s"] / figures["baseline_per_s"])
    assert figures["settings"]["arch"] == "resnet18" and figures["unit"] == "image pairs/s"
    assert figures["mfu"] == pytest.approx(
        figures["pipeline_per_s"] * figures["gflop_per_item"] / (1e3 * figures["matmul_tflop_per_s"]))
    # a MoCo pair costs the query's forward and backward (3 forwards) and the key's forward: 4 encoder forwards
    with FlopCounterMode(display=False) as counter:
        torchvision.models.resnet18().eval()(torch.randn(1, 3, 32, 32))
    assert 3.9 < figures["gflop_per_item"] * 1e9 / counter.get_total_flops() < 4.3


def test_reference_momentum_loop_matches_the_fused_update():
    torch.manual_seed(0)
    fused = MoCo("resnet18", queue_size=16, momentum=0.9, bn_splits=1)
    loop = MoCo("resnet18", queue_size=16, momentum=0.9, bn_splits=1)
    loop.load_state_dict(fused.state_dict())
    loop.teacher.per_parameter = True
    with torch.no_grad():
        for model in (fused, loop):
            for p in model.encoder_q.parameters():
                p.add_(1.0)
    fused.momentum_update()
    loop.momentum_update()
    for a, b in zip(fused.encoder_k.parameters(), loop.encoder_k.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("method", ["mocov2", "byol", "dino"])
def test_the_reference_path_updates_every_teacher_one_parameter_at_a_time(method):
    reference = pretraining_model(method, "resnet18", reference=True)
    assert momentum_teachers(reference) and all(t.per_parameter for t in momentum_teachers(reference))
    assert not any(t.per_parameter for t in momentum_teachers(pretraining_model(method, "resnet18", reference=False)))


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "0"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
