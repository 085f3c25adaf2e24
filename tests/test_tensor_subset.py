"""FitConfig.tensor_subset: a random subset of the generated tensors gets gradients each step
(the rest is generated without autograd, the same function); and the pre-fit's reconstruction
report (reconstruction_errors, FitResult.reconstruction, PoorReconstructionWarning)."""
import warnings

import pytest
import torch

import neumeta as nm
from neumeta.checkpoint import load_checkpoint
from neumeta.data import TensorLoader
from neumeta.train import (FitConfig, IdleBlocksHeld, idle_blocks, reconstruction_errors, reconstruction_from_values,
                           task_loss_terms)
from helpers import Crash, CrashingTask


def _manifold(seed=1, **inr):
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    torch.manual_seed(seed)
    return nm.WeightManifold(nm.WidthSpace(base, torch.zeros(2, 1, 28, 28)),
                             nm.INRConfig(**{"hidden": 16, "depth": 3, "frequencies": 2, "grid": False, **inr}))


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)


def _step_grads(manifold, subset, seed=5):
    """The gradients of one joint step's loss (task terms + L_recon from the shared full-width
    generation, as fit computes them), the noise drawn from torch's generator at ``seed``."""
    manifold.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    full = manifold.space.full
    values = manifold.row_values(full, noise=True, detail=False, grad_tensors=subset)
    recon = reconstruction_from_values(values, [t for t in manifold.original_rows()])
    counts = {name: max(1, size // 2 + 1) for name, size in full.items()}
    task, l2 = task_loss_terms(manifold, nm.ClassificationTask(10), _batch(), [counts], FitConfig(),
                               full_params=manifold.params_from_rows(values, full), grad_tensors=subset)
    (task + recon + 1e-4 * l2).backward()
    return {name: p.grad for name, p in manifold.inr.named_parameters()}


@pytest.mark.parametrize("batched", [False, True])
def test_only_the_chosen_blocks_get_gradients_and_exactly_the_full_ones(batched):
    manifold = _manifold()
    manifold.batched = batched
    chosen = {0, 3, 6}
    full = _step_grads(manifold, None)
    part = _step_grads(manifold, chosen)
    assert len(manifold.specs) > max(chosen) + 1
    _assert_only_chosen(part, full, chosen, len(manifold.specs), rtol=1e-5)


def _assert_only_chosen(part, full, chosen, blocks, rtol):
    """The chosen blocks' gradients are the full generation's (and not zero); the others are zero."""
    for name, grad in part.items():
        for block in range(blocks):
            if block in chosen:
                assert grad[block].abs().sum() > 0, (name, block)
                torch.testing.assert_close(grad[block], full[name][block], rtol=rtol, atol=1e-6)
            else:
                assert not grad[block].any(), (name, block)


def test_the_generated_network_is_the_same_function():
    manifold = _manifold()
    counts = {name: max(1, size - 2) for name, size in manifold.space.full.items()}
    torch.manual_seed(7)
    every = manifold.row_values(counts, noise=True)
    torch.manual_seed(7)
    some = manifold.row_values(counts, noise=True, grad_tensors={1, 2})
    for i, (a, b) in enumerate(zip(every, some)):
        assert torch.equal(a, b)
        assert b.requires_grad == (i in {1, 2})


def _fit(manifold, task, checkpoint=None, resume=False, **options):
    x, y = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(1)), \
        torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(2))
    config = FitConfig(**{"steps": 8, "prefit_steps": 2, "eval_every": 3, "eval_widths": (1.0, 0.5),
                          "guard": False, "tensor_subset": 0.5, **options})
    return nm.fit(manifold, task, TensorLoader(x, y, batch_size=8), TensorLoader(x[:16], y[:16], batch_size=16,
                  shuffle=False), config, checkpoint=None if checkpoint is None else str(checkpoint),
                  resume=resume, progress=False)


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
def test_one_joint_step_moves_only_the_drawn_blocks():
    manifold = _manifold()
    before = manifold.inr.w_hidden.detach().clone()
    with pytest.warns(nm.PoorReconstructionWarning):
        _fit(manifold, nm.ClassificationTask(10), steps=1, prefit_steps=0, tensor_subset=0.3)
    moved = [b for b in range(len(manifold.specs)) if not torch.equal(before[b], manifold.inr.w_hidden[b])]
    assert len(moved) == round(0.3 * len(manifold.specs))


