"""FitConfig(train_calibrated=True): narrower widths train as calibrated sampling gives them."""
import warnings

import pytest
import torch
from torch.func import functional_call

import neumeta as nm
import neumeta.train as train
from neumeta.calibrate import TRAIN_EPS, Reference, calibrate, calibratable, channel_statistics, normalized_output, \
    normalized_to, recorded_statistics
from neumeta.data import TensorLoader
from neumeta.manifold import UncalibratedWarning


@pytest.mark.parametrize("shape", [(8, 5, 6, 7), (8, 5), (1, 5), (1, 5, 1, 1)])
def test_normalized_output_is_batchnorm_with_the_targets_as_affine(shape):
    """The fused kernel gives what the formula says, values and gradients, on conv and linear
    outputs, and on one value per channel (where the kernel refuses train mode)."""
    torch.manual_seed(0)
    z = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    mean_target, std_target = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    view = (1, -1) + (1,) * (len(shape) - 2)
    dims = [0] + list(range(2, len(shape)))
    mean = z.mean(dims, keepdim=True)
    std = ((z - mean) ** 2).mean(dims, keepdim=True).add(TRAIN_EPS).sqrt()
    expected = (z - mean) / std * std_target.view(view) + mean_target.view(view)
    got = normalized_output(z, mean_target, std_target)
    assert got.shape == z.shape
    torch.testing.assert_close(got, expected)
    weights = torch.randn(shape, dtype=torch.float64)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), z)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), z)
    torch.testing.assert_close(grad_got, grad_expected)


def _manifold(seed=0):
    torch.manual_seed(seed)
    base = nm.create_model("lenet", conv1=4, conv2=8, fc1=16, fc2=8)
    return nm.WeightManifold(nm.WidthSpace(base, torch.zeros(2, 1, 28, 28)),
                             nm.INRConfig(hidden=16, depth=2, frequencies=2, grid=False))


def _networks(manifold, counts):
    """Full-width and narrower parameters whose channels differ (a fresh INR gives nearly the same
    small weights everywhere, which calibration would hardly change): the randomly initialised
    reference network, and its first channels at ``counts``."""
    full = {k: v.detach() for k, v in manifold.original_parameters().items()}
    shapes = {k: v.shape for k, v in manifold.generate(counts).items()}
    return full, {k: full[k][tuple(slice(0, n) for n in shape)] * 1.7 for k, shape in shapes.items()}


def test_a_normalised_forward_is_the_calibrated_network_on_the_same_batch():
    manifold = _manifold()
    space, template = manifold.space, manifold.space.model
    x = torch.randn(64, 1, 28, 28)
    counts = space.resolve(0.5)
    full, narrow = _networks(manifold, counts)
    with recorded_statistics(template, space) as stats:
        functional_call(template, full, (x,))
    assert set(stats) == {layer.name for layer in calibratable(space)}
    with normalized_to(template, space, counts, stats, manifold.coord_config.positions):
        trained = functional_call(template, narrow, (x,))

    # calibrate() after the fact, with the full width measured on that same batch
    full_net, narrow_net = space.build(space.full), space.build(counts)
    for net, params in ((full_net, full), (narrow_net, narrow)):
        net.load_state_dict(params, strict=False)
    reference = Reference([x], channel_statistics(full_net, list(stats), [x]))
    calibrate(narrow_net, reference, space, counts, positions=manifold.coord_config.positions)
    with torch.no_grad():
        sampled, plain = narrow_net(x), functional_call(template, narrow, (x,))
    scale = sampled.abs().max()
    # within the variance's epsilon (TRAIN_EPS, as BatchNorm's), which calibrate() does not add
    assert (trained - sampled).abs().max() <= 2e-2 * scale
    assert (plain - sampled).abs().max() > 0.1 * scale  # the correction is not a no-op here


