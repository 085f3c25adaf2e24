"""WidthSpace: groups found from the dependency graph, widths resolved, modules really resized."""
import re

import pytest
import torch
import torch.nn as nn

import neumeta as nm


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_lenet_groups_and_fixed_ends(lenet, example):
    space = nm.WidthSpace(lenet, example)
    assert space.full == {"conv1": 16, "conv2": 32, "fc1": 128, "fc2": 64}
    assert space.output_layers == ["fc3"]
    first, flat = space.layers[0], space.layers[2]
    assert first.inp[0].group is None and first.inp[0].channels == 1  # image channels never morph
    assert flat.inp[0].group == "conv2" and flat.inp[0].repeat == 16  # 4x4 positions per conv channel


@pytest.mark.parametrize("width", [0.25, 0.5, 0.6, 0.75, 1.0, 1.25])
def test_sample_parameter_count_matches_fresh_model(small_manifold, example, width):
    if width > 1:  # wider than trained: works, and says it is extrapolating
        with pytest.warns(UserWarning, match="outside the trained range"):
            module = small_manifold.sample(width, samples=2)
    else:
        module = small_manifold.sample(width, samples=2)
    fresh = nm.create_model("lenet", **module.neumeta_widths)
    assert n_params(module) == n_params(fresh)
    assert module(example).shape == (2, 10)
    assert module.conv1.out_channels == max(1, round(16 * width))
    if width < 1:
        assert n_params(module) < n_params(small_manifold.space.model)


@pytest.mark.parametrize("widths", [{"conv1": 3}, {"fc1": 0.5, "conv2": 7}, {"conv1": 1, "conv2": 1, "fc1": 1, "fc2": 1}])
def test_sample_per_group_dict(small_manifold, example, widths):
    module = small_manifold.sample(widths, samples=1)
    counts = small_manifold.space.resolve(widths)
    fresh = nm.create_model("lenet", **counts)
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert module(example).shape == (2, 10)
    for name, value in widths.items():
        expected = value if isinstance(value, int) else round(small_manifold.space.full[name] * value)
        assert counts[name] == expected


def test_member_module_name_resolves_to_group(lenet, example):
    space = nm.WidthSpace(lenet, example)
    assert space.resolve({"conv2": 5})["conv2"] == 5


@pytest.mark.parametrize("width, match", [
    (0.0, "must be > 0"), (-0.5, "must be > 0"), ({"conv1": 0}, "conv1"), ({"conv1": -3}, "conv1"),
    (0.01, "0 channels"), ({"fc2": 0.001}, "fc2"),
])
def test_bad_widths_name_the_problem(small_manifold, width, match):
    with pytest.raises(ValueError, match=match):
        small_manifold.sample(width)


def test_unknown_group_is_named(small_manifold):
    with pytest.raises(KeyError, match="nope"):
        small_manifold.sample({"nope": 4})


def test_unknown_model_is_named():
    with pytest.raises(KeyError, match="resnet9000"):
        nm.create_model("resnet9000")


def test_restricting_groups(lenet, example):
    space = nm.WidthSpace(lenet, example, groups=["fc1"])
    assert list(space.full) == ["fc1"]
    shapes = space.parameter_shapes(space.resolve(0.5))
    assert shapes["fc1.weight"] == (64, 512) and shapes["conv1.weight"] == (16, 1, 5, 5)


def test_build_at_full_width_with_original_weights_is_the_model(lenet, example):
    space = nm.WidthSpace(lenet, example)
    module = space.build(space.full)
    module.load_state_dict(space.model.state_dict())
    torch.testing.assert_close(module(example), lenet.eval()(example), rtol=0, atol=1e-6)


def test_refuses_layers_it_cannot_resize(example):
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match="GroupNorm"):
        nm.WidthSpace(model, example)


@pytest.mark.parametrize("width, shown", [
    (1e6, "1000000.0"), (float("inf"), "inf"), (float("nan"), "nan"), (-0.5, "-0.5"), (0, "0"), ("abc", "'abc'"),
    ({"conv1": 1e6}, "1000000.0"), ({"conv1": float("inf")}, "inf"), ({"conv1": float("nan")}, "nan"),
    ({"conv1": -0.5}, "-0.5"), ({"conv1": 0}, "0"), ({"conv1": "abc"}, "'abc'"), ({"conv1": 10**6}, "1000000"),
    ({"conv1": None}, "None"),
])
def test_unusable_widths_are_refused_naming_the_width(lenet, example, width, shown):
    space = nm.WidthSpace(lenet, example)
    with pytest.raises(ValueError, match=rf"width {re.escape(shown)}(?![\d.])") as err:
        space.resolve(width)
    if isinstance(width, dict):
        assert "'conv1'" in str(err.value)  # and the group


def test_extrapolation_is_bounded_by_max_extrapolation(lenet, example):
    space = nm.WidthSpace(lenet, example)
    assert space.max_extrapolation == 2.0
    assert space.resolve(2.0)["conv1"] == 32 and space.resolve({"conv1": 32})["conv1"] == 32
    with pytest.raises(ValueError, match="max_extrapolation"):
        space.resolve(2.01)
    with pytest.raises(ValueError, match="'conv1'.*max_extrapolation"):
        space.resolve({"conv1": 33})
    space.max_extrapolation = 4.0
    assert space.resolve(3.0)["fc1"] == 384
