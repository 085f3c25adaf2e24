"""baselines.slicing and baselines.slimmable: one set of weights sliced to any width, and a
private BatchNorm per trained width.

The slice must be exactly the network torch-pruning builds (``narrow_copy``), and at full width
the model itself; a switch must run with its own statistics, and an untrained width borrow the
nearest wider switch's.
"""
import pytest
import torch
import torch.nn as nn

import neumeta as nm
from neumeta.baselines import first_channels, narrow_copy
from neumeta.baselines.slicing import SlicedNetwork, reslice
from neumeta.baselines.slimmable import Slimmable
from neumeta.data import TensorLoader
from neumeta.experiment import Data


def tiny_data(shape, n=64, classes=4, batch_size=16, seed=0) -> Data:
    """Random inputs labelled by a fixed random linear map: learnable, and built in milliseconds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + tuple(shape), generator=g)
    y = (x.flatten(1) @ torch.randn(x[0].numel(), classes, generator=g)).argmax(1)
    loader = lambda shuffle: TensorLoader(x, y, batch_size=batch_size, shuffle=shuffle, seed=seed)
    return Data(train=loader(True), val=loader(False), test=loader(False),
                task=nm.ClassificationTask(classes), example=x[:2].clone())


def tiny_resnet():
    return nm.create_model("resnet20", stages=(8, 8, 16), num_classes=4)


RESNET_INPUT = (3, 8, 8)


def randomise_batchnorm(model):
    """Statistics and affine parameters as if trained, so a wrong slice shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


