"""The detail table (INRConfig(detail=True)): a free full-width table of what the INR misses,
resampled by cell overlap and faded out below the trained range. Full width is the model the
manifold was built from, before training and again after the pre-fit; below the range the
manifold is the INR alone, which fit trains on its own too."""
import pytest
import torch

import neumeta as nm
from neumeta.data import TensorLoader
from neumeta.experiment import build_manifold
from neumeta.train import FitConfig, task_loss_terms
from helpers import TwoLayer

DETAIL = nm.INRConfig(hidden=16, depth=3, frequencies=2, detail=True)


def _lenet_and_inputs():
    torch.manual_seed(0)
    return nm.create_model("lenet").eval(), torch.randn(16, 1, 28, 28)


def test_a_fresh_detail_manifold_is_the_model_at_full_width():
    """The issue's test: fold + smoothing + INR + table, before any training, sampled at width 1.0
    (the library's K = 50 noisy draws) give back the trained network."""
    model, x = _lenet_and_inputs()
    manifold = build_manifold(model, x[:2], DETAIL, log=lambda *a: None)
    assert (manifold.sample(1.0)(x) - model(x)).abs().max() <= 1e-4
    # and the INR alone is far from it: the table is what makes it exact
    alone = manifold.params_from_rows(manifold.row_values(manifold.space.full, detail=False), manifold.space.full)
    outputs = torch.func.functional_call(manifold.space.model, alone, (x,))
    assert (outputs - model(x)).abs().max() > 1e-2


def test_the_pre_fit_ends_with_the_model_at_full_width_again():
    """The pre-fit moves the INR; when it ends the table is re-anchored on the fitted INR (the
    model and the EMA both), so the joint phase starts from the reference network."""
    model, x = _lenet_and_inputs()
    manifold = build_manifold(model, x[:2], DETAIL, log=lambda *a: None)
    inr_before = manifold.inr.w_in.detach().clone()
    y = torch.randint(0, 10, (16,))
    config = FitConfig(prefit_steps=5, steps=0, eval_every=1000)
    result = nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None, config,
                    progress=False)
    assert not torch.equal(manifold.inr.w_in, inr_before)  # the pre-fit did train the INR
    for fitted in (manifold, result.manifold):
        assert (fitted.sample(1.0)(x) - model(x)).abs().max() <= 1e-4


def _with_trained_range(manifold, width):
    manifold.noise_counts = {g: max(1, round(c * width)) for g, c in manifold.space.full.items()}
    return manifold


def test_the_gate_is_one_in_the_range_and_fades_below_it():
    model, x = _lenet_and_inputs()
    manifold = nm.WeightManifold(nm.WidthSpace(nm.fold_batchnorm(model, x[:2]), x[:2]), DETAIL)
    spec = next(s for s in manifold.specs if s.name == "fc1.weight")
    assert manifold.detail_gate(spec, manifold.space.resolve(0.3)) == 1.0  # no trained range yet
    _with_trained_range(manifold, 0.5)
    fade = DETAIL.detail_fade
    at = {w: manifold.detail_gate(spec, manifold.space.resolve(w)) for w in (1.25, 1.0, 0.75, 0.5, 0.5 - fade, 0.25)}
    assert at[1.25] == at[1.0] == at[0.75] == at[0.5] == 1.0
    assert at[0.5 - fade] == 0.0 and at[0.25] == 0.0
    # between, it falls step by step with the channel counts (fc1 is 128 wide, fc2 64)
    counts = [{**manifold.space.resolve(0.5), "fc1": c} for c in range(64, 47, -1)]
    gates = [manifold.detail_gate(spec, c) for c in counts]
    assert gates == sorted(gates, reverse=True) and 0 < gates[len(gates) // 2] < 1
    assert max(a - b for a, b in zip(gates, gates[1:])) <= 1.0 / (fade * 128) + 1e-9


def test_below_the_range_the_manifold_is_the_inr_alone():
    model, x = _lenet_and_inputs()
    manifold = _with_trained_range(
        nm.WeightManifold(nm.WidthSpace(nm.fold_batchnorm(model, x[:2]), x[:2]), DETAIL), 0.5)
    counts = manifold.space.resolve(0.25)
    with_table = manifold.row_values(counts)
    alone = manifold.row_values(counts, detail=False)
    for a, b in zip(with_table, alone):
        assert torch.equal(a, b)
    counts = manifold.space.resolve(0.75)  # in the range the table is there
    assert any(not torch.equal(a, b) for a, b in zip(manifold.row_values(counts),
                                                      manifold.row_values(counts, detail=False)))


def test_fit_trains_each_width_with_the_table_and_the_inr_alone():
    """With an all-zero table the two networks of a width are the same, so the task loss of the
    trained widths is exactly twice that of the same manifold without a table; and both the
    table and the INR get gradients from it."""
    torch.manual_seed(0)
    model, x, y = TwoLayer(), torch.randn(32, 6), torch.randint(0, 4, (32,))
    space = nm.WidthSpace(model, x[:2])
    plain = nm.WeightManifold(space, nm.INRConfig(hidden=16, depth=3, frequencies=2, grid=False))
    detailed = nm.WeightManifold(space, DETAIL)
    detailed.load_state_dict({**plain.state_dict(), **{k: v for k, v in detailed.state_dict().items()
                                                        if k.startswith("detail.")}})
    with torch.no_grad():
        for table in detailed.detail:
            table.zero_()
    config = FitConfig(inplace_distill=False, original_distill=False)
    widths = [{"fc1": 7}, {"fc1": 6}]
    torch.manual_seed(1)
    loss_plain, _ = task_loss_terms(plain, nm.ClassificationTask(4), (x, y), widths, config)
    torch.manual_seed(1)
    loss_detail, _ = task_loss_terms(detailed, nm.ClassificationTask(4), (x, y), widths, config)
    torch.testing.assert_close(loss_detail, 2 * loss_plain)
    loss_detail.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in detailed.detail)
    assert detailed.inr.w_out.grad.abs().sum() > 0


def test_a_detail_manifold_saves_and_loads(tmp_path):
    model, x = _lenet_and_inputs()
    manifold = _with_trained_range(build_manifold(model, x[:2], DETAIL, log=lambda *a: None), 0.5)
    with torch.no_grad():
        for table in manifold.detail:
            table.add_(0.01 * torch.randn_like(table))
    manifold.save(tmp_path / "m.neumeta")
    loaded = nm.load(tmp_path / "m.neumeta")
    for width in (1.0, 0.6, 0.3):
        torch.testing.assert_close(loaded.sample(width, samples=3)(x), manifold.sample(width, samples=3)(x))


def test_detail_and_residual_are_not_combined():
    with pytest.raises(ValueError, match="detail and residual"):
        nm.INRConfig(detail=True, residual="area")
    with pytest.raises(ValueError, match="detail_fade"):
        nm.INRConfig(detail=True, detail_fade=0.0)
