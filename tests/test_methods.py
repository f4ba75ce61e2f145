"""MoCo's queue, momentum update, shuffle and loss, SimCLR's NT-Xent and split-batch BN, against
values computed by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from mirl.distributed import shuffle_across_ranks, unshuffle_across_ranks
from mirl.models import MoCo, MomentumQueue, SimCLR, SplitBatchNorm2d, nt_xent


def test_queue_wraps_around_for_any_size_and_batch():
    queue = MomentumQueue(dim=2, size=5)
    first = torch.arange(6.0).view(3, 2)        # rows 0..2
    second = 10 + torch.arange(6.0).view(3, 2)  # rows 3, 4 then wraps to 0
    queue.enqueue(first)
    queue.enqueue(second)
    expected = torch.stack([second[2], first[1], first[2], second[0], second[1]])
    assert torch.equal(queue.negatives(), expected)
    state = queue.state_dict()
    assert torch.equal(state["keys"], expected) and state["pointer"].item() == 1 and state["filled"].item() == 5


def test_only_enqueued_keys_are_negatives_and_the_first_step_uses_the_batchs_other_keys():
    """Against an empty queue the loss would be 0 and the first step would train nothing: there, each
    query's negatives are the other keys of its batch, -log(exp(q_i.k_i/T) / sum_j exp(q_i.k_j/T))."""
    torch.manual_seed(0)
    model = MoCo("resnet18", queue_size=64, bn_splits=1, temperature=0.2).eval()
    images = torch.randn(4, 3, 32, 32)
    loss, logits = model(images, images)
    keys = model.queue.negatives()
    assert logits.shape == (4, 4) and keys.shape == (4, 128)
    queries = F.normalize(model.head_q(model.encoder_q(images)), dim=1).detach()
    by_hand = -sum(math.log(math.exp(queries[i] @ keys[i] / 0.2) /
                            sum(math.exp(queries[i] @ keys[j] / 0.2) for j in range(4))) for i in range(4)) / 4
    assert loss.item() > 0 and loss.item() == pytest.approx(by_hand, rel=1e-4)
    loss.backward()
    assert model.encoder_q.conv1.weight.grad.abs().sum() > 0
    _, logits = model(images, images)
    assert logits.shape == (4, 5) and model.queue.state_dict()["filled"].item() == 8


def test_queue_keeps_only_the_newest_when_batch_exceeds_size():
    queue = MomentumQueue(dim=1, size=3)
    queue.enqueue(torch.arange(7.0).view(7, 1))
    assert sorted(queue.negatives().flatten().tolist()) == [4.0, 5.0, 6.0]


def test_momentum_update_by_hand():
    model = MoCo("resnet18", queue_size=16, momentum=0.9, bn_splits=1)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    q_before = [p.clone() for p in model.encoder_q.parameters()]
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for q, k_old, k_new in zip(q_before, k_before, model.encoder_k.parameters()):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)


def test_key_encoder_starts_as_a_copy_and_gets_no_gradient():
    model = MoCo("resnet18", queue_size=16, bn_splits=1)
    for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(q, k) and not k.requires_grad


def test_shuffle_then_unshuffle_restores_order():
    batch = torch.arange(12.0).view(6, 2)
    shuffled, inverse = shuffle_across_ranks(batch)
    assert sorted(shuffled[:, 0].tolist()) == batch[:, 0].tolist()
    assert torch.equal(unshuffle_across_ranks(shuffled, inverse), batch)


def test_keys_through_shuffle_match_unshuffled_keys_in_eval_mode():
    torch.manual_seed(0)
    model = MoCo("resnet18", queue_size=16).eval()  # eval BN: no batch coupling, so order cannot matter
    images = torch.randn(6, 3, 32, 32)
    direct = F.normalize(model.head_k(model.encoder_k(images)), dim=1)
    torch.testing.assert_close(model.keys(images), direct, rtol=1e-4, atol=1e-5)


def test_infonce_logits_and_loss_by_hand():
    torch.manual_seed(0)
    model = MoCo("resnet18", queue_size=8, temperature=0.07, momentum=0.0, bn_splits=1).eval()
    model.queue.enqueue(F.normalize(torch.randn(8, 128), dim=1))
    queue_before = model.queue.negatives().clone()
    im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, logits = model(im_q, im_k)
    with torch.no_grad():
        q = F.normalize(model.head_q(model.encoder_q(im_q)), dim=1)
        k = F.normalize(model.head_k(model.encoder_k(im_k)), dim=1)
    by_hand = []
    for i in range(4):
        positive = math.exp(q[i] @ k[i] / 0.07)
        negatives = sum(math.exp(q[i] @ key / 0.07) for key in queue_before)
        by_hand.append(-math.log(positive / (positive + negatives)))
    assert logits.shape == (4, 9)
    assert abs(loss.item() - sum(by_hand) / 4) < 1e-3
    queue_after = model.queue.negatives()
    torch.testing.assert_close(queue_after[:4], k, rtol=1e-4, atol=1e-5)  # keys enqueued after the loss
    torch.testing.assert_close(queue_after[4:], queue_before[4:])


def test_nt_xent_against_the_direct_formula():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    views = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(10):
        twin = (i + 5) % 10
        similarities = [math.exp(views[i] @ views[j] / 0.5) for j in range(10) if j != i]
        total += -math.log(math.exp(views[i] @ views[twin] / 0.5) / sum(similarities))
    assert abs(nt_xent(z1, z2, 0.5).item() - total / 10) < 1e-5


def test_simclr_forward_is_the_nt_xent_of_its_projections():
    torch.manual_seed(0)
    model = SimCLR("resnet18", temperature=0.2).eval()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = model(x1, x2)
    expected = nt_xent(model.head(model.encoder(x1)), model.head(model.encoder(x2)), 0.2)
    assert abs(loss.item() - expected.item()) < 1e-5


def test_split_batchnorm_normalises_each_group_separately():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, splits=2).train()
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    out = bn(x)
    for chunk_in, chunk_out in zip(x.chunk(2), out.chunk(2)):
        mean = chunk_in.mean(dim=(0, 2, 3), keepdim=True)
        var = chunk_in.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(chunk_out, (chunk_in - mean) / torch.sqrt(var + bn.eps))
    # running statistics follow the groups' mean statistics, as fb/moco's split BN keeps them
    group_vars = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in x.chunk(2)])
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * group_vars.mean(0))


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_batchnorm_gradients_equal_one_batchnorm_per_group(channels_last):
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(5, splits=4).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(12, 5, 3, 3) * 2 + 0.5  # 12 images in 4 splits of 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    target = torch.randn(12, 5, 3, 3)
    (bn(x) * target).sum().backward()
    reference = x.detach().clone().requires_grad_()
    weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    out = torch.cat([F.batch_norm(chunk, None, None, weight, bias, True, 0.0, bn.eps) for chunk in reference.chunk(4)])
    (out * target).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, bias.grad, rtol=1e-4, atol=1e-5)


def test_split_batchnorm_groups_divide_the_batch_and_keep_enough_values():
    bn = SplitBatchNorm2d(4, splits=8)
    assert bn.groups_for(256, 49) == 8
    assert bn.groups_for(30, 49) == 6  # the largest number of equal groups up to 8
    assert bn.groups_for(16, 1) == 1  # 1 x 1 maps: 16 values per channel at most, one group
    assert bn.groups_for(7, 100) == 1  # a prime batch stays one group


def test_encoder_state_loads_into_plain_torchvision_model():
    model = MoCo("resnet18", queue_size=16)
    plain = torchvision.models.resnet18()
    missing, unexpected = plain.load_state_dict(model.feature_encoder().state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