CASES = {
    "lenet": (lambda: nm.create_model("lenet"), (1, 28, 28), {"conv1": 5, "conv2": 32, "fc1": 100, "fc2": 7}),
    "resnet20": (lambda: randomise_batchnorm(tiny_resnet()), RESNET_INPUT,
                 {"conv1": 3, "layer1.1.conv1": 8, "layer3.0.conv2": 5, "layer3.2.conv1": 1}),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_slice_is_narrow_copy(name, train_mode):
    """At 0.5 and at a mixed width the functional call gives narrow_copy's output bit for bit
    (eval mode: running statistics sliced; train mode: batch statistics), and at full width
    the model's."""
    build, shape, mixed = CASES[name]
    model = build().train(train_mode)
    x = torch.randn((4,) + shape)
    slicer = SlicedNetwork(model, x)
    space = nm.WidthSpace(model, x)
    for counts in (space.resolve(0.5), space.resolve(mixed)):
        reference = narrow_copy(model, x, first_channels(counts)).train(train_mode)
        with torch.no_grad():
            assert torch.equal(slicer(counts, x), reference(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(slicer(space.full, x, training=False), model(x))
        assert torch.equal(slicer.network(space.full)(x), model(x))
        half = space.resolve(0.5)
        assert torch.equal(slicer.network(half)(x), narrow_copy(model, x, first_channels(half)).eval()(x))


def test_slice_gradients_reach_only_the_kept_channels():
    """Gradients of a narrow width land on the full weights' first channels, and only there."""
    model = nm.create_model("lenet")
    x = torch.randn(4, 1, 28, 28)
    slicer = SlicedNetwork(model, x)
    slicer({"conv1": 6, "conv2": 10, "fc1": 50}, x).square().sum().backward()
    grad = model.conv1.weight.grad.flatten(1).abs().sum(1)
    assert (grad[:6] > 0).all() and (grad[6:] == 0).all()
    fc1 = model.fc1.weight.grad
    assert (fc1[50:] == 0).all() and (fc1[:, 10 * 16:] == 0).all()  # conv2: 4x4 positions a channel
    assert (fc1[:50, :10 * 16] != 0).any()  # (a ReLU that is off passes no gradient)
    conv2_in = model.conv2.weight.grad.abs().sum((0, 2, 3))
    assert (conv2_in[6:] == 0).all() and (conv2_in[:6] > 0).all()


def test_slice_refuses_widening_and_unknown_groups():
    model = nm.create_model("lenet")
    slicer = SlicedNetwork(model, torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="cannot have 17"):
        slicer.key({"conv1": 17})
    with pytest.raises(KeyError, match="unknown channel group 'nope'"):
        slicer.key({"nope": 3})


@pytest.fixture(scope="module")
def trained_resnet():
    torch.manual_seed(0)
    data = tiny_data(RESNET_INPUT)
    slim = Slimmable(tiny_resnet(), data.example)
    history = slim.train(data, steps=4, lr=1e-2, progress=False)
    return slim, data, history


def _bn_state(module):
    return {f"{n}.{k}": t for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)
            for k, t in (("running_mean", m.running_mean), ("running_var", m.running_var),
                         ("weight", m.weight), ("bias", m.bias))}


def test_switch_has_its_own_batchnorm(trained_resnet):
    """The 0.75 network runs with exactly the 0.75 switch's statistics and affine parameters,
    which differ from the first channels of the 1.0 switch's (different inputs fed them)."""
    slim, data, history = trained_resnet
    assert len(history) == 4 and all(len(r["losses"]) == 3 for r in history)
    full, three_quarters = slim.space.resolve(1.0), slim.space.resolve(0.75)
    assert slim.switch_of(three_quarters) == 1
    net = slim.network(three_quarters)
    own = slim.switch_bn[1]
    for name, tensor in _bn_state(net).items():
        assert torch.equal(tensor, own[name]), name
    wide = reslice(slim.slicer, slim.switch_bn[0], full, three_quarters)
    stats = [n for n in _bn_state(net) if n.endswith(("running_mean", "running_var"))]
    differs = [n for n in stats if not torch.equal(_bn_state(net)[n], wide[n])]
    assert "layer3.2.bn2.running_var" in differs and len(differs) > len(stats) // 2
    # not the model's own (never run) BatchNorm either
    assert not torch.equal(net.layer3[2].bn2.running_mean,
                           slim.model.layer3[2].bn2.running_mean[:12])


def test_untrained_width_borrows_the_nearest_wider_switch(trained_resnet):
    """0.6 (5/5/10 channels) takes the 0.75 switch's (6/6/12) first channels, not the 0.5's
    (narrower) nor the 1.0's (further)."""
    slim, data, _ = trained_resnet
    counts = slim.space.resolve(0.6)
    assert slim.switch_of(counts) is None and slim.nearest_switch(counts) == 1
    net = slim.network(counts, bn="nearest")
    assert torch.equal(net.layer3[2].bn2.running_mean, slim.switch_bn[1]["layer3.2.bn2.running_mean"][:10])
    assert torch.equal(net.layer1[0].bn1.weight, slim.switch_bn[1]["layer1.0.bn1.weight"][:5])
    for name, tensor in _bn_state(net).items():
        assert torch.equal(tensor, reslice(slim.slicer, slim.switch_bn[1], slim.switches[1], counts)[name])
    # recalibrated: the same affine parameters, statistics measured at this width
    batches = list(data.train)[:2]
    recal = slim.network(counts, bn="recalibrate", calibration_batches=batches)
    assert torch.equal(recal.layer1[0].bn1.weight, net.layer1[0].bn1.weight)
    assert not torch.equal(recal.layer3[2].bn2.running_mean, net.layer3[2].bn2.running_mean)
    acc = data.task.evaluate(recal, data.test)["accuracy"]
    assert 0.0 <= acc <= 1.0


def test_no_wide_enough_switch_is_named():
    data = tiny_data(RESNET_INPUT)
    slim = Slimmable(tiny_resnet(), data.example, widths=(0.5, 0.75))
    with pytest.raises(ValueError, match=r"conv1 \(8 > 6\)"):
        slim.network(1.0)


def test_lenet_without_batchnorm_trains_and_runs_at_any_width():
    data = tiny_data((1, 28, 28))
    slim = Slimmable(nm.create_model("lenet", num_classes=4), data.example)
    before = {n: p.detach().clone() for n, p in slim.model.named_parameters()}
    slim.train(data, steps=3, progress=False)
    assert any(not torch.equal(before[n], p) for n, p in slim.model.named_parameters())
    for width in (0.3, 0.5, 0.75, 1.0):
        net = slim.network(width)
        result = data.task.evaluate(net, data.test)
        assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] == result["loss"]
    assert net.conv1.weight.shape[0] == 16 and slim.network(0.5).conv1.weight.shape[0] == 8
