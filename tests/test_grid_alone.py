"""The grid alone in the trained range (INRConfig(grid=True, grid_range=True, grid_alone=True)): plain
weights at the channel centres serve the range, the INR alone below it, and the two train apart."""
import dataclasses
import json

import pytest
import torch

import neumeta as nm
import neumeta.train as train
from neumeta.data import TensorLoader
from neumeta.experiment import build_manifold
from neumeta.io import MANIFOLD_FORMAT, load_manifold, save_manifold
from neumeta.train import FitConfig

SMALL = dict(hidden=16, depth=3, frequencies=2)
ALONE = nm.INRConfig(**SMALL, grid=True, grid_range=True, grid_alone=True)


def _manifold(inr_config=ALONE):
    torch.manual_seed(0)
    model, x = nm.create_model("lenet").eval(), torch.randn(16, 1, 28, 28)
    return build_manifold(model, x[:2], inr_config, log=lambda *a: None), model, x


def _fit(inr_config, config, tmp_path=None):
    manifold, model, x = _manifold(inr_config)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    result = nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None, config,
                    progress=False)
    return result.manifold, model, x


def test_grid_alone_needs_the_grid_in_range():
    with pytest.raises(ValueError, match="grid_alone .* needs grid=True, grid_range=True"):
        nm.INRConfig(grid=True, grid_alone=True)


def test_the_range_is_the_grid_alone_and_anchors_to_the_reference():
    manifold, model, x = _manifold()
    counts = manifold.space.resolve(0.75)
    for value in manifold.row_values(counts):
        assert torch.count_nonzero(value) == 0  # a zero grid: nothing of the INR is added
    manifold.anchor_grid()
    assert (manifold.sample(1.0, samples=5, full_width="inr")(x) - model(x)).abs().max() <= 1e-5
    alone = manifold.row_values(counts, grid=False)
    assert any(not torch.allclose(a, g) for a, g in zip(alone, manifold.row_values(counts)))


