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


def test_per_epoch_decay_is_the_references_staircase_ending_at_the_final_rate():
    # 4 epochs of 25 steps: the reference trains epoch e at lr * (final / lr) ** ((e + 1) / 4),
    # so its last epoch trains at the final rate
    rates = [exp_decay_lr(s, 100, 1e-4, 5e-6, every=25) for s in range(101)]
    for e in range(4):
        assert rates[25 * e:25 * (e + 1)] == pytest.approx([1e-4 * (5e-6 / 1e-4) ** ((e + 1) / 4)] * 25)
    assert rates[99] == pytest.approx(5e-6) and rates[100] == pytest.approx(5e-6)


def test_a_compiled_step_gives_the_eager_loss_and_gradients():
    """distill.compile: forward and loss through torch.compile (inductor, here on the CPU)
    match the eager step within float32 rounding, and so do the gradients it trains with."""
    import timm

    from pipeline.models.vit import PatchFeatures
    from pipeline.training.losses import compiled_loss
    from tests.conftest import TINY

    torch.manual_seed(0)
    student = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0, reg_tokens=4, no_embed_class=True,
                                **TINY)
    model = PatchFeatures(student, None)
    images, targets = torch.randn(2, 3, 64, 64), torch.randn(2, 4, 4, 48)
    results = []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        loss, cos, mse = compiled_loss(enabled)(model, images, targets, 1.0)
        loss.backward()
        results.append((loss.detach(), cos, mse, student.blocks[-1].mlp.fc2.weight.grad.clone()))
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # it really compiled (no silent eager fallback)
    (eager, compiled) = results
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
