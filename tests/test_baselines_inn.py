"""baselines.inn: a width is a resampling of the full weights along every channel axis.

Exact at full width; for weights that do not vary along the channels, the same function at any
width (the C/c quadrature weight keeps every sum over channels); gradients reach all the full
weights the interpolation reads.
"""
import pytest
import torch

import neumeta as nm
from neumeta.baselines.inn import INN
from neumeta.baselines.slicing import SlicedNetwork
from test_baselines_slimmable import RESNET_INPUT, randomise_batchnorm, tiny_data, tiny_resnet

CASES = {
    "lenet": (lambda: nm.create_model("lenet", num_classes=4), (1, 28, 28)),
    "resnet20": (lambda: randomise_batchnorm(tiny_resnet()), RESNET_INPUT),
}


@torch.no_grad()
def make_constant_along_channels(inn: INN) -> None:
    """Give every channel of a group the weights of its first channel (per flatten slot), so the
    function of the channel coordinate is flat. Weights are made positive and biases (running
    means) zero, so no ReLU past the first layer is off for every input: one channel per group
    is left, and one dead unit would silence its group."""
    tensors = inn.slicer.full_tensors()
    for name, tensor in tensors.items():
        if name.endswith((".bias", ".running_mean")):
            tensor.zero_()
        elif tensor.is_floating_point():
            tensor.abs_()
    for (name, axis), lookup in inn.slicer.position_of.items():
        tensor = tensors[name]
        cells = {}
        for (group, channel, slot), pos in sorted(lookup.items()):
            cells.setdefault((group, slot), []).append(pos)
        for positions in cells.values():
            index = torch.tensor(positions)
            first = tensor.index_select(axis, index[:1])
            tensor.index_copy_(axis, index, first.expand_as(tensor.index_select(axis, index)).contiguous())


@pytest.mark.parametrize("name", CASES)
def test_full_width_is_the_model(name):
    build, shape = CASES[name]
    model = build().eval()
    x = torch.randn((4,) + shape)
    inn = INN(model, x)
    with torch.no_grad():
        assert torch.equal(inn.network(1.0, bn="resample")(x), model(x))
        assert torch.equal(inn.slicer(inn.space.full, x, training=False), model(x))


@pytest.mark.parametrize("name", CASES)
def test_flat_weights_give_the_same_function_at_every_width(name):
    build, shape = CASES[name]
    x = torch.randn((4,) + shape)
    inn = INN(build(), x)
    make_constant_along_channels(inn)
    with torch.no_grad():
        full = inn.model.eval()(x)
        assert (full[0] - full[1]).abs().max() > 1e-3 * full.abs().max()  # the inputs still matter
        mixed = {g: max(1, size // (2 + i % 3)) for i, (g, size) in enumerate(inn.space.full.items())}
        for counts in (0.5, 0.3, mixed):
            net = inn.network(counts, bn="resample")
            assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in inn.model.parameters())
            torch.testing.assert_close(net(x), full, rtol=1e-4, atol=1e-4)
        # without the quadrature weight (a plain slice) the sums would shrink
        sliced = SlicedNetwork(inn.model, x).network(inn.space.resolve(0.5))(x)
        assert not torch.allclose(sliced, full, rtol=1e-2, atol=1e-2)


def test_resampling_interpolates_cell_centres():
    """16 -> 8 channels: new channel j sits at the centre of old channels 2j and 2j+1, and an
    input axis weighs each sample 16/8 = 2."""
    model = nm.create_model("lenet")
    x = torch.randn(2, 1, 28, 28)
    inn = INN(model, x)
    net = inn.network({"conv1": 8}, bn="resample")
    w1, w2 = model.conv1.weight.detach(), model.conv2.weight.detach()
    torch.testing.assert_close(net.conv1.weight, (w1[0::2] + w1[1::2]) / 2)
    torch.testing.assert_close(net.conv2.weight, w2[:, 0::2] + w2[:, 1::2])
    # 16 -> 5: centres at old index 1.1, 4.3, ... ; the first one mixes channels 1 and 2
    net5 = inn.network({"conv1": 5}, bn="resample")
    torch.testing.assert_close(net5.conv1.bias[0], 0.9 * model.conv1.bias[1] + 0.1 * model.conv1.bias[2])


def test_gradients_reach_every_full_channel():
    model = nm.create_model("lenet")
    x = torch.randn(4, 1, 28, 28)
    inn = INN(model, x)
    inn.forward(0.5, x).square().sum().backward()
    grad = inn.model.conv1.weight.grad.flatten(1).abs().sum(1)
    assert (grad > 0).all()  # a slice would leave channels 8..15 without any
    assert inn.model.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CASES)
def test_tiny_training_runs_and_evaluates(name):
    build, shape = CASES[name]
    data = tiny_data(shape)
    inn = INN(build(), data.example, min_width=0.25)
    before = {n: p.detach().clone() for n, p in inn.model.named_parameters()}
    history = inn.train(data, steps=3, lr=1e-2, progress=False)
    assert [len(r["widths"]) for r in history] == [2, 2, 2] and all(r["widths"][0] == 1.0 for r in history)
    assert all(not torch.equal(before[n], p) for n, p in inn.model.named_parameters())
    for width in (0.25, 0.5, 0.75, 1.0):
        result = data.task.evaluate(inn.network(width), data.test)
        assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] == result["loss"]
