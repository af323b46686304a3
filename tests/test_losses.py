"""Loss and schedule against hand-worked values."""
import math

import pytest
import torch

from pipeline.training.losses import distill_loss, exp_decay_lr


def test_identical_features_have_zero_loss():
    x = torch.randn(2, 3, 3, 8)
    loss, cos, mse = distill_loss(x, x.clone())
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and cos.item() == pytest.approx(1.0)


def test_hand_worked_loss():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # cosines: 0 and 1 -> mean 0.5; squared errors: 1+1+0+1 = 3 over 4 -> 0.75
    loss, cos, mse = distill_loss(pred, target, mse_scale=2.0)
    assert cos.item() == pytest.approx(0.5) and mse.item() == pytest.approx(0.75)
    assert loss.item() == pytest.approx(0.5 + 2.0 * 0.75)


def test_loss_has_gradients():
    pred = torch.randn(4, 8, requires_grad=True)
    distill_loss(pred, torch.randn(4, 8))[0].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_exponential_decay_endpoints_and_midpoint():
    assert exp_decay_lr(0, 100, 1e-4, 5e-6) == pytest.approx(1e-4)
    assert exp_decay_lr(100, 100, 1e-4, 5e-6) == pytest.approx(5e-6)
    assert exp_decay_lr(50, 100, 1e-4, 5e-6) == pytest.approx(math.sqrt(1e-4 * 5e-6))


def test_per_epoch_decay_is_a_staircase_with_the_same_start_and_end():
    # 4 epochs of 25 steps: the rate of epoch e is lr * (final / lr) ** (e / 4) through all its steps
    rates = [exp_decay_lr(s, 100, 1e-4, 5e-6, every=25) for s in range(101)]
    for e in range(4):
        assert rates[25 * e:25 * (e + 1)] == pytest.approx([1e-4 * (5e-6 / 1e-4) ** (e / 4)] * 25)
    assert rates[100] == pytest.approx(5e-6)
