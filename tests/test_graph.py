"""neumeta.graph: smooth and WidthSpace read one channel graph, so they see the same members.

smooth may permute anything tied to a group's channels (permuting keeps the function);
WidthSpace refuses to resize a group holding something it cannot resize, but only when that
group is chosen to morph.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import neumeta as nm
from neumeta.graph import channel_graph
from neumeta.smooth import _trace
from test_smooth import randomise_norms  # random norm and PReLU parameters, as if trained


class NormsInTheMiddle(nn.Module):
    """conv1 -> PReLU(6 slopes) -> conv2 -> GroupNorm -> conv3 (+BatchNorm, folded) -> head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act = nn.Conv2d(3, 6, 3, padding=1), nn.PReLU(6)
        self.conv2, self.gn = nn.Conv2d(6, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv3, self.bn = nn.Conv2d(8, 5, 1), nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        x = F.relu(self.gn(self.conv2(self.act(self.conv1(x)))))
        x = F.relu(self.bn(self.conv3(x)))
        return self.head(x.mean((2, 3)))


class LayerNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln = nn.Linear(10, 12), nn.LayerNorm(12)
        self.fc2, self.act = nn.Linear(12, 7), nn.PReLU(7)
        self.fc3 = nn.Linear(7, 9)
        self.head = nn.Linear(9, 3)

    def forward(self, x):
        x = self.act(self.fc2(torch.tanh(self.ln(self.fc1(x)))))
        return self.head(torch.relu(self.fc3(x)))




CASES = {  # model, example input, {group: (module, class name) WidthSpace cannot resize}
    "conv": (NormsInTheMiddle, (3, 3, 6, 6), {"conv1": ("act", "PReLU"), "conv2": ("gn", "GroupNorm")}),
    "mlp": (LayerNormMLP, (3, 10), {"fc1": ("ln", "LayerNorm"), "fc2": ("act", "PReLU")}),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    cls, shape, refused = CASES[request.param]
    model = nm.fold_batchnorm(randomise_norms(cls()))  # WidthSpace folds BatchNorm: compare alike
    return model, torch.randn(shape), refused


def test_smooth_and_width_space_see_the_same_tensor_axes(case):
    model, x, refused = case
    keep = sorted(set(g.name for g in channel_graph(model, x).groups) - set(refused))
    space = nm.WidthSpace(model, x, groups=keep)  # the refused groups exist, but do not morph
    seen_by_space = {g.name: set(g.tensor_axes()) for g in space.all_groups.values()}
    permuted_by_smooth = {g.name: {(s.name, s.axis) for s in g.slices} for g in _trace(model, x, None)}
    assert seen_by_space == permuted_by_smooth
    for group, (module, _) in refused.items():  # the per-channel vectors are members of both
        assert (f"{module}.weight", 0) in seen_by_space[group]


def test_smooth_permutes_the_per_channel_vectors_and_keeps_the_function(case):
    model, x, refused = case
    smoothed, report = nm.smooth(model, x)
    torch.testing.assert_close(smoothed(x), model(x), rtol=1e-5, atol=1e-6)
    for group, (module, _) in refused.items():
        order = list(report.groups[group].order)
        assert order != sorted(order), group  # random weights: the order really changes
        before, after = model.get_submodule(module), smoothed.get_submodule(module)
        assert torch.equal(after.weight, before.weight[order])


def test_width_space_refuses_only_the_groups_it_would_resize(case):
    model, x, refused = case
    for group, (module, kind) in refused.items():
        with pytest.raises(ValueError, match=rf"'{module}' \({kind}\).*fixed="):
            nm.WidthSpace(model, x, groups=[group])
    with pytest.raises(ValueError, match="|".join(f"'{m}'" for m, _ in refused.values())):
        nm.WidthSpace(model, x)  # every group by default
    space = nm.WidthSpace(model, x, fixed=list(refused))  # fixing those groups' producers: fine
    assert set(space.full).isdisjoint(refused) and space.full
    small = space.build(space.resolve(0.5))
    assert small(x).shape == model(x).shape


class LooseScale(nn.Module):
    """A parameter used outside a module: smooth permutes it, WidthSpace cannot resize it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 5, 3), nn.Conv2d(5, 6, 3)
        self.scale = nn.Parameter(torch.rand(1, 5, 1, 1) + 0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.conv1(x)) * self.scale
        return self.head(F.relu(self.conv2(x)).mean((2, 3)))


def test_loose_parameter_is_permuted_by_smooth_and_refused_by_width_space():
    model, x = LooseScale().eval(), torch.randn(2, 3, 7, 7)
    smoothed, report = nm.smooth(model, x)
    torch.testing.assert_close(smoothed(x), model(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(smoothed.scale[0, :, 0, 0], model.scale[0, list(report.groups["conv1"].order), 0, 0])
    with pytest.raises(ValueError, match="'scale'"):
        nm.WidthSpace(model, x)
    assert set(nm.WidthSpace(model, x, groups=["conv2"]).full) == {"conv2"}


def test_single_slope_prelu_does_not_block_resizing():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.PReLU(), nn.Conv2d(6, 4, 3))
    x = torch.randn(2, 3, 7, 7)
    space = nm.WidthSpace(model, x)
    assert space.full == {"0": 6}
    assert space.build(space.resolve(0.5))(x).shape == (2, 4, 3, 3)
