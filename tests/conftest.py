import pytest
import torch

import neumeta as nm



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def lenet():
    return nm.create_model("lenet")


@pytest.fixture
def example():
    return torch.randn(2, 1, 28, 28)


@pytest.fixture
def small_manifold(lenet, example):
    """A LeNet manifold with a tiny INR, so tests stay fast; the INR at every width (recipe inr,
    no grid), since these tests check the INR's own mechanics (the default's grid alone in the
    trained range: tests/test_grid_alone.py)."""
    space = nm.WidthSpace(lenet, example)
    return nm.WeightManifold(space, nm.INRConfig(hidden=32, depth=3, frequencies=4, grid=False))
