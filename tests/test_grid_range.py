"""A grid that serves the trained range only (INRConfig(grid=True, grid_range=True)): the INR and the
grid at the channel centres in the range, the INR alone with coordinate noise below it."""
import pytest
import torch

import neumeta as nm
import neumeta.train as train
from neumeta.data import TensorLoader
from neumeta.experiment import build_manifold
from neumeta.io import load_manifold, save_manifold
from neumeta.train import FitConfig

RANGE = nm.INRConfig(hidden=16, depth=3, frequencies=2, grid=True, grid_range=True)


def _manifold():
    torch.manual_seed(0)
    model, x = nm.create_model("lenet").eval(), torch.randn(16, 1, 28, 28)
    manifold = build_manifold(model, x[:2], RANGE, log=lambda *a: None)
    with torch.no_grad():
        for table in manifold.grid:
            table.normal_(std=0.1)
    return manifold, model, x


def test_grid_range_needs_the_grid():
    with pytest.raises(ValueError, match="grid_range .* needs grid=True"):
        nm.INRConfig(grid=False, grid_range=True)


def test_anchored_full_width_is_the_reference_network():
    manifold, model, x = _manifold()
    manifold.anchor_grid()
    net = manifold.sample(1.0, samples=5, full_width="inr")
    assert (net(x) - model(x)).abs().max() <= 1e-4


def test_the_grid_is_read_at_the_centres_whatever_the_noise():
    manifold, _, _ = _manifold()
    counts = manifold.space.resolve(0.75)
    noisy = manifold.row_values(counts, noise=True, generator=torch.Generator().manual_seed(1))
    noisy_alone = manifold.row_values(counts, noise=True, generator=torch.Generator().manual_seed(1), grid=False)
    centred = manifold.row_values(counts)
    centred_alone = manifold.row_values(counts, grid=False)
    for a, b, c, d in zip(noisy, noisy_alone, centred, centred_alone):
        assert torch.allclose(a - b, c - d, atol=1e-6)  # the grid's part does not move with the noise
    assert any(not torch.allclose(a, c) for a, c in zip(noisy_alone, centred_alone))  # the INR's does


def test_sampling_in_below_and_between():
    """In the trained range: the INR and the grid at the centres; below it (past the fade): the INR
    alone averaged over its noisy draws; in the fade: a blend of the two, continuous in the width."""
    manifold, _, _ = _manifold()
    manifold.noise_counts = manifold.space.resolve(0.5)
    inside = manifold.space.resolve(0.75)
    for got, want in zip(manifold.mean_row_values(inside, samples=4), manifold.row_values(inside)):
        assert torch.equal(got, want)
    below = manifold.space.resolve(0.25)
    alone = manifold.mean_row_values(below, samples=4, grid=False)
    for got, want in zip(manifold.mean_row_values(below, samples=4), alone):
        assert torch.equal(got, want)
    fade = manifold.space.resolve(0.4375)  # half-way down the default fade of 0.125 below 0.5
    gates = [manifold.detail_gate(s, fade) for s in manifold.specs]
    assert any(0 < g < 1 for g in gates)
    blended = manifold.mean_row_values(fade, samples=4)
    centred, alone = manifold.row_values(fade), manifold.mean_row_values(fade, samples=4, grid=False)
    for g, got, c, a in zip(gates, blended, centred, alone):
        assert torch.allclose(got, g * c + (1 - g) * a, atol=1e-6)


def test_the_pre_fit_leaves_the_grid_to_the_anchor():
    manifold, _, _ = _manifold()
    loss = train.reconstruction_loss(manifold, manifold.original_rows(), 1.0, noise=True)
    loss.backward()
    assert all(table.grad is None for table in manifold.grid)
    assert any(p.grad is not None for p in manifold.inr.parameters())


