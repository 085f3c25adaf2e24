"""Statistics calibration of sampled networks: identity at full width, targets met exactly."""
import pytest
import torch

import neumeta as nm
from neumeta.calibrate import calibratable, calibrate, cell_targets, channel_statistics


def _inputs(shape, n=3, batch=16):
    return [torch.randn((batch,) + shape) for _ in range(n)]


def test_cell_targets_pool_narrower_and_pick_wider():
    values = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0], dtype=torch.float64)
    torch.testing.assert_close(cell_targets(values, 6), values)
    torch.testing.assert_close(cell_targets(values, 3), torch.tensor([2.0, 6.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(cell_targets(values, 2), torch.tensor([3.0, 9.0], dtype=torch.float64))
    torch.testing.assert_close(cell_targets(values, 12), values.repeat_interleave(2))
    # "index" positions: channel j of C sits at j / C, so a cell starts at its channel
    torch.testing.assert_close(cell_targets(values, 4, "index"), torch.tensor([2.0, 5.0, 8.0, 11.0], dtype=torch.float64))
    torch.testing.assert_close(cell_targets(values, 4), torch.tensor([1.0, 4.0, 7.0, 10.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="positions"):
        cell_targets(values, 4, "edges")


def test_full_width_calibration_is_the_identity(small_manifold):
    """The INR's own full width calibrated to itself (the reference at full width is never
    calibrated: tests/test_full_width.py)."""
    inputs = _inputs((1, 28, 28))
    net = small_manifold.sample(1.0, samples=1, full_width="inr")
    calibrated = small_manifold.sample(1.0, samples=1, calibration=inputs, full_width="inr")
    assert calibrated.neumeta_calibration.layers == ["conv1", "conv2", "fc1", "fc2", "fc3"]  # the classifier too
    x = torch.randn(8, 1, 28, 28)
    reference = net(x)
    assert (calibrated(x) - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("width", [0.25, 0.5, {"conv1": 3, "conv2": 20, "fc1": 128, "fc2": 7}])
def test_every_calibrated_layer_has_its_cells_statistics(small_manifold, width):
    space = small_manifold.space
    inputs = _inputs((1, 28, 28))
    counts = space.resolve(width)
    net = small_manifold.sample(counts, samples=1)
    reference = small_manifold.sample(1.0, samples=1, full_width="inr")
    before = [p.numel() for p in net.parameters()]
    report = calibrate(net, reference, space, counts, inputs)
    assert [p.numel() for p in net.parameters()] == before  # folded into the same weights and biases
    names = [layer.name for layer in calibratable(space)]
    assert report.layers == names and report.batches == 3
    targets = channel_statistics(reference, names, inputs)
    measured = channel_statistics(net, names, inputs)
    for layer in calibratable(space):
        group = layer.out[0].group
        count = counts[group] if group is not None else layer.out[0].channels  # the classifier: 10
        for target, got in zip(targets[layer.name], measured[layer.name]):
            torch.testing.assert_close(got, cell_targets(target, count), rtol=1e-4, atol=1e-5)


def test_residual_streams_and_bias_free_layers_are_calibrated():
    torch.manual_seed(0)
    model = nm.create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    space = nm.WidthSpace(nm.fold_batchnorm(model), x)
    manifold = nm.WeightManifold(space, nm.INRConfig(hidden=8, depth=2, frequencies=2, grid=False))
    inputs = _inputs((3, 32, 32), n=2, batch=8)
    counts = space.resolve(0.5)
    net = manifold.sample(counts, samples=1)
    report = calibrate(net, manifold.sample(1.0, samples=1, full_width="inr"), space, counts, inputs)
    assert len(report.layers) == len(calibratable(space)) > 10
    assert torch.isfinite(net(inputs[0])).all()


def test_bad_input_is_named(small_manifold):
    space = small_manifold.space
    net = small_manifold.sample(0.5, samples=1)
    reference = small_manifold.sample(1.0, samples=1, full_width="inr")
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(net, reference, space, space.resolve(0.5), [])
    with pytest.raises(ValueError, match="conv1"):
        calibrate(net, reference, space, space.resolve(0.75), _inputs((1, 28, 28), n=1))

