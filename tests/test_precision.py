"""INRConfig(precision="bfloat16"): the INR's matmuls in bfloat16, everything else float32."""
import dataclasses

import pytest
import torch

import neumeta as nm
from neumeta.data import TensorLoader
from neumeta.train import reconstruction_errors


def _manifolds():
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    example = torch.zeros(2, 1, 28, 28)
    config = nm.INRConfig(hidden=32, depth=3, frequencies=4, grid=False)
    torch.manual_seed(1)
    exact = nm.WeightManifold(nm.WidthSpace(base, example), config)
    torch.manual_seed(1)
    rounded = nm.WeightManifold(nm.WidthSpace(base, example), dataclasses.replace(config, precision="bfloat16"))
    return exact, rounded


def test_bfloat16_gives_float32_weights_within_bfloat16_rounding_of_the_exact_ones():
    exact, rounded = _manifolds()
    assert all(torch.equal(a, b) for a, b in zip(exact.parameters(), rounded.parameters()))
    for width in (1.0, 0.5):
        a = exact.generate(width)
        b = rounded.generate(width)
        for name in a:
            assert b[name].dtype == torch.float32, name
            assert not torch.equal(a[name], b[name]), f"{name}: bfloat16 matmuls changed nothing"
            scale = a[name].abs().max()
            # bfloat16 keeps 8 significant bits: a few roundings of 2**-8 through the MLP's layers
            assert (a[name] - b[name]).abs().max() <= 0.05 * scale, name


def test_bfloat16_keeps_float32_parameters_and_gradients():
    _, rounded = _manifolds()
    loss = sum(w.pow(2).sum() for w in rounded.generate(0.75).values())
    loss.backward()
    for name, p in rounded.named_parameters():
        assert p.dtype == torch.float32, name
        if p.requires_grad and name.startswith("inr."):
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_a_bfloat16_fit_learns():
    _, rounded = _manifolds()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(3))
    task = nm.ClassificationTask(10)
    config = nm.FitConfig(steps=0, prefit_steps=30, eval_every=100)
    before = reconstruction_errors(rounded)
    nm.fit(rounded, task, TensorLoader(x, y, batch_size=16), None, config, progress=False)
    after = reconstruction_errors(rounded)
    assert sum(after.values()) < 0.9 * sum(before.values())


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        nm.INRConfig(precision="float16")
