"""baselines.usnet: the sandwich rule with in-place distillation, and BatchNorm calibration per
width (train-mode statistics, no weight touched)."""
import pytest
import torch
import torch.nn as nn

import neumeta as nm
from neumeta.baselines.usnet import USNet
from test_baselines_slimmable import RESNET_INPUT, tiny_data, tiny_resnet


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = tiny_data(RESNET_INPUT)
    usnet = USNet(tiny_resnet(), data.example, min_width=0.25)
    ran = []  # the channel counts every forward pass ran at
    forward = usnet.forward
    usnet.forward = lambda counts, x: (ran.append(usnet.space.resolve(counts)), forward(counts, x))[1]
    distilled = []
    distill = data.task.distill
    data.task.distill = lambda s, t: (distilled.append(t.requires_grad), distill(s, t))[1]
    history = usnet.train(data, steps=3, lr=1e-2, progress=False, seed=1)
    del usnet.forward, data.task.distill
    return usnet, data, history, ran, distilled


def test_sandwich_runs_the_largest_and_the_smallest_every_step(trained):
    usnet, data, history, ran, distilled = trained
    full, smallest = usnet.space.resolve(1.0), usnet.space.resolve(0.25)
    assert len(history) == 3 and len(ran) == 3 * 4
    for step, record in enumerate(history):
        widths = record["widths"]
        assert widths[0] == 1.0 and widths[1] == 0.25 and len(widths) == 4
        assert all(0.25 <= w <= 1.0 for w in widths[2:])
        assert ran[4 * step] == full and ran[4 * step + 1] == smallest
    # every width but the largest learns from the largest's detached outputs
    assert distilled == [False] * (3 * 3)
    assert len({w for r in history for w in r["widths"][2:]}) == 6  # fresh random widths each step


def test_calibration_changes_statistics_not_weights(trained):
    usnet, data, _, _, _ = trained
    before = {k: v.clone() for k, v in usnet.model.state_dict().items()}
    counts = usnet.space.resolve(0.5)
    batches = list(data.train)[:3]
    uncalibrated = usnet.slicer.network(counts)
    net = usnet.calibrate(counts, batches)
    after = usnet.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shared model untouched
    for (name, p), (_, q) in zip(net.named_parameters(), uncalibrated.named_parameters()):
        assert torch.equal(p, q), name
    changed = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)
               and not torch.equal(m.running_mean, dict(uncalibrated.named_modules())[n].running_mean)]
    assert len(changed) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    # train-mode, cumulative: bn1's mean is the mean of conv1's outputs over every batch
    with torch.no_grad():
        outputs = torch.cat([net.conv1(x) for x, _ in batches])
    torch.testing.assert_close(net.bn1.running_mean, outputs.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert not net.training and net.bn1.momentum == 0.1


def test_every_width_evaluates(trained):
    usnet, data, _, _, _ = trained
    for width in (0.25, 0.4, 0.5, 0.75, 1.0):
        result = data.task.evaluate(usnet.network(width), data.test)
        assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] == result["loss"]
    assert usnet.network({"conv1": 3}).conv1.weight.shape[0] == 3


def test_lenet_trains_and_needs_no_calibration():
    data = tiny_data((1, 28, 28))
    usnet = USNet(nm.create_model("lenet", num_classes=4), data.example)
    with torch.no_grad():
        assert torch.equal(usnet.network(1.0)(data.example), usnet.model.eval()(data.example))
    usnet.train(data, steps=2, progress=False)
    assert data.task.evaluate(usnet.network(0.3), data.test)["accuracy"] >= 0.0


def test_batchnorm_network_needs_calibration_data():
    data = tiny_data(RESNET_INPUT)
    usnet = USNet(tiny_resnet(), data.example)
    with pytest.raises(ValueError, match="calibration_batches"):
        usnet.network(0.5)
    assert usnet.network(0.5, calibration_batches=[data.example]).conv1.weight.shape[0] == 4
