"""LARS and the learning-rate schedules against the formulas written out by hand."""
import math

import pytest
import torch
import torch.nn as nn

from mirl.optim import LARS, build_scheduler, lars_parameter_groups, schedule_factor


def test_lars_steps_match_the_formula_and_skip_biases():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    weight0, bias0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    lr, momentum, decay, trust_coefficient = 0.5, 0.9, 1e-2, 1e-3
    optimizer = LARS(lars_parameter_groups(layer), lr=lr, momentum=momentum, weight_decay=decay,
                     trust_coefficient=trust_coefficient)
    gradients = [(torch.randn(3, 4), torch.randn(3)) for _ in range(2)]
    weight, bias = weight0.clone(), bias0.clone()
    weight_buffer = bias_buffer = None
    for grad_w, grad_b in gradients:
        layer.weight.grad, layer.bias.grad = grad_w.clone(), grad_b.clone()
        optimizer.step()
        # by hand: the weight's update is scaled by trust * |w| / |g + wd w|; the bias gets plain momentum SGD
        update = grad_w + decay * weight
        update = update * (trust_coefficient * weight.norm() / update.norm())
        weight_buffer = update if weight_buffer is None else momentum * weight_buffer + update
        bias_buffer = grad_b if bias_buffer is None else momentum * bias_buffer + grad_b
        weight, bias = weight - lr * weight_buffer, bias - lr * bias_buffer
        torch.testing.assert_close(layer.weight.detach(), weight)
        torch.testing.assert_close(layer.bias.detach(), bias)


def test_lars_leaves_a_zero_weight_to_plain_momentum():
    parameter = nn.Parameter(torch.zeros(2, 2))
    optimizer = LARS([{"params": [parameter]}], lr=0.1, weight_decay=0.0)
    parameter.grad = torch.ones(2, 2)
    optimizer.step()
    torch.testing.assert_close(parameter.detach(), torch.full((2, 2), -0.1))  # trust 1 when |w| = 0


def test_warmup_ramps_linearly_then_cosine_ends_at_zero():
    assert [schedule_factor("cosine", s, 100, 10) for s in range(3)] == [0.1, 0.2, 0.3]
    assert schedule_factor("cosine", 9, 100, 10) == 1.0
    assert schedule_factor("cosine", 10, 100, 10) == 1.0
    assert schedule_factor("cosine", 55, 100, 10) == pytest.approx(0.5)
    assert schedule_factor("cosine", 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert schedule_factor("cosine", 32, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))


def test_step_schedule_drops_tenfold_at_60_and_80_percent():
    factors = [schedule_factor("step", s, 200) for s in (0, 119, 120, 159, 160, 199)]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_scheduler_applies_the_factor_to_every_group():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [parameter], "lr": 1.0}, {"params": [], "lr": 0.5}], lr=1.0)
    scheduler = build_scheduler(optimizer, "step", total_steps=10)
    rates = []
    for _ in range(10):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates[5] == pytest.approx([1.0, 0.5]) and rates[6] == pytest.approx([0.1, 0.05])
    assert rates[8] == pytest.approx([0.01, 0.005])


def test_weight_decay_follows_a_cosine_to_its_end_value_and_resumes_exactly():
    """DINO's ViT recipe: weight decay 0.04 to 0.4 on a cosine over training; biases and norms stay at 0."""
    weights, biases = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([{"params": [weights]}, {"params": [biases], "weight_decay": 0.0}], lr=1e-3,
                                  weight_decay=0.04)
    scheduler = build_scheduler(optimizer, "cosine", total_steps=10, warmup_steps=2, weight_decay_end=0.4)
    decays = []
    for _ in range(10):
        decays.append(optimizer.param_groups[0]["weight_decay"])
        assert optimizer.param_groups[1]["weight_decay"] == 0.0
        optimizer.step()
        scheduler.step()
    expected = [0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert decays == pytest.approx(expected)
    resumed_optimizer = torch.optim.AdamW([{"params": [weights]}, {"params": [biases], "weight_decay": 0.0}],
                                          lr=1e-3, weight_decay=0.04)
    resumed = build_scheduler(resumed_optimizer, "cosine", total_steps=10, warmup_steps=2, weight_decay_end=0.4)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    resumed.step()
    scheduler.step()
    assert resumed_optimizer.param_groups[0]["weight_decay"] == optimizer.param_groups[0]["weight_decay"]
