"""Every registered model goes through the whole chain: fold -> smooth -> WidthSpace -> manifold
-> sample, and a sampled network is an ordinary, smaller instance of the same architecture."""
import pytest
import torch

import neumeta as nm
from neumeta.models import example_input, width_kwargs

TINY_INR = nm.INRConfig(hidden=16, depth=3, frequencies=2)

# Test-size versions of the ImageNet-scale models: smoothing dominates the chain's cost and grows
# with channels^2 x tensor size (full resnet18 alone: ~14 s on one CPU thread), while the code
# paths (stem, bottlenecks, shortcuts, concatenation skips) are the same at any base width.
TEST_KWARGS = {
    "resnet18": dict(base=16, num_classes=10),
    "resnet50": dict(base=8, num_classes=10),
    "unet_r18": dict(base=16, decoder_base=4, num_classes=5),
}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def build(name, **widths):
    return nm.create_model(name, **{**TEST_KWARGS.get(name, {}), **widths})


def outputs(y):
    """A model's output as a tuple of tensors (a VAE returns (reconstruction, mu, logvar))."""
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def randomised(name):
    torch.manual_seed(0)
    model = build(name)
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
    assert [y.shape for y in outputs(small(x))] == [y.shape for y in outputs(model(x))]
    rebuilt = nm.fold_batchnorm(build(name, **width_kwargs(name, counts)))
    rebuilt.load_state_dict(small.state_dict())  # strict: same tensors, same shapes
    assert n_params(small) == n_params(rebuilt)
    if width != 1.0:
        assert n_params(small) < n_params(manifold.space.model)


def test_full_width_with_original_weights_reproduces_the_model(chain):
    name, model, x, manifold = chain
    space = manifold.space
    full = space.build(space.full)
    full.load_state_dict(space.model.state_dict())
    torch.testing.assert_close(outputs(full(x)), outputs(model(x)), rtol=1e-5, atol=1e-5)


def test_sampled_network_round_trips_through_a_file(chain, tmp_path):
    name, model, x, manifold = chain
    small = manifold.sample(0.5, samples=1)
    loaded = nm.load_model(nm.save_model(small, tmp_path / "small.safetensors"))
    torch.testing.assert_close(outputs(loaded(x)), outputs(small(x)), rtol=0, atol=0)


def test_unsampled_model_with_custom_widths_round_trips(tmp_path):
    model = nm.create_model("resnet20", stages=(8, 16, 24)).eval()
    x = example_input("resnet20")
    loaded = nm.load_model(nm.save_model(model, tmp_path / "custom.safetensors"))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_imagenet_resnets_have_the_reference_sizes():
    """Same parameter count as the published ResNet-18/50 (torchvision's 11,689,512 / 25,557,032)."""
    assert n_params(nm.create_model("resnet18")) == 11_689_512
    assert n_params(nm.create_model("resnet50")) == 25_557_032


def test_outputs_the_task_needs_never_morph():
    """Class logits, segmentation logits, the VAE's image and latent (a tuple output) stay fixed."""
    expected = {"resnet18": ["fc"], "resnet50": ["fc"], "unet_r18": ["head"],
                "vae": ["decoder.1", "logvar", "mu"]}
    for name, layers in expected.items():
        space = nm.WidthSpace(build(name), example_input(name))
        assert space.output_layers == layers, name
        small = space.build(space.resolve(0.25))
        for y, y_full in zip(outputs(small(example_input(name))), outputs(space.model(example_input(name)))):
            assert y.shape == y_full.shape, name


def test_vae_decodes_mu_in_eval_mode_and_samples_in_training():
    model = nm.create_model("vae")
    x = example_input("vae")
    model.eval()
    recon, mu, _ = model(x)
    torch.testing.assert_close(model.decode(mu), recon)
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(model(x)[0], model.decode(model.encode(x)[0]))


@pytest.mark.parametrize("name, groups", [("resnet20", {"layer3.2.conv1": 64}), ("resnet56", {"layer3.8.conv1": 64}),
                                          ("resnet18", {"layer4.1.conv1": 512}),
                                          ("resnet50", {"layer4.2.conv1": 512, "layer4.2.conv2": 512})])
def test_paper_preset_morphs_only_the_last_block(name, groups):
    model = nm.create_model(name)
    space = nm.WidthSpace(model, example_input(name), groups="paper")
    assert space.full == groups
    small = space.build(space.resolve(0.5))
    rebuilt = nm.fold_batchnorm(nm.create_model(name, **width_kwargs(name, space.resolve(0.5))))
    rebuilt.load_state_dict(small.state_dict())


def test_paper_preset_is_refused_where_undefined():
    with pytest.raises(ValueError, match="LeNet declares no paper preset"):
        nm.WidthSpace(nm.create_model("lenet"), example_input("lenet"), groups="paper")
    with pytest.raises(ValueError, match="not a preset"):
        nm.WidthSpace(nm.create_model("lenet"), example_input("lenet"), groups="conv1")


def test_flops_fall_with_width(chain):
    from neumeta.flops import count_flops
    name, model, x, manifold = chain
    space = manifold.space
    flops = [count_flops(space.build(space.resolve(w)), x[:1]) for w in (1.0, 0.75, 0.5, 0.25)]
    assert all(a > b for a, b in zip(flops, flops[1:])), flops