def test_each_narrower_width_trains_twice_and_the_inr_alone_at_full_width_too(monkeypatch):
    manifold, _, x = _manifold()
    calls = []
    real = train.functional_call
    monkeypatch.setattr(train, "functional_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = torch.randint(0, 10, (16,))
    full = manifold.space.full
    alone_full = manifold.params_from_rows(manifold.row_values(full, noise=True, grid=False), full)
    counts = [manifold.space.resolve(0.75), manifold.space.resolve(0.5)]
    loss, _ = train.task_loss_terms(manifold, nm.ClassificationTask(10), (x, y), counts, FitConfig(),
                                    alone_full_params=alone_full)
    assert len(calls) == 1 + 1 + 2 * 2  # the teacher, the INR alone at full width, two networks a width
    loss.backward()
    assert all(table.grad is not None and table.grad.abs().sum() > 0 for table in manifold.grid)


@pytest.mark.filterwarnings("ignore::neumeta.train.PoorReconstructionWarning")  # 2 pre-fit steps
def test_a_fit_starts_its_joint_phase_from_the_reference_and_survives_a_save(tmp_path, monkeypatch):
    manifold, model, x = _manifold()
    with torch.no_grad():
        for table in manifold.grid:
            table.zero_()
    y = torch.randint(0, 10, (16,))
    starts = []
    real = train.task_loss_terms

    def spy(manifold, task, batch, *args, **kwargs):
        if not starts:
            with torch.no_grad():
                params = manifold.params_from_rows(manifold.row_values(manifold.space.full), manifold.space.full)
                starts.append(float((torch.func.functional_call(manifold.space.model, params, (x,)) - model(x))
                                    .abs().max()))
        return real(manifold, task, batch, *args, **kwargs)
    monkeypatch.setattr(train, "task_loss_terms", spy)
    config = FitConfig(prefit_steps=2, steps=3, eval_every=1000, warmup=0.0)
    result = nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None, config,
                    progress=False)
    assert starts and starts[0] <= 1e-4  # the first joint step's teacher is the reference network
    path = tmp_path / "range.neumeta"
    save_manifold(result.manifold, path)
    loaded = load_manifold(path)
    assert loaded.inr_config.grid_range and loaded.noise_counts == result.manifold.noise_counts
    for width in (1.0, 0.75, 0.25):
        assert torch.equal(loaded.sample(width, samples=5, full_width="inr")(x),
                           result.manifold.sample(width, samples=5, full_width="inr")(x))


def test_widths_below_the_range_are_calibrated_to_the_inr_alone():
    """Calibration measures both full widths: the grid's for the trained range, the INR alone's for
    the widths below it (whose networks are the INR alone's), their statistics blended in the fade."""
    from neumeta.calibrate import calibrate
    manifold, _, x = _manifold()
    manifold.noise_counts = manifold.space.resolve(0.5)
    batches = [x[:8], x[8:]]
    reference = manifold.calibration_reference(batches, samples=3)
    assert reference.below is not None
    name = next(iter(reference.statistics))
    assert not torch.allclose(reference.statistics[name][0], reference.below.statistics[name][0])
    for width, chosen in ((0.25, reference.below), (0.75, reference)):
        counts = manifold.space.resolve(width)
        expected = manifold.sample(width, samples=3)
        calibrate(expected, chosen, manifold.space, counts, positions=manifold.coord_config.positions)
        got = manifold.sample(width, samples=3, calibration=reference)
        assert torch.allclose(got(x), expected(x), atol=1e-5), width
    half = reference.blended(0.5)
    mean = half.statistics[name][0]
    assert torch.allclose(mean, (reference.statistics[name][0] + reference.below.statistics[name][0]) / 2)


