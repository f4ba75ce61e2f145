"""MoCo's queue, momentum update, shuffle and loss, SimCLR's NT-Xent and split-batch BN, against
values computed by hand."""
import math

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
    assert torch.equal(queue.keys, expected)
    assert queue.pointer.item() == 1 and queue.filled.item() == 5


def test_only_enqueued_keys_are_negatives():
    torch.manual_seed(0)
    model = MoCo("resnet18", queue_size=64, bn_splits=1).eval()
    images = torch.randn(4, 3, 32, 32)
    loss, logits = model(images, images)
    assert logits.shape == (4, 1) and loss.item() == 0.0  # an empty queue offers no negative yet
    _, logits = model(images, images)
    assert logits.shape == (4, 5) and model.queue.filled.item() == 8


def test_queue_keeps_only_the_newest_when_batch_exceeds_size():
    queue = MomentumQueue(dim=1, size=3)
    queue.enqueue(torch.arange(7.0).view(7, 1))
    assert sorted(queue.keys.flatten().tolist()) == [4.0, 5.0, 6.0]


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
    queue_before = model.queue.keys.clone()
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
    torch.testing.assert_close(model.queue.keys[:4], k, rtol=1e-4, atol=1e-5)  # keys enqueued after the loss
    torch.testing.assert_close(model.queue.keys[4:], queue_before[4:])


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
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x.var(dim=(0, 2, 3), unbiased=True))


def test_encoder_state_loads_into_plain_torchvision_model():
    model = MoCo("resnet18", queue_size=16)
    plain = torchvision.models.resnet18()
    missing, unexpected = plain.load_state_dict(model.feature_encoder().state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
