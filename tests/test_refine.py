"""The refine stage (FitConfig.refine_steps): a grid of plain weights learns the trained range on top
of the fitted INR, which is held, so every width below the range stays as the joint phase left it."""
import warnings

import pytest
import torch

import neumeta as nm
from neumeta.data import TensorLoader
from neumeta.experiment import build_manifold
from neumeta.io import load_manifold, save_manifold
from neumeta.refine import refine, refine_checkpoint
from neumeta.train import FitConfig, PoorReconstructionWarning, fit

TINY = nm.INRConfig(hidden=16, depth=3, frequencies=2, grid=False)


def _task_and_data(n=64):
    torch.manual_seed(0)
    model = nm.create_model("lenet").eval()
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    return model, x, TensorLoader(x, y, batch_size=16, shuffle=True, seed=0), TensorLoader(x, y, batch_size=32)


def _config(**kw):
    return FitConfig(**{"prefit_steps": 4, "steps": 4, "eval_every": 4, "seed": 0, **kw})


def test_add_range_grid_keeps_every_width_below_the_range_and_anchors_full_width():
    model, x, _, _ = _task_and_data()
    manifold = build_manifold(model, x[:2], TINY, log=lambda *a: None)
    manifold.noise_counts = manifold.space.resolve(0.5)
    below = manifold.space.resolve(0.25)
    before = manifold.mean_row_values(below, samples=3, seed=1)
    manifold.add_range_grid()
    assert manifold.grid_range
    for got, want in zip(manifold.mean_row_values(below, samples=3, seed=1), before):
        assert torch.equal(got, want)
    net = manifold.sample(1.0, samples=3, full_width="inr")
    assert (net(x) - model(x)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="has a grid already"):
        manifold.add_range_grid()


def test_refine_trains_the_grid_alone_and_the_unseen_widths_stay_as_fitted():
    model, x, train, val = _task_and_data()
    task = nm.ClassificationTask(10)
    torch.manual_seed(0)
    plain = fit(build_manifold(model, x[:2], TINY, log=lambda *a: None), task, train, val, _config(), progress=False)
    torch.manual_seed(0)
    refined = fit(build_manifold(model, x[:2], TINY, log=lambda *a: None), task, train, val,
                  _config(refine_steps=4), progress=False)
    a, b = plain.manifold, refined.manifold
    assert a.grid is None and b.grid_range
    # the same joint phase, then the INR held: its weights are the fitted ones
    for (name, p), q in zip(a.inr.named_parameters(), b.inr.parameters()):
        assert torch.equal(p, q), name
    # the grid learned beyond its anchor: the trained widths changed
    anchored = a.row_values(a.space.full, noise=False)
    assert any(not torch.allclose(g, w) for g, w in zip(b.row_values(b.space.full), anchored))
    below = a.space.resolve(0.25)
    for got, want in zip(b.mean_row_values(below, samples=3, seed=2), a.mean_row_values(below, samples=3, seed=2)):
        assert torch.equal(got, want)
    # one history, the refine stage's evaluations after the joint phase's
    steps = [row["step"] for row in refined.history]
    assert steps == sorted(steps) and steps[-1] == 4 + 4 + 4
    assert refined.refine_step_seconds is not None and refined.full_width is not None
    # the pre-fit's reconstruction is reported, not measured again (and warned about) on the held INR
    assert refined.reconstruction == plain.reconstruction
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refine(plain, task, train, val, _config(refine_steps=4), progress=False)
    assert not [w for w in caught if issubclass(w.category, PoorReconstructionWarning)]


def test_the_refine_step_gives_the_inr_no_gradient():
    model, x, train, val = _task_and_data()
    manifold = build_manifold(model, x[:2], TINY, log=lambda *a: None)
    manifold.add_range_grid()
    seen = {}
    original_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen["grads"] = [p.grad is not None for g in self.param_groups for p in g["params"]]
        seen["inr"] = [p.grad for p in manifold.inr.parameters()]
        return original_step(self, *args, **kwargs)
    torch.optim.Adam.step = spy
    try:
        fit(manifold, nm.ClassificationTask(10), train, val, _config(prefit_steps=0, inr_frozen=True), progress=False)
    finally:
        torch.optim.Adam.step = original_step
    assert seen["grads"] and all(seen["grads"])  # the optimiser holds the grid alone, and it learns
    assert all(g is None for g in seen["inr"])
    assert all(p.requires_grad for p in manifold.inr.parameters())  # given back as it was


def test_refine_resumes_and_the_joint_phase_is_not_fitted_again(tmp_path):
    model, x, train, val = _task_and_data()
    task, ckpt = nm.ClassificationTask(10), str(tmp_path / "fit.ckpt")
    torch.manual_seed(0)
    fit(build_manifold(model, x[:2], TINY, log=lambda *a: None), task, train, val, _config(), checkpoint=ckpt,
        progress=False)
    torch.manual_seed(0)
    once = fit(build_manifold(model, x[:2], TINY, log=lambda *a: None), task, train, val,
               _config(refine_steps=4), checkpoint=ckpt, resume="auto", progress=False)
    assert (tmp_path / "fit.refine.ckpt").exists()
    torch.manual_seed(0)
    again = fit(build_manifold(model, x[:2], TINY, log=lambda *a: None), task, train, val,
                _config(refine_steps=4), checkpoint=ckpt, resume="auto", progress=False)
    for p, q in zip(once.manifold.grid, again.manifold.grid):
        assert torch.equal(p, q)
    path = tmp_path / "refined.safetensors"
    save_manifold(once.manifold, path)
    loaded = load_manifold(path)
    assert loaded.grid_range
    for p, q in zip(loaded.grid, once.manifold.grid):
        assert torch.equal(p, q)


def test_bad_refine_options_are_refused():
    with pytest.raises(ValueError, match="prefit_steps must be 0"):
        FitConfig(inr_frozen=True)
    with pytest.raises(ValueError, match="refine_steps must be >= 0"):
        FitConfig(refine_steps=-1)
    model, x, train, val = _task_and_data()
    manifold = build_manifold(model, x[:2], TINY, log=lambda *a: None)
    with pytest.raises(ValueError, match="add_range_grid"):
        fit(manifold, nm.ClassificationTask(10), train, val, _config(prefit_steps=0, inr_frozen=True), progress=False)
    assert refine_checkpoint("runs/x/fit.ckpt").endswith("fit.refine.ckpt") and refine_checkpoint(None) is None
