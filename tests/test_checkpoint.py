"""Checkpoints: pickle-free files that give back exactly the tree saved; fit's resume rules."""
import dataclasses
import math
import pathlib
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import neumeta as nm
from neumeta.checkpoint import load_checkpoint, save_checkpoint
from neumeta.data import TensorLoader

# ----------------------------------------------------------------------------- round trip
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.uint8, torch.bool]
SHAPES = [(), (0,), (3,), (2, 3), (1, 0, 2)]


def _tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype is torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-2 ** 30, 2 ** 30, shape, generator=g, dtype=dtype)


tensors = st.builds(_tensor, st.sampled_from(DTYPES), st.sampled_from(SHAPES), st.integers(0, 2 ** 16))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
keys = st.one_of(st.text(max_size=6), st.sampled_from(["$tensor", "$tuple", "$dict", "$float", "$x"]),
                 st.integers(-5, 5), st.floats(allow_nan=False), st.booleans(), st.none(),
                 st.tuples(st.integers(0, 3), st.text(max_size=3)))
trees = st.recursive(
    st.one_of(scalars, tensors),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.lists(inner, max_size=4).map(tuple),
                            st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20)


def assert_same(a, b, where="/"):
    """Equal, and of exactly the same types all the way down (tuple is no list, 1 is no 1.0)."""
    assert type(a) is type(b), (where, a, b)
    if isinstance(a, torch.Tensor):
        assert b.device.type == "cpu" and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), where
    elif isinstance(a, dict):
        assert [type(k) for k in a] == [type(k) for k in b] and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}{k!r}/")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}{i}/")
    else:
        assert a == b, where


@settings(max_examples=150, deadline=None)
@given(tree=st.dictionaries(keys, trees, max_size=5))
def test_any_tree_round_trips_with_its_exact_types(tree, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "t.ckpt"
    save_checkpoint(path, tree)
    assert_same(tree, load_checkpoint(path))


def test_a_training_state_round_trips_and_loads_back_into_torch(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    shared = torch.arange(6.0)
    tree = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": random.Random(3).getstate(), "torch_rng": {"cpu": torch.get_rng_state()},
            "state": {"best_score": -math.inf, "best": None, "last_scores": {0.5: 0.81, 1.0: 0.9},
                      "history": [{"step": 7, "val_accuracy@1": 0.5}]},
            "views": [shared[:3], shared[3:], shared],  # tensors sharing memory
            "config": dataclasses.asdict(nm.FitConfig())}
    path = save_checkpoint(tmp_path / "state.ckpt", tree)
    loaded = load_checkpoint(path)
    assert_same(tree, loaded)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    random.Random().setstate(loaded["rng"])
    torch.set_rng_state(loaded["torch_rng"]["cpu"])


def test_what_is_not_data_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="object.*a/b"):
        save_checkpoint(tmp_path / "x.ckpt", {"a": {"b": object()}})
    with pytest.raises(TypeError, match="function"):
        save_checkpoint(tmp_path / "x.ckpt", {"lr_lambdas": [lambda step: 1.0]})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad files