def test_grid_lr_puts_the_grid_in_its_own_group_at_its_own_peak_rate():
    manifold, _, _ = _manifold()
    config = FitConfig(prefit_steps=10, steps=100, joint_lr=2e-4, grid_lr=1e-3, warmup=0.1)
    groups, schedules = train.optimizer_groups(manifold, config)
    grid = {id(p) for p in manifold.grid.parameters()}
    assert {id(p) for p in groups[1]["params"]} == grid
    assert not grid & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(manifold.parameters()))
    peak = 10 + 9  # the last warm-up step
    assert config.lr * schedules[0](peak) == pytest.approx(2e-4)
    assert config.lr * schedules[1](peak) == pytest.approx(1e-3)
    assert schedules[0](5) == schedules[1](5) == 1.0  # the pre-fit: the INR's rate (the grid sits it out)
    one, _ = train.optimizer_groups(manifold, FitConfig())
    assert len(one) == 1
    with pytest.raises(ValueError, match="grid_lr .* no grid"):
        train.optimizer_groups(build_manifold(nm.create_model("lenet"), torch.randn(2, 1, 28, 28),
                                              nm.INRConfig(hidden=16, depth=3, frequencies=2, grid=False),
                                              log=lambda *a: None),
                               FitConfig(grid_lr=1e-3))


@pytest.mark.filterwarnings("ignore::neumeta.PoorReconstructionWarning")
def test_a_fit_with_grid_lr_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """Both parameter groups and their rates survive the checkpoint: a fit stopped after its third
    joint step and resumed ends where an uninterrupted one does."""
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    config = FitConfig(prefit_steps=1, steps=4, eval_every=2, joint_lr=2e-4, grid_lr=1e-3, seed=0)

    def run(checkpoint=None, resume=False):
        manifold, _, _ = _manifold()
        return nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None, config,
                      checkpoint=checkpoint, resume=resume, progress=False).manifold

    whole = run()
    real, calls = train.task_loss_terms, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "task_loss_terms", stopping)
    with pytest.raises(KeyboardInterrupt):
        run(str(tmp_path / "fit.ckpt"))
    later = []
    monkeypatch.setattr(train, "task_loss_terms", lambda *a, **k: later.append(1) or real(*a, **k))
    resumed = run(str(tmp_path / "fit.ckpt"), resume="auto")
    assert 0 < len(later) < 4  # it went on from the checkpoint, not from the start
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def _inr_and_grid_gradients(manifold, x, y, config, grid_std):
    """The INR's and the grid's gradients of one step's task terms, the grid drawn at ``grid_std``;
    the same seed each call, so the INR alone's coordinate noise is the same draw."""
    manifold.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.manual_seed(3)
        for table in manifold.grid:
            table.normal_(std=grid_std)
    counts = [manifold.space.resolve(0.75), manifold.space.resolve(0.5)]
    loss, l2 = train.task_loss_terms(manifold, nm.ClassificationTask(10), (x, y), counts, config)
    (loss + l2).backward()
    inr = [p.grad.clone() for p in manifold.inr.parameters() if p.grad is not None]
    grid = [t.grad.clone() for t in manifold.grid]
    return inr, grid


@pytest.mark.parametrize("only", [True, False])
def test_grid_only_in_range_keeps_the_in_range_networks_gradients_off_the_inr(only):
    """Labels alone (no teacher): the INR alone's terms do not read the grid, so with the option the
    INR's gradient cannot depend on it; without it the in-range networks' terms reach the INR too."""
    manifold, _, x = _manifold()
    y = torch.randint(0, 10, (16,))
    config = FitConfig(inplace_distill=False, original_distill=False, grid_only_in_range=only)
    inr_a, grid_a = _inr_and_grid_gradients(manifold, x, y, config, 0.1)
    inr_b, _ = _inr_and_grid_gradients(manifold, x, y, config, 0.3)
    assert inr_a and all(g.abs().sum() > 0 for g in grid_a)  # both learn
    same = all(torch.allclose(a, b, atol=1e-7) for a, b in zip(inr_a, inr_b))
    assert same == only


def test_grid_only_in_range_needs_a_grid_in_range():
    torch.manual_seed(0)
    model, x = nm.create_model("lenet").eval(), torch.randn(8, 1, 28, 28)
    manifold = build_manifold(model, x[:2], nm.INRConfig(hidden=16, depth=3, frequencies=2, grid=True),
                              log=lambda *a: None)
    y = torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match="grid_only_in_range .* grid_range=True"):
        nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None,
               FitConfig(prefit_steps=1, steps=1, grid_only_in_range=True), progress=False)