def test_the_inr_learns_as_without_the_grid_and_every_width_below_the_range_is_the_defaults(tmp_path):
    """The grid's terms reach the grid only, and its widths come from a generator of their own: the
    INR of a fit with the grid alone in range is the INR of the same fit without a grid, and so is
    every network below the range."""
    config = FitConfig(prefit_steps=2, steps=4, eval_every=1000, warmup=0.0, grid_widths=(0.75,))
    with pytest.warns(train.PoorReconstructionWarning):  # two pre-fit steps hold nothing yet
        with_grid, model, x = _fit(ALONE, config)
        without, _, _ = _fit(nm.INRConfig(**SMALL, grid=False), dataclasses.replace(config, grid_widths=()))
    for a, b in zip(with_grid.inr.parameters(), without.inr.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    below = with_grid.space.resolve(0.25)
    for a, b in zip(with_grid.mean_row_values(below, samples=4), without.mean_row_values(below, samples=4)):
        assert torch.allclose(a, b, atol=1e-6)
    # and the range learned on its own: the grid moved away from the reference it was anchored to
    reference = with_grid.original_rows()
    assert any(not torch.allclose(v, r, atol=1e-4)
               for v, r in zip(with_grid.row_values(with_grid.space.full), reference))
    path = tmp_path / "alone.neumeta"
    save_manifold(with_grid, path)
    loaded = load_manifold(path)
    assert loaded.inr_config.grid_alone
    for width in (1.0, 0.75, 0.25):
        assert torch.equal(loaded.sample(width, samples=5, full_width="inr")(x),
                           with_grid.sample(width, samples=5, full_width="inr")(x))


def test_the_grid_trains_the_narrowest_a_drawn_width_and_its_own_widths_each_step():
    manifold, _, _ = _manifold()
    config = FitConfig(grid_widths=(0.75,))
    widths = train.grid_widths_of_step(manifold, config, 7)
    assert widths[0] == train.narrowest_widths(manifold, config)
    assert widths[2] == dict(manifold.space.resolve(0.75))
    assert widths == train.grid_widths_of_step(manifold, config, 7)  # the same on a resumed fit
    assert any(train.grid_widths_of_step(manifold, config, s)[1] != widths[1] for s in range(8, 12))


def test_grid_loss_terms_reach_the_grid_only():
    manifold, _, x = _manifold()
    manifold.anchor_grid()
    y = torch.randint(0, 10, (16,))
    loss, l2 = train.grid_loss_terms(manifold, nm.ClassificationTask(10), (x, y),
                                     [manifold.space.resolve(0.5)], FitConfig(), original_outputs=None)
    (loss + l2).backward()
    assert all(table.grad is not None and table.grad.abs().sum() > 0 for table in manifold.grid)
    assert all(p.grad is None for p in manifold.inr.parameters())


def test_options_that_clash_with_the_grid_alone_are_refused():
    with pytest.raises(ValueError, match=r"grid_widths \[0.25\] lie outside the trained range"):
        FitConfig(grid_widths=(0.25,))
    manifold, _, x = _manifold(nm.INRConfig(**SMALL, grid=False))
    with pytest.raises(ValueError, match="grid_widths .* this manifold has none"):
        train.check_grid_alone(manifold, FitConfig(grid_widths=(0.75,)))
    manifold, _, _ = _manifold()
    with pytest.raises(ValueError, match="train_calibrated: not with the grid alone"):
        train.check_grid_alone(manifold, FitConfig(train_calibrated=True))


def test_without_its_original_teacher_the_grid_learns_from_the_labels_and_its_own_full_width():
    manifold, model, x = _manifold()
    manifold.anchor_grid()
    y = torch.randint(0, 10, (16,))
    task, counts = nm.ClassificationTask(10), [manifold.space.resolve(0.5)]
    with torch.no_grad():
        original = model(x)
    taught = train.grid_loss_terms(manifold, task, (x, y), counts, FitConfig(grid_original_distill=True), original)[0]
    alone = train.grid_loss_terms(manifold, task, (x, y), counts, FitConfig(), original)[0]  # off by default
    plain = train.grid_loss_terms(manifold, task, (x, y), counts, FitConfig(grid_original_distill=True), None)[0]
    assert torch.allclose(alone, plain) and not torch.allclose(taught, plain)


def test_calibration_leaves_the_grids_range_as_it_trained_and_corrects_below_it():
    manifold, _, x = _manifold()
    manifold.noise_counts = manifold.space.resolve(0.5)
    with torch.no_grad():
        for table in manifold.grid:
            table.normal_(std=0.1)
    batches = [(x,)]
    reference = manifold.calibration_reference(batches, samples=2)
    inside = manifold.sample(0.75, samples=2, calibration=reference)
    assert torch.equal(inside(x), manifold.sample(0.75, samples=2)(x))
    assert not hasattr(inside, "neumeta_calibration")
    below = manifold.sample(0.25, samples=2, calibration=reference)
    assert below.neumeta_calibration.layers  # the INR alone's narrow widths are corrected
    assert not torch.equal(below(x), manifold.sample(0.25, samples=2)(x))


@pytest.mark.filterwarnings("ignore::neumeta.train.NeverLearnedWarning")  # 16 random images
def test_the_inr_and_the_grid_are_each_kept_from_their_own_best_step():
    """With validation, the INR is chosen on the INR alone, as the default's fit chooses it, and the
    grid on the range it serves: the INR and every width below the range are the default's."""
    config = FitConfig(prefit_steps=2, steps=6, eval_every=1, warmup=0.0, guard=False)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    fits = {}
    for name, inr_config in (("alone", ALONE), ("without", nm.INRConfig(**SMALL, grid=False))):
        manifold, _, _ = _manifold(inr_config)
        with pytest.warns(train.PoorReconstructionWarning):
            fits[name] = nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8),
                                TensorLoader(x, y, batch_size=8), config, progress=False)
    alone, without = fits["alone"], fits["without"]
    assert alone.best_inr_step == without.best_step and without.best_inr_step is None
    assert alone.best_step != alone.best_inr_step  # this data makes them differ: the test can tell
    assert alone.inr_history == without.history
    for a, b in zip(alone.manifold.inr.parameters(), without.manifold.inr.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_kept_best_takes_the_grid_or_the_rest_from_now():
    manifold, _, _ = _manifold()
    before = {k: v.clone() for k, v in manifold.state_dict().items()}
    with torch.no_grad():
        for p in manifold.parameters():
            p.add_(1.0)
    grid_now = train.kept_best(before, manifold, grid=True)
    rest_now = train.kept_best(before, manifold, grid=False)
    for k, v in manifold.state_dict().items():
        is_grid = k.startswith("grid.")
        assert torch.equal(grid_now[k], v if is_grid else before[k])
        assert torch.equal(rest_now[k], before[k] if is_grid else v)


def test_the_default_is_the_grid_alone_in_range_and_the_other_recipes_have_no_grid():
    """Issue 20: the default recipe serves the trained range with the grid alone, anchored at the
    middle of the range; ``inr`` (the previous default) and ``paper`` are the INR at every width."""
    default = nm.INRConfig()
    assert (default.grid, default.grid_range, default.grid_alone) == (True, True, True)
    assert train.anchored_widths(FitConfig()) == (0.75,)
    assert train.anchored_widths(FitConfig(min_width=0.25)) == (0.625,)
    assert train.anchored_widths(FitConfig(grid_widths=())) == ()
    assert not FitConfig().grid_original_distill
    for name in ("inr", "paper"):
        config = nm.recipe_inr(name, hidden=8)
        assert (config.grid, config.grid_range, config.grid_alone, config.hidden) == (False, False, False, 8)
    # the plain weights held elsewhere, or the grid set by hand, leave the rest off
    for kwargs in ({"detail": True}, {"residual": "cells"}):
        assert not nm.INRConfig(**kwargs).grid
    assert (nm.INRConfig(grid=True).grid_range, nm.INRConfig(grid=True, grid_range=True).grid_alone) == (False, False)
    # the default manifold gives the base model back at full width before any joint step, and a
    # default fit trains every width of the range on the grid alone
    manifold, model, x = _manifold(nm.INRConfig(**SMALL))
    assert manifold.grid_alone
    manifold.anchor_grid()
    assert (manifold.sample(1.0, samples=2, full_width="inr")(x) - model(x)).abs().max() <= 1e-4


def test_a_file_written_before_the_grid_was_the_default_loads_without_one(tmp_path):
    manifold, _, x = _manifold(nm.INRConfig(**SMALL, grid=False))
    path = save_manifold(manifold, tmp_path / "old.neumeta")
    tensors, config = _read_raw(path)
    for key in ("grid", "grid_range", "grid_alone"):
        del config["inr"][key]  # as the files of 2026-12-07 and before were written
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={"format": MANIFOLD_FORMAT, "config": json.dumps(config)})
    loaded = load_manifold(path)
    assert not loaded.inr_config.grid and torch.equal(loaded.sample(0.75, samples=2)(x),
                                                       manifold.sample(0.75, samples=2)(x))


def _read_raw(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["config"])
