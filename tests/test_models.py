"""Every registered model goes through the whole chain: fold -> smooth -> WidthSpace -> manifold
-> sample, and a sampled network is an ordinary, smaller instance of the same architecture."""
import pytest
import torch

import neumeta as nm
from neumeta.models import example_input, width_kwargs

TINY_INR = nm.INRConfig(hidden=16, depth=3, frequencies=2)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def randomised(name):
    torch.manual_seed(0)
    model = nm.create_model(name)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(example_input(name, batch=8) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=nm.list_models())
def chain(request):
    name = request.param
    model = randomised(name)
    x = example_input(name)
    smoothed, _ = nm.smooth(nm.fold_batchnorm(model), x)
    space = nm.WidthSpace(smoothed, x)
    return name, model, x, nm.WeightManifold(space, TINY_INR)


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 0.25, "random"])
def test_sampled_network_is_the_architecture_at_that_width(chain, width):
    name, model, x, manifold = chain
    if width == "random":
        rng = torch.Generator().manual_seed(0)
        width = {g: int(torch.randint(1, size + 1, (1,), generator=rng)) for g, size in manifold.space.full.items()}
    small = manifold.sample(width, samples=1)
    counts = manifold.space.resolve(width)
    assert small(x).shape == model(x).shape
    rebuilt = nm.fold_batchnorm(nm.create_model(name, **width_kwargs(name, counts)))
    rebuilt.load_state_dict(small.state_dict())  # strict: same tensors, same shapes
    assert n_params(small) == n_params(rebuilt)
    if width != 1.0:
        assert n_params(small) < n_params(manifold.space.model)


def test_full_width_with_original_weights_reproduces_the_model(chain):
    name, model, x, manifold = chain
    space = manifold.space
    full = space.build(space.full)
    full.load_state_dict(space.model.state_dict())
    torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-5)


def test_sampled_network_round_trips_through_a_file(chain, tmp_path):
    name, model, x, manifold = chain
    small = manifold.sample(0.5, samples=1)
    loaded = nm.load_model(nm.save_model(small, tmp_path / "small.safetensors"))
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_unsampled_model_with_custom_widths_round_trips(tmp_path):
    model = nm.create_model("resnet20", stages=(8, 16, 24)).eval()
    x = example_input("resnet20")
    loaded = nm.load_model(nm.save_model(model, tmp_path / "custom.safetensors"))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