class _CreatesMarker:
    """A pickle that, once unpickled, creates a file: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _tiny_fit(manifold, checkpoint, steps=4, **kwargs):
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    config = kwargs.pop("config", None) or nm.FitConfig(steps=steps, prefit_steps=2, eval_every=2,
                                                        eval_widths=(1.0,), guard=False)
    val = TensorLoader(x[:16], y[:16], batch_size=16, shuffle=False)
    return nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), val, config,
                  checkpoint=None if checkpoint is None else str(checkpoint), progress=False, **kwargs)


def _manifold(base_seed=0, inr_seed=1, hidden=16, **inr):
    torch.manual_seed(base_seed)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    torch.manual_seed(inr_seed)
    return nm.WeightManifold(nm.WidthSpace(base, torch.zeros(2, 1, 28, 28)),
                             nm.INRConfig(hidden=hidden, depth=2, frequencies=2, **inr))


def test_a_crafted_pickle_is_refused_and_never_run(tmp_path):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state": _CreatesMarker(marker)}, path)
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="evil.ckpt"):
        _tiny_fit(_manifold(), path, resume=True)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what fit used to do: the file really is a trap
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_checkpoint_is_named(tmp_path, damage):
    path = save_checkpoint(tmp_path / "run.ckpt", {"w": torch.randn(64, 64), "step": 3})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 100, "empty": b""}[damage])
    with pytest.raises(ValueError, match="run.ckpt"):
        load_checkpoint(path)


def test_a_manifold_file_is_no_checkpoint(small_manifold, tmp_path):
    path = small_manifold.save(tmp_path / "m.neumeta")
    with pytest.raises(ValueError, match=r"m\.neumeta.*neumeta-checkpoint/1"):
        load_checkpoint(path)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_checkpoint(tmp_path / "nothing.ckpt")


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")  # short on purpose
def test_fit_checkpoints_load_on_the_cpu_with_the_whole_state(tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    _tiny_fit(_manifold(), ckpt)
    saved = load_checkpoint(ckpt)
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            [walk(v) for v in value.values()]
        elif isinstance(value, (list, tuple)):
            [walk(v) for v in value]
    walk(saved)
    assert found and all(t.device.type == "cpu" for t in found)
    assert saved["torch_rng"]["cpu"].dtype == torch.uint8
    assert isinstance(saved["rng"], tuple) and saved["state"]["step"] == 6
    assert set(saved) >= {"inr", "ema", "optimizer", "scheduler", "state", "config", "fingerprint"}


# ----------------------------------------------------------------------------- resume rules
class _CountingTask(nm.ClassificationTask):
    def __init__(self):
        super().__init__(10)
        self.calls = 0

    def loss(self, outputs, batch):
        self.calls += 1
        return super().loss(outputs, batch)


def _fit_with(task, manifold, checkpoint, **kwargs):
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    config = nm.FitConfig(steps=2, prefit_steps=2, eval_every=2, eval_widths=(1.0,), guard=False)
    return nm.fit(manifold, task, TensorLoader(x, y, batch_size=8), None, config,
                  checkpoint=None if checkpoint is None else str(checkpoint), progress=False, **kwargs)


def test_resume_true_needs_the_checkpoint_before_any_training(tmp_path):
    task, ckpt = _CountingTask(), tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        _fit_with(task, _manifold(), ckpt, resume=True)
    assert task.calls == 0 and not ckpt.exists()


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
def test_a_fresh_fit_never_replaces_a_checkpoint_unasked(tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    _fit_with(nm.ClassificationTask(10), _manifold(), ckpt)
    before = ckpt.read_bytes()
    task = _CountingTask()
    with pytest.raises(FileExistsError, match=r"fit\.ckpt.*resume=True.*overwrite=True"):
        _fit_with(task, _manifold(), ckpt)
    assert task.calls == 0 and ckpt.read_bytes() == before
    _fit_with(task, _manifold(inr_seed=5), ckpt, overwrite=True)  # another start: another file
    assert task.calls > 0 and ckpt.read_bytes() != before


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
def test_resume_auto_starts_afresh_or_continues(tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    first = _fit_with(nm.ClassificationTask(10), _manifold(), ckpt, resume="auto")  # nothing there yet
    assert load_checkpoint(ckpt)["state"]["step"] == 4
    task = _CountingTask()
    again = _fit_with(task, _manifold(inr_seed=9), ckpt, resume="auto")  # finished: returns it at once
    assert task.calls == 0
    for a, b in zip(first.manifold.parameters(), again.manifold.parameters()):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
def test_a_resumed_fit_reports_the_time_of_every_process(tmp_path):
    ckpt = tmp_path / "fit.ckpt"
    first = _fit_with(nm.ClassificationTask(10), _manifold(), ckpt)
    saved = load_checkpoint(ckpt)
    before = saved["state"]["seconds"]
    assert 0 < before <= first.seconds
    saved["state"]["seconds"] += 1000.0  # as if the earlier process had run for a long time
    save_checkpoint(ckpt, saved)
    again = _fit_with(_CountingTask(), _manifold(), ckpt, resume="auto")  # finished: nothing more to train
    assert 1000.0 + before < again.seconds < 1000.0 + before + 60


@pytest.mark.parametrize("kwargs, match", [
    ({"checkpoint": None, "resume": True}, "needs checkpoint"),
    ({"checkpoint": None, "resume": "auto"}, "needs checkpoint"),
    ({"resume": "yes"}, "True, False or 'auto'"),
    ({"resume": None}, "True, False or 'auto'"),
    ({"resume": True, "overwrite": True}, "pass one of them"),
])
def test_meaningless_resume_arguments_are_refused(tmp_path, kwargs, match):
    kwargs = {"checkpoint": tmp_path / "fit.ckpt", **kwargs}
    task = _CountingTask()
    with pytest.raises(ValueError, match=match):
        _fit_with(task, _manifold(), kwargs.pop("checkpoint"), **kwargs)
    assert task.calls == 0


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
@pytest.mark.parametrize("first, other, why", [
    ({}, {"base_seed": 3}, "base model's weights differ"),
    ({}, {"hidden": 8}, "INR has parameters"),
    # same parameter shapes, another function of them: the options say it
    ({"encoding": "gaussian"}, {"encoding": "gaussian", "encoding_scale": 0.3},
     "INRConfig.encoding_scale: 0.15 in the checkpoint, 0.3 now"),
])
def test_resume_refuses_another_base_model_or_inr(tmp_path, first, other, why):
    ckpt = tmp_path / "fit.ckpt"
    _fit_with(nm.ClassificationTask(10), _manifold(**first), ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=f"fit.ckpt was made from another base model / manifold.*{why}"):
        _fit_with(nm.ClassificationTask(10), _manifold(**other), ckpt, resume=True)
    assert ckpt.read_bytes() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
def test_a_fit_on_the_gpu_resumes_on_the_gpu(tmp_path):
    """Tensors load on the CPU; the generators get CPU ByteTensors back (CUDA's included)."""
    ckpt = tmp_path / "fit.ckpt"
    first = _tiny_fit(_manifold().cuda(), ckpt)
    saved = load_checkpoint(ckpt)
    assert saved["torch_rng"]["cuda"] and all(s.device.type == "cpu" for s in saved["torch_rng"]["cuda"])
    again = _tiny_fit(_manifold().cuda(), ckpt, resume=True)  # finished: restores it and returns
    for a, b in zip(first.manifold.parameters(), again.manifold.parameters()):
        assert a.device.type == "cuda" and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
def test_a_finished_prefit_resumes_under_other_joint_options_and_nothing_else(tmp_path):
    """One pre-fit serves several joint recipes: resumed from the checkpoint written when the
    pre-fit ended, with the joint phase's options changed, the fit is the one a fresh fit with
    those options gives. A pre-fit option, or a joint option once joint steps were taken, is refused."""
    torch.manual_seed(3)
    loader = TensorLoader(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)), batch_size=8)
    base = dict(prefit_steps=2, eval_every=2, eval_widths=(1.0,), guard=False, seed=0)
    joint = dict(steps=4, sandwich=False, joint_lr=3e-4, noise_ramp=0.5)

    def fit(ckpt, **options):
        return nm.fit(_manifold(), nm.ClassificationTask(10), loader, None, nm.FitConfig(**base, **options),
                      checkpoint=str(ckpt), resume="auto", progress=False)

    fresh = fit(tmp_path / "fresh.ckpt", **joint)
    prefit = tmp_path / "prefit.ckpt"
    fit(prefit, steps=0)  # the pre-fit alone, with the default joint options
    assert load_checkpoint(prefit)["state"]["step"] == 2
    for bad in ({"lr": 2e-3}, {"recon_rows": 0.5}):  # options the pre-fit read
        with pytest.raises(ValueError, match=f"cannot resume.*{next(iter(bad))}"):
            fit(prefit, **joint, **bad)
    resumed = fit(prefit, **joint)
    for a, b in zip(fresh.manifold.parameters(), resumed.manifold.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cannot resume.*sandwich"):  # joint steps taken: the recipe is fixed
        fit(prefit, **{**joint, "steps": 6, "sandwich": True})
