"""A residual INR: the reference weights resampled to the width, plus a correction that starts at
zero. Full width is the model it was built from; a cell of identical channels narrows exactly."""
import pytest
import torch
import torch.nn as nn

import neumeta as nm
from neumeta.experiment import build_manifold
from neumeta.resample import membership

RESIDUAL = nm.INRConfig(hidden=16, depth=3, frequencies=2, residual="cells")


@pytest.mark.parametrize("count, full", [(4, 8), (3, 8), (5, 5), (1, 7), (8, 4), (7, 3)])
def test_every_channel_has_a_cell(count, full):
    b = membership(count, full)
    if count <= full:  # every full channel in exactly one cell, and no cell empty
        assert torch.equal(b.sum(0), torch.ones(full)) and (b.sum(1) >= 1).all()
    else:  # every channel copies exactly one full channel, and every full channel is copied
        assert torch.equal(b.sum(1), torch.ones(count)) and (b.sum(0) >= 1).all()
    if count == full:
        assert torch.equal(b, torch.eye(full, dtype=b.dtype))


def test_a_fresh_residual_manifold_is_the_model_at_full_width():
    """Before any training, fold + smoothing + the INR give back the trained network."""
    model = nm.create_model("lenet").eval()
    x = torch.randn(16, 1, 28, 28)
    manifold = build_manifold(model, x[:2], RESIDUAL, log=lambda *a: None)
    sampled = manifold.sample(1.0, samples=5)
    assert (sampled(x) - model(x)).abs().max() <= 1e-4


def test_a_plain_inr_is_not_the_model_before_training():
    """What the residual form fixes: the plain INR starts far from the reference weights."""
    model = nm.create_model("lenet").eval()
    x = torch.randn(16, 1, 28, 28)
    manifold = build_manifold(model, x[:2], nm.INRConfig(hidden=16, depth=3, frequencies=2, full_width="inr"),
                              log=lambda *a: None)
    assert (manifold.sample(1.0, samples=1)(x) - model(x)).abs().max() > 1e-2


class Pairs(nn.Module):
    """8 hidden channels in identical pairs (0, 1), (2, 3), ...: half width loses nothing."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        with torch.no_grad():
            self.fc1.weight[1::2] = self.fc1.weight[0::2]
            self.fc1.bias[1::2] = self.fc1.bias[0::2]

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_cell_of_identical_channels_narrows_without_changing_the_function():
    model, x = Pairs(), torch.randn(32, 5)
    manifold = nm.WeightManifold(nm.WidthSpace(model, x[:2]), RESIDUAL)
    half = manifold.sample(0.5, samples=1)
    assert half.fc1.out_features == 4
    torch.testing.assert_close(half(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_wider_network_shares_each_channel_among_its_copies():
    model, x = Pairs(), torch.randn(32, 5)
    manifold = nm.WeightManifold(nm.WidthSpace(model, x[:2]), RESIDUAL)
    with pytest.warns(UserWarning, match="extrapolating"):
        wide = manifold.sample(1.5, samples=1)
    assert wide.fc1.out_features == 12
    torch.testing.assert_close(wide(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_correction_trains_and_saves(tmp_path):
    """The INR still learns (gradients reach it) and a residual manifold survives a save/load."""
    model, x = Pairs(), torch.randn(32, 5)
    manifold = nm.WeightManifold(nm.WidthSpace(model, x[:2]), RESIDUAL)
    loss = manifold.generate(0.5)["fc2.weight"].pow(2).sum()
    loss.backward()
    assert manifold.inr.w_out.grad.abs().sum() > 0
    with torch.no_grad():
        manifold.inr.b_out.add_(0.01)
    loaded = nm.load(manifold.save(tmp_path / "m.neumeta"), model=Pairs())
    assert loaded.inr_config.residual == "cells"
    torch.testing.assert_close(loaded.generate(0.5)["fc2.weight"], manifold.generate(0.5)["fc2.weight"])


@pytest.mark.parametrize("count, full", [(4, 8), (3, 8), (5, 5), (1, 7), (12, 8)])
def test_linear_interpolation_rows_sum_to_one_and_is_the_identity_at_full_width(count, full):
    from neumeta.resample import interpolation
    m = interpolation(count, full)
    torch.testing.assert_close(m.sum(1), torch.ones(count, dtype=m.dtype))
    assert (m >= 0).all()
    if count == full:
        assert torch.equal(m, torch.eye(full, dtype=m.dtype))


@pytest.mark.parametrize("resample", ["cells", "linear", "area"])
def test_both_resamplings_narrow_a_cell_of_identical_channels_exactly(resample):
    model, x = Pairs(), torch.randn(32, 5)
    inr = nm.INRConfig(hidden=16, depth=3, frequencies=2, residual=resample)
    half = nm.WeightManifold(nm.WidthSpace(model, x[:2]), inr).sample(0.5, samples=1)
    torch.testing.assert_close(half(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_unknown_resampling_is_refused():
    with pytest.raises(ValueError, match="residual"):
        nm.INRConfig(residual="cubic")


@pytest.mark.parametrize("count, full", [(4, 8), (3, 8), (5, 5), (1, 7), (12, 8), (5, 16)])
def test_area_weights_cover_every_full_channel(count, full):
    from neumeta.resample import overlap
    o = overlap(count, full)
    torch.testing.assert_close(o.sum(1), torch.full((count,), 1 / count, dtype=o.dtype))
    torch.testing.assert_close(o.sum(0), torch.full((full,), 1 / full, dtype=o.dtype))  # none skipped
    if count == full:
        torch.testing.assert_close(o * count, torch.eye(full, dtype=o.dtype))
