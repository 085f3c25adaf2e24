"""Segmentation and VAE tasks: their numbers on cases worked out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

import neumeta as nm


def one_hot_logits(labels, k, scale=20.0):
    return F.one_hot(labels, k).permute(0, 3, 1, 2).float() * scale


def test_segmentation_metrics_by_hand():
    task = nm.SegmentationTask(3)
    y = torch.tensor([[[0, 0], [1, 255]]])          # one ignored pixel
    pred = torch.tensor([[[0, 1], [1, 2]]])          # right, wrong (0 -> 1), right, ignored
    result = task.evaluate(lambda x: one_hot_logits(pred, 3), [(torch.zeros(1), y)])
    # class 0: overlap 1, union 2; class 1: overlap 1, union 2; class 2: absent everywhere kept
    assert result["miou"] == pytest.approx(0.5)
    assert result["pixel_accuracy"] == pytest.approx(2 / 3)
    perfect = task.evaluate(lambda x: one_hot_logits(y.clamp(max=2), 3), [(torch.zeros(1), y)])
    assert perfect["miou"] == 1.0 and perfect["loss"] < 1e-6
    assert task.chance == pytest.approx(1 / 5) and task.metric == "miou"


def test_segmentation_loss_ignores_border_pixels_and_distill_is_zero_for_equal_outputs():
    task = nm.SegmentationTask(4)
    logits = torch.randn(2, 4, 3, 3)
    y = torch.randint(0, 4, (2, 3, 3))
    y_ignored = y.clone()
    y_ignored[:, 0] = 255
    keep = F.cross_entropy(logits, y, reduction="none")[:, 1:].mean()
    torch.testing.assert_close(task.loss(logits, (None, y_ignored)), keep)
    assert float(task.distill(logits, logits)) == pytest.approx(0, abs=1e-6)
    assert float(task.distill(logits, torch.randn(2, 4, 3, 3))) > 0


def test_vae_loss_is_the_negative_elbo():
    task = nm.VAETask()
    logits, mu, logvar = torch.randn(2, 1, 4, 4), torch.randn(2, 3), torch.randn(2, 3)
    target = torch.rand(2, 1, 4, 4)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 2
    kl = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp()) / 2
    torch.testing.assert_close(task.loss((logits, mu, logvar), (None, target)), bce + kl)
    result = task.evaluate(lambda x: (logits, mu, logvar), [(torch.zeros(2), target)])
    assert result["elbo"] == pytest.approx(-float(bce + kl), rel=1e-5)
    assert result["nll_bound"] == pytest.approx(-result["elbo"])
    mse = float(((torch.sigmoid(logits) - target) ** 2).sum() / 2)
    assert result["mse"] == pytest.approx(mse, rel=1e-5)
    assert task.chance is None and task.metric == "elbo"


def test_vae_task_refuses_mismatched_targets_and_non_tuple_outputs():
    task = nm.VAETask()
    with pytest.raises(ValueError, match="target"):
        task.loss((torch.zeros(2, 1, 4, 4), torch.zeros(2, 3), torch.zeros(2, 3)), (None, torch.zeros(2, 10)))
    with pytest.raises(TypeError, match="logits, mu, logvar"):
        task.loss(torch.zeros(2, 1, 4, 4), (None, torch.zeros(2, 1, 4, 4)))


def test_vae_task_runs_on_the_registry_vae():
    model = nm.create_model("vae").eval().requires_grad_(False)
    x = torch.rand(3, 1, 28, 28)
    loss = nm.VAETask().loss(model(x), (x, x))
    assert math.isfinite(float(loss)) and float(loss) > 0
    distill = nm.VAETask().distill(model(x), model(x))
    assert float(distill) == 0
