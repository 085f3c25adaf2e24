"""fit(): it learns on real data, checkpoints atomically and resumes exactly (EMA and best too)."""
import dataclasses

import pytest
import torch
from torch.func import functional_call

import neumeta as nm
from neumeta.checkpoint import load_checkpoint
from neumeta.data import TensorLoader, load_fashion_mnist
from neumeta.supervised import train_supervised
from neumeta.data.fashion_mnist import fashion_mnist_available
from helpers import Crash, CrashingTask

pytestmark = pytest.mark.skipif(not fashion_mnist_available(), reason="needs Fashion-MNIST (`make test` gets it)")

TINY_INR = nm.INRConfig(hidden=32, depth=3, frequencies=4, grid=False)


@pytest.fixture(scope="module")
def real():
    splits = load_fashion_mnist(download=False)
    x, y = splits.train[0][:8192], splits.train[1][:8192]
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=6, conv2=8, fc1=32, fc2=16)
    task = nm.ClassificationTask(10)
    train_supervised(base, task, TensorLoader(x, y, batch_size=64), epochs=2, lr=2e-3, progress=False)
    return base, x[:1024], y[:1024], task


def _task_loss(manifold, task, x, y, width):
    params = manifold.generate(width)
    with torch.no_grad():
        return float(task.loss(functional_call(manifold.space.model, params, (x,)), (x, y)))


def test_fit_lowers_the_loss_on_a_real_batch(real):
    base, x, y, task = real
    manifold = nm.WeightManifold(nm.WidthSpace(base, x[:2]), nm.INRConfig(hidden=32, depth=3, frequencies=6, grid=False))
    before = {w: _task_loss(manifold, task, x[:256], y[:256], w) for w in (1.0, 0.75)}
    # lr 5e-3: at 1e-2 this tiny INR stayed at chance from one initialisation in four with the
    # default lambda_1 = 1 (none with lambda_1 = 10); at 5e-3 five of five learn
    config = nm.FitConfig(steps=300, prefit_steps=20, lr=5e-3, eval_every=1000, recon_rows=1.0)
    nm.fit(manifold, task, TensorLoader(x[:256], y[:256], batch_size=64), None, config, progress=False)
    after = {w: _task_loss(manifold, task, x[:256], y[:256], w) for w in (1.0, 0.75)}
    for w in before:  # from chance level (2.30) well on the way to the base model's 0.63
        assert after[w] < before[w] - 0.5, (w, before[w], after[w])


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")  # short on purpose
@pytest.mark.parametrize("train_original", [False, True])  # True: the learning teacher resumes too
def test_resume_continues_exactly_where_it_stopped(real, tmp_path, train_original):
    base, x, y, task = real
    loader = TensorLoader(x[:320], y[:320], batch_size=64)  # 5 batches per epoch
    val = TensorLoader(x[512:768], y[512:768], batch_size=256, shuffle=False)
    # guard off: a rollback would be another test (test_recipe.py); 28 steps end at chance, which
    # fit only warns about (NeverLearnedWarning), as any unfinished schedule
    config = nm.FitConfig(steps=24, prefit_steps=4, eval_every=7, eval_widths=(1.0, 0.5), guard=False,
                          train_original=train_original)
    losses_per_step = 2 if train_original else 1  # the learning teacher's own loss, the full width's

    def fresh():
        torch.manual_seed(1)
        return nm.WeightManifold(nm.WidthSpace(base, x[:2]), TINY_INR)

    unbroken = fresh()
    unbroken_result = nm.fit(unbroken, task, loader, val, config, progress=False)

    ckpt = tmp_path / "fit.ckpt"
    broken = fresh()
    with pytest.raises(Crash):  # dies after the checkpoint of step 21, during step 24
        nm.fit(broken, CrashingTask(crash_at=20 * losses_per_step), loader, val, config, checkpoint=str(ckpt),
               progress=False)
    saved_step = load_checkpoint(ckpt)["state"]["step"]
    assert saved_step == 21
    resumed = fresh()
    resumed_result = nm.fit(resumed, task, loader, val, config, checkpoint=str(ckpt), resume=True, progress=False)
    for a, b in zip(unbroken.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(unbroken_result.manifold.parameters(), resumed_result.manifold.parameters()):  # EMA, best
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed_result.history == unbroken_result.history
    assert resumed_result.best_step == unbroken_result.best_step


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")  # short on purpose
def test_resume_refuses_a_checkpoint_written_with_other_options(real, tmp_path):
    base, x, y, task = real
    loader = TensorLoader(x[:128], y[:128], batch_size=64)
    val = TensorLoader(x[512:640], y[512:640], batch_size=128, shuffle=False)
    # 4 steps: chance, which fit warns about
    config = nm.FitConfig(steps=2, prefit_steps=2, eval_every=2, eval_widths=(1.0,), guard=False)
    ckpt = tmp_path / "fit.ckpt"
    torch.manual_seed(1)
    nm.fit(nm.WeightManifold(nm.WidthSpace(base, x[:2]), TINY_INR), task, loader, val, config,
           checkpoint=str(ckpt), progress=False)
    before = ckpt.read_bytes()
    other = dataclasses.replace(config, original_distill=not config.original_distill, recon_weight=3.0)
    with pytest.raises(ValueError, match="original_distill.*recon_weight|recon_weight.*original_distill") as err:
        nm.fit(nm.WeightManifold(nm.WidthSpace(base, x[:2]), TINY_INR), task, loader, val, other,
               checkpoint=str(ckpt), resume=True, progress=False)
    assert str(ckpt) in str(err.value)
    assert ckpt.read_bytes() == before  # nothing lost
    # how a run is watched may change: a finished run resumes (returns at once) with other eval settings
    watched = dataclasses.replace(config, eval_every=1, guard_retries=5)
    result = nm.fit(nm.WeightManifold(nm.WidthSpace(base, x[:2]), TINY_INR), task, loader, val, watched,
                    checkpoint=str(ckpt), resume=True, progress=False)
    assert result.best_step == load_checkpoint(ckpt)["state"]["best_step"]
