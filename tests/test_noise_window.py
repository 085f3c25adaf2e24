"""Sampling never jitters coordinates wider than training did (WeightManifold.noise_counts)."""
import pytest
import torch

import neumeta as nm
from neumeta.coords import tensor_coordinates
from neumeta.data import TensorLoader
from neumeta.train import narrowest_widths


def _scales(manifold, width):
    counts = manifold.space.resolve(width)
    return [tensor_coordinates(manifold.space, s.layer, counts, s.bias, manifold.coord_config,
                               manifold.noise_counts)[1] for s in manifold.specs]


def test_noise_is_capped_below_the_narrowest_trained_width_and_unchanged_above(small_manifold):
    uncapped = {w: _scales(small_manifold, w) for w in (1.0, 0.5, 0.25)}
    small_manifold.noise_counts = small_manifold.space.resolve(0.5)
    for width in (1.0, 0.5):  # trained widths: the noise is a whole cell of their own width, as before
        for a, b in zip(uncapped[width], _scales(small_manifold, width)):
            assert torch.equal(a, b)
    narrow, capped = uncapped[0.25], _scales(small_manifold, 0.25)
    at_half = uncapped[0.5]
    for whole, cap, trained in zip(narrow, capped, at_half):
        assert torch.equal(cap, trained)  # the window of the narrowest trained cell ...
        assert (cap <= whole).all()  # ... never wider than the unseen width's own cell,
    assert any((cap < whole).any() for whole, cap in zip(narrow, capped))  # and narrower where channels morph


def test_expected_parameters_change_only_at_unseen_narrower_widths(small_manifold):
    before = {w: small_manifold.expected_parameters(w, samples=4, seed=1) for w in (0.75, 0.25)}
    small_manifold.noise_counts = small_manifold.space.resolve(0.5)
    after = {w: small_manifold.expected_parameters(w, samples=4, seed=1) for w in (0.75, 0.25)}
    assert all(torch.equal(before[0.75][k], after[0.75][k]) for k in before[0.75])
    assert any(not torch.equal(before[0.25][k], after[0.25][k]) for k in before[0.25])


def test_fit_sets_the_narrowest_trained_counts_and_save_load_keeps_them(small_manifold, tmp_path):
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    config = nm.FitConfig(steps=2, prefit_steps=1, min_width=0.5, eval_every=100)
    result = nm.fit(small_manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=16), None, config,
                    progress=False)
    expected = narrowest_widths(small_manifold, config)
    assert small_manifold.noise_counts == expected and result.manifold.noise_counts == expected
    result.manifold.save(tmp_path / "m.neumeta")
    loaded = nm.load(tmp_path / "m.neumeta")
    assert loaded.noise_counts == expected
    a = result.manifold.expected_parameters(0.25, samples=3, seed=2)
    b = loaded.expected_parameters(0.25, samples=3, seed=2)
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_unknown_group_in_noise_counts_is_named(small_manifold):
    with pytest.raises(ValueError, match="nope"):
        small_manifold.noise_counts = {"nope": 3}