def test_at_full_width_the_normalisation_is_the_identity():
    manifold = _manifold(1)
    space, template = manifold.space, manifold.space.model
    x = torch.randn(32, 1, 28, 28)
    full, _ = _networks(manifold, space.full)
    with recorded_statistics(template, space) as stats:
        expected = functional_call(template, full, (x,))
    with normalized_to(template, space, space.full, stats):
        again = functional_call(template, full, (x,))
    assert (again - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not template._forward_hooks and all(not m._forward_hooks for m in template.modules())


def test_gradients_reach_the_inr_through_the_normalised_network():
    manifold = _manifold(2)
    space, template = manifold.space, manifold.space.model
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad(), recorded_statistics(template, space) as stats:
        functional_call(template, manifold.generate(space.full), (x,))
    with normalized_to(template, space, space.resolve(0.5), stats):
        functional_call(template, manifold.generate(space.resolve(0.5)), (x,)).square().mean().backward()
    grads = [p.grad for p in manifold.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


@pytest.mark.filterwarnings("ignore::neumeta.train.PoorReconstructionWarning")
@pytest.mark.filterwarnings("ignore::neumeta.train.NeverLearnedWarning")  # six steps on random data
def test_a_calibrated_fit_normalises_every_trained_width_and_validates_calibrated(monkeypatch):
    manifold = _manifold(3)
    normalised, validated = [], []
    real_normalized, real_scores = train.normalized_to, train.validation_scores

    def spy_normalized(net, space, counts, targets, positions="center"):
        normalised.append(dict(counts))
        return real_normalized(net, space, counts, targets, positions)

    def spy_scores(manifold, task, batches, widths, *args, calibration=None, **kwargs):
        if min(widths) < 1:  # not the full width alone (the reference against the INR when fit ends)
            validated.append(calibration)
        return real_scores(manifold, task, batches, widths, *args, calibration=calibration, **kwargs)

    monkeypatch.setattr(train, "normalized_to", spy_normalized)
    monkeypatch.setattr(train, "validation_scores", spy_scores)
    x, y = torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,))
    loader = TensorLoader(x, y, batch_size=8)
    config = nm.FitConfig(prefit_steps=2, steps=4, eval_every=2, train_calibrated=True, calibration_batches=3)
    result = nm.fit(manifold, nm.ClassificationTask(10), loader, TensorLoader(x[:16], y[:16], batch_size=8), config,
                    progress=False)
    assert len(normalised) == 2 * config.steps  # the sampled and the sandwich's narrowest width, every joint step
    assert len(validated) == 3 and all(c is not None and len(c) == 3 for c in validated)
    first = validated[0][0]  # training images (not validation ones), the same at every validation
    assert first.shape == (8, 1, 28, 28) and all((x == row).flatten(1).all(1).any() for row in first)
    assert all(torch.equal(c[0], first) for c in validated)
    assert len(result.history) == 3  # steps 2 (the pre-fit's end), 4 and 6


@pytest.mark.filterwarnings("ignore::neumeta.train.PoorReconstructionWarning")
def test_a_manifold_trained_calibrated_says_so_when_sampled_without_calibration(tmp_path):
    manifold = _manifold(4)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    config = nm.FitConfig(prefit_steps=1, steps=2, eval_every=100, train_calibrated=True)
    fitted = nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None, config,
                    progress=False).manifold
    fitted.save(tmp_path / "m.safetensors")
    loaded = nm.load(tmp_path / "m.safetensors")
    assert fitted.trained_calibrated and loaded.trained_calibrated
    with pytest.warns(UncalibratedWarning, match="width 0.5"):
        loaded.sample(0.5, samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncalibratedWarning)
        loaded.sample(0.5, samples=2, calibration=[x[:8]])
        loaded.sample(1.0, samples=2)  # full width needs none
        plain = nm.fit(_manifold(4), nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None,
                       nm.FitConfig(prefit_steps=1, steps=2, eval_every=100), progress=False).manifold
        assert not plain.trained_calibrated
        plain.sample(0.5, samples=2)


def test_train_calibrated_needs_the_full_width_forward():
    with pytest.raises(ValueError, match="train_calibrated needs inplace_distill"):
        nm.FitConfig(train_calibrated=True, inplace_distill=False)
    with pytest.raises(ValueError, match="calibration_batches"):
        nm.FitConfig(calibration_batches=0)


@pytest.mark.parametrize("shape", [(16, 8, 5, 5), (32, 10), (1, 6)])
def test_teacher_statistics_are_the_batch_statistics_without_a_graph(shape):
    """BatchNorm's running buffers (momentum 1, unbiased variance rescaled) give the same per-channel
    mean and std as var_mean does, a single value per channel included, and no graph."""
    from neumeta.calibrate import batch_statistics, teacher_statistics
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1).requires_grad_()
    mean, std = teacher_statistics(x * 2)
    expected = batch_statistics((x * 2).detach())
    torch.testing.assert_close(mean, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, expected[1], rtol=1e-5, atol=1e-6)
    assert not mean.requires_grad and not std.requires_grad
