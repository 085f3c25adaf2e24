"""The batched INR forward (blocks of similar row counts share one padded bmm) is the per-block
loop's function: same outputs, same gradients, however unequal the blocks' row counts."""
import math

import pytest
import torch

import neumeta as nm
from neumeta.inr import BlockMLP, row_buckets

ROWS = [1, 3, 40, 7, 700, 52, 2, 300]  # very different sizes, in no order


def _outputs_and_grads(block, inputs, ids, batched):
    block.zero_grad(set_to_none=True)
    outputs = block(inputs, ids, batched=batched)
    torch.manual_seed(3)  # the same loss weights for every path
    loss = sum((o * torch.randn_like(o)).sum() for o in outputs)
    loss.backward()
    return [o.detach() for o in outputs], [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("ratio", [1.5, 4.0, math.inf])
def test_batched_forward_and_backward_equal_the_loop(ratio):
    torch.manual_seed(0)
    config = nm.INRConfig(hidden=16, depth=4, frequencies=2, grid=False)
    block = BlockMLP(len(ROWS) + 2, 5, 9, config, bucket_ratio=ratio)  # two blocks unused
    inputs = [torch.randn(r, 5) for r in ROWS]
    ids = [4, 0, 7, 9, 1, 2, 3, 8]
    loop_out, loop_grads = _outputs_and_grads(block, inputs, ids, batched=False)
    out, grads = _outputs_and_grads(block, inputs, ids, batched=True)
    for a, b, r in zip(loop_out, out, ROWS):
        assert a.shape == b.shape == (r, 9)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(loop_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for unused in (5, 6):  # an unused block gets exactly no gradient in either path
        assert not grads[0][unused].any()


def test_buckets_bound_the_padding_and_keep_every_block_once():
    rows = [10, 16, 4096, 32, 48, 8192, 640, 512, 1]
    for ratio in (1.25, 1.5, 2.0):
        buckets = row_buckets(rows, ratio)
        assert sorted(i for b in buckets for i in b) == list(range(len(rows)))
        for b in buckets:
            assert max(rows[i] for i in b) <= ratio * min(rows[i] for i in b)
    assert row_buckets(rows, math.inf) == [sorted(range(len(rows)), key=lambda i: -rows[i])]
    with pytest.raises(ValueError, match="bucket_ratio"):
        BlockMLP(2, 3, 4, nm.INRConfig(hidden=4, depth=2), bucket_ratio=0.5)


def test_a_batched_manifold_generates_what_the_loop_does():
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    manifold = nm.WeightManifold(nm.WidthSpace(base, torch.zeros(2, 1, 28, 28)),
                                 nm.INRConfig(hidden=16, depth=3, frequencies=2, grid=False), batched=False)
    counts = {name: max(1, size - 1) for name, size in manifold.space.full.items()}
    results = []
    for batched in (False, True):
        manifold.batched = batched
        manifold.zero_grad(set_to_none=True)
        values = manifold.row_values(counts, noise=True, generator=torch.Generator().manual_seed(1))
        sum(v.pow(2).sum() for v in values).backward()
        results.append(([v.detach() for v in values], [p.grad.clone() for p in manifold.parameters()]))
    (loop_v, loop_g), (batch_v, batch_g) = results
    for a, b in zip(loop_v + loop_g, batch_v + batch_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", ["none", "cells"])
def test_the_k_draws_through_the_inr_together_average_what_one_by_one_does(residual):
    """Sampling stacks the K noisy draws into one INR call per chunk: the same noise, drawn in
    the same order, so the same mean as K separate calls of row_values (to float rounding)."""
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    manifold = nm.WeightManifold(nm.WidthSpace(base, torch.zeros(2, 1, 28, 28)),
                                 nm.INRConfig(hidden=16, depth=3, frequencies=2, residual=residual))
    counts = {name: max(1, size - 1) for name, size in manifold.space.full.items()}
    generator = torch.Generator().manual_seed(7)
    draws = [manifold.row_values(counts, noise=True, generator=generator) for _ in range(5)]
    by_hand = [sum(d[i] for d in draws) / 5 for i in range(len(draws[0]))]
    largest = max(c.shape[0] for c, _ in manifold._coordinates(counts))
    for batch_rows in (0, 2 * largest, 1 << 20):  # one by one, two draws per call (and a last single one), all
        mean = manifold.mean_row_values(counts, samples=5, seed=7, batch_rows=batch_rows)
        for a, b in zip(by_hand, mean):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