@pytest.mark.parametrize("held", [True, False])
def test_adam_leaves_the_idle_blocks_and_their_moments_as_they_were(held):
    """After full steps every block has momentum: a subset step must still move only its blocks
    (the stacked parameters give the others a zero gradient, which plain Adam acts on)."""
    manifold = _manifold()
    optimizer = torch.optim.Adam(manifold.parameters(), lr=1e-2)
    for _ in range(2):
        _step_grads(manifold, None)
        optimizer.step()
    chosen = {0, 3}
    before = {n: p.detach().clone() for n, p in manifold.inr.named_parameters()}
    moments = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in manifold.inr.named_parameters()}
    _step_grads(manifold, chosen)
    idle = idle_blocks(manifold, chosen)
    assert sorted(idle) == [b for b in range(len(manifold.specs)) if b not in chosen]
    with IdleBlocksHeld(manifold, optimizer, idle if held else []):
        optimizer.step()
    for name, p in manifold.inr.named_parameters():
        for block in range(len(manifold.specs)):
            moved = not torch.equal(p[block], before[name][block])
            kept = all(torch.equal(optimizer.state[p][k][block], moments[name][k][block])
                       for k in ("exp_avg", "exp_avg_sq"))
            if block in chosen:
                assert moved and not kept, (name, block)
            elif held:
                assert not moved and kept, (name, block)
            else:  # what held prevents: stale momentum moves a block whose loss was not seen
                assert moved, (name, block)


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning", "ignore::neumeta.PoorReconstructionWarning")
def test_a_subset_fit_checkpoints_and_resumes_exactly(tmp_path):
    unbroken = _manifold()
    unbroken_result = _fit(unbroken, nm.ClassificationTask(10))
    ckpt = tmp_path / "fit.ckpt"
    broken = _manifold()
    with pytest.raises(Crash):  # one loss call per joint step (the teacher's): dies in the 8th step,
        _fit(broken, CrashingTask(crash_at=6), checkpoint=ckpt)  # after the checkpoint of step 6
    assert load_checkpoint(ckpt)["state"]["step"] == 6
    resumed = _manifold()
    resumed_result = _fit(resumed, nm.ClassificationTask(10), checkpoint=ckpt, resume=True)
    for a, b in zip([*unbroken.parameters(), *unbroken_result.manifold.parameters()],
                    [*resumed.parameters(), *resumed_result.manifold.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed_result.history == unbroken_result.history
    assert resumed_result.reconstruction == unbroken_result.reconstruction != {}
    with pytest.raises(ValueError, match="tensor_subset"):  # another subset is another recipe
        _fit(_manifold(), nm.ClassificationTask(10), checkpoint=ckpt, resume=True, tensor_subset=0.25)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_a_meaningless_subset_is_refused(bad):
    with pytest.raises(ValueError, match="tensor_subset"):
        FitConfig(tensor_subset=bad)


# ----------------------------------------------------------------------------- reconstruction report
def test_reconstruction_errors_are_relative_full_width_distances():
    manifold = _manifold()
    errors = reconstruction_errors(manifold)
    with torch.no_grad():
        generated = manifold.generate(1.0)
    reference = manifold.original_parameters()
    assert list(errors) == [s.name for s in manifold.specs]
    for name, error in errors.items():
        expected = float((generated[name] - reference[name]).norm() / reference[name].norm())
        assert error == pytest.approx(expected, rel=1e-5)
    exact = reconstruction_errors(_manifold(residual="cells"))  # a correction that starts at zero
    assert max(exact.values()) < 1e-6


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
def test_fit_reports_the_prefit_and_names_poor_tensors():
    manifold = _manifold()
    with pytest.warns(nm.PoorReconstructionWarning, match=r"after the pre-fit.*conv1\.weight") as caught:
        result = _fit(manifold, nm.ClassificationTask(10), steps=2, tensor_subset=1.0, recon_warn=0.5)
    assert set(result.reconstruction) == {s.name for s in manifold.specs}
    poor = [name for name, e in result.reconstruction.items() if e > 0.5]
    assert poor and all(name in str(caught[0].message) for name in poor)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nm.PoorReconstructionWarning)
        quiet = _fit(_manifold(), nm.ClassificationTask(10), steps=2, recon_warn=1e9)
    assert quiet.reconstruction == pytest.approx(result.reconstruction)  # the same pre-fit, other threshold


def test_the_warning_says_what_a_detail_table_changes():
    from neumeta.train import poor_reconstruction
    assert poor_reconstruction({"a.weight": 0.1}, 0.25) is None
    plain = poor_reconstruction({"a.weight": 0.1, "b.weight": 0.5}, 0.25)
    assert "b.weight 0.50" in plain and "a.weight" not in plain and "does not start from the reference" in plain
    assert "fades out" in poor_reconstruction({"b.weight": 0.5}, 0.25, detail=True)


def test_resnet20_calibrated_subset_gradients_equal_a_full_generations():
    """The every-layer ResNet-20 recipe (gaussian encoding, relative L_recon, the narrower widths
    trained calibrated): the chosen blocks' gradients are the full generation's, the others none."""
    torch.manual_seed(0)
    space = nm.WidthSpace(nm.create_model("resnet20"), torch.zeros(2, 3, 32, 32))
    manifold = nm.WeightManifold(space, nm.INRConfig(hidden=16, depth=3, encoding="gaussian", frequencies=8, grid=False),
                                 nm.CoordConfig(noise=0.0))
    config = FitConfig(train_calibrated=True, recon_reduction="relative")
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    full = space.full
    trained = [{n: s // 2 + 1 for n, s in full.items()}, {n: s // 2 for n, s in full.items()}]

    def grads(subset):
        manifold.zero_grad(set_to_none=True)
        values = manifold.row_values(full, noise=True, detail=False, grad_tensors=subset)
        recon = reconstruction_from_values(values, list(manifold.original_rows()), "relative")
        task, l2 = task_loss_terms(manifold, nm.ClassificationTask(10), batch, trained, config,
                                   full_params=manifold.params_from_rows(values, full), grad_tensors=subset)
        (task + recon + 1e-4 * l2).backward()
        return {name: p.grad.clone() for name, p in manifold.inr.named_parameters()}

    every, chosen = grads(None), {0, 5, 17, 30, 43}
    _assert_only_chosen(grads(chosen), every, chosen, len(manifold.specs), rtol=1e-4)
