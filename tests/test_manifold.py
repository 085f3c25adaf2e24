"""The INR: per-tensor routing, generated shapes, noise, sampling."""
import pytest
import torch

import neumeta as nm
from neumeta.coords import tensor_coordinates


def _mark_blocks(manifold):
    """Make block b output the constant b + 1, whatever its input."""
    with torch.no_grad():
        manifold.inr.w_out.zero_()
        for b in range(manifold.inr.b_out.shape[0]):
            manifold.inr.b_out[b].fill_(b + 1.0)


def test_every_coordinate_goes_to_its_own_tensor_block(small_manifold):
    _mark_blocks(small_manifold)
    space = small_manifold.space
    for noise in (False, True):
        for width in (1.0, 0.5, {"conv1": 3, "fc2": 17}):
            counts = space.resolve(width)
            params = small_manifold.generate(counts, noise=noise)
            for spec in small_manifold.specs:
                value = (spec.block + 1) * small_manifold.output_scale[spec.block]
                if not spec.bias:
                    value = value / space.layer_channels(spec.layer, counts)[0]
                torch.testing.assert_close(params[spec.name], torch.full_like(params[spec.name], float(value)))


def test_noise_never_touches_the_layer_coordinate(small_manifold):
    space = small_manifold.space
    for layer in space.layers:
        for bias in (False, True):
            coords, scale = tensor_coordinates(space, layer, space.full, bias, small_manifold.coord_config)
            assert scale[0] == 0 and scale[1:].abs().sum() > 0
            assert torch.all(coords[:, 0] == layer.index / len(space.layers))


def test_generated_shapes_match_module_parameters(small_manifold):
    space = small_manifold.space
    for width in (1.0, 0.75, 0.3, 1.2):
        counts = space.resolve(width)
        params = small_manifold.generate(counts)
        built = dict(space.build(counts).named_parameters())
        assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in built.items()}


def test_generate_is_differentiable(small_manifold):
    params = small_manifold.generate(0.5, noise=True)
    sum(p.sum() for p in params.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small_manifold.parameters())


def test_noise_changes_weights_and_averaging_is_deterministic(small_manifold):
    a = small_manifold.generate(1.0, noise=True)["fc1.weight"]
    b = small_manifold.generate(1.0, noise=True)["fc1.weight"]
    assert not torch.equal(a, b)
    m1 = small_manifold.expected_parameters(0.5, samples=4, seed=3)["fc1.weight"]
    m2 = small_manifold.expected_parameters(0.5, samples=4, seed=3)["fc1.weight"]
    assert torch.equal(m1, m2)


def test_row_layout_round_trip(small_manifold):
    rows = small_manifold.original_rows()
    original = small_manifold.original_parameters()
    for spec, r in zip(small_manifold.specs, rows):
        assert torch.equal(small_manifold._rows_to_tensor(spec, r, small_manifold.space.full), original[spec.name])


def test_sample_writes_generated_weights(small_manifold, example):
    module = small_manifold.sample(0.5, samples=1)
    params = small_manifold.generate(0.5)
    for name, value in params.items():
        torch.testing.assert_close(module.get_parameter(name), value)


def test_batched_and_loop_blocks_agree(small_manifold):
    small_manifold.batched = False
    a = small_manifold.generate(0.75)
    small_manifold.batched = True
    b = small_manifold.generate(0.75)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_layers_no_morphable_group_touches_keep_the_reference_weights():
    torch.manual_seed(0)
    model = nm.create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    space = nm.WidthSpace(nm.fold_batchnorm(model), x, groups="paper")
    manifold = nm.WeightManifold(space, nm.INRConfig(hidden=8, depth=2, frequencies=2, grid=False))
    generated = {s.name for s in manifold.specs}
    assert generated == {"layer3.2.conv1.weight", "layer3.2.conv1.bias", "layer3.2.conv2.weight"} | \
        ({"layer3.2.conv2.bias"} if space.model.layer3[2].conv2.bias is not None else set())
    half = manifold.sample(0.5, samples=1)
    assert half.layer3[2].conv1.out_channels == 32 and half.layer3[2].conv2.in_channels == 32
    reference = dict(space.model.named_parameters())
    for name, p in half.named_parameters():
        if name not in generated:
            torch.testing.assert_close(p, reference[name], rtol=0, atol=0)
    assert half(x).shape == (2, 10)
    with pytest.raises(ValueError, match="no layer has a morphable channel group"):
        nm.WeightManifold(nm.WidthSpace(nm.fold_batchnorm(model), x, groups=[]))
