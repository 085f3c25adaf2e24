"""Recipe options change training in the way they claim."""
import copy
import pytest
import torch
from torch.func import functional_call

import neumeta as nm
from neumeta.checkpoint import load_checkpoint
from neumeta.config import ConfigError
from neumeta.data import TensorLoader
from neumeta.train import inplace_distillation


def test_inplace_distillation_is_zero_for_the_full_width_without_noise(small_manifold, example):
    task = nm.ClassificationTask(10)
    template = small_manifold.space.model
    full = small_manifold.generate(1.0)
    teacher = functional_call(template, full, (example,))
    student = functional_call(template, small_manifold.generate(1.0), (example,))
    assert inplace_distillation(task, student, teacher).item() == 0.0
    other = teacher + torch.randn_like(teacher)  # any different prediction is penalised
    assert inplace_distillation(task, other, teacher).item() > 0.0


def test_inplace_distillation_trains_and_teacher_gets_no_student_gradient(small_manifold, example):
    task = nm.ClassificationTask(10)
    template = small_manifold.space.model
    teacher = functional_call(template, small_manifold.generate(1.0), (example,))
    student = functional_call(template, small_manifold.generate(0.5), (example,))
    teacher.retain_grad()
    # perturb the (untrained, near-constant) student so the loss is away from its zero minimum
    inplace_distillation(task, student * 3 + torch.randn_like(student), teacher).backward()
    assert teacher.grad is None  # the teacher's outputs are detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in small_manifold.parameters())


def test_fit_with_inplace_distillation_runs(small_manifold):
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    config = nm.FitConfig(steps=4, prefit_steps=1, inplace_distill=True, eval_every=100)
    before = [p.clone() for p in small_manifold.parameters()]
    nm.fit(small_manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=16), None, config,
           progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, small_manifold.parameters()))


# --------------------------------------------------------------------------- recipe options
from neumeta.coords import tensor_coordinates  # noqa: E402
from neumeta.train import DivergenceError, narrowest_widths, reconstruction_loss, task_loss_terms  # noqa: E402


def _loader(n=32, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g),
                        batch_size=batch)


def test_sandwich_rule_trains_the_narrowest_width_every_step(small_manifold, monkeypatch):
    generated = []  # the widths whose networks the task trains (a plain manifold: one network each)
    original = small_manifold.params_from_rows
    monkeypatch.setattr(small_manifold, "params_from_rows", lambda values, counts: generated.append(dict(counts))
                        or original(values, counts))
    joint = 6
    for sandwich in (False, True):
        generated.clear()
        config = nm.FitConfig(steps=joint, prefit_steps=1, sandwich=sandwich, inplace_distill=False, min_width=0.5,
                              eval_every=100)
        nm.fit(small_manifold, nm.ClassificationTask(10), _loader(), None, config, progress=False)
        narrowest = narrowest_widths(small_manifold, config)
        assert narrowest == {g: -(-size // 2) for g, size in small_manifold.space.full.items()}
        hits = sum(c == narrowest for c in generated)
        if sandwich:
            assert hits >= joint and len(generated) == 2 * joint
        else:
            assert hits < joint and len(generated) == joint


def test_sandwich_every_trains_the_narrowest_width_on_every_kth_joint_step(small_manifold, monkeypatch):
    generated = []
    original = small_manifold.params_from_rows
    monkeypatch.setattr(small_manifold, "params_from_rows", lambda values, counts: generated.append(dict(counts))
                        or original(values, counts))
    config = nm.FitConfig(steps=7, prefit_steps=1, sandwich_every=3, inplace_distill=False, min_width=0.5,
                          eval_every=100)
    nm.fit(small_manifold, nm.ClassificationTask(10), _loader(), None, config, progress=False)
    assert len(generated) == 7 + 3  # joint steps 0, 3 and 6 also train the narrowest width
    with pytest.raises(ValueError, match="sandwich_every"):
        nm.FitConfig(sandwich_every=0)


def test_sampled_every_trains_the_sampled_width_on_every_kth_joint_step_only(small_manifold, monkeypatch):
    trained = []  # per joint step: the widths trained beside the full width
    real = nm.train.task_loss_terms
    monkeypatch.setattr(nm.train, "task_loss_terms", lambda manifold, task, batch, counts_list, *a, **k:
                        trained.append(len(counts_list)) or real(manifold, task, batch, counts_list, *a, **k))
    config = nm.FitConfig(steps=7, prefit_steps=1, sampled_every=3, sandwich_every=2, original_distill=False,
                          eval_every=100)
    nm.fit(small_manifold, nm.ClassificationTask(10), _loader(), None, config, progress=False)
    assert trained == [(step % 3 == 0) + (step % 2 == 0) for step in range(7)]  # step 1: the full width alone
    with pytest.raises(ValueError, match="sampled_every"):
        nm.FitConfig(sampled_every=0)
    with pytest.raises(ValueError, match="inplace_distill"):
        nm.FitConfig(sampled_every=2, inplace_distill=False)
    with pytest.raises(ValueError, match="no network"):
        nm.FitConfig(sampled_every=2, full_every=2)


def test_sampled_widths_trains_that_many_random_widths_each_joint_step(small_manifold, monkeypatch):
    trained = []  # per joint step: the widths trained beside the full width
    real = nm.train.task_loss_terms
    monkeypatch.setattr(nm.train, "task_loss_terms", lambda manifold, task, batch, counts_list, *a, **k:
                        trained.append([dict(c) for c in counts_list]) or real(manifold, task, batch, counts_list,
                                                                                *a, **k))
    config = nm.FitConfig(steps=4, prefit_steps=1, sampled_widths=3, original_distill=False, eval_every=100)
    nm.fit(small_manifold, nm.ClassificationTask(10), _loader(), None, config, progress=False)
    assert [len(step) for step in trained] == [3 + 1] * 4  # three random widths and the sandwich's narrowest
    assert any(step[0] != step[1] or step[1] != step[2] for step in trained)  # drawn apart, not one copied
    with pytest.raises(ValueError, match="sampled_widths"):
        nm.FitConfig(sampled_widths=0)


def test_narrow_batch_runs_each_narrower_width_on_its_own_slice_of_the_batch(small_manifold):
    inputs = []  # per forward of the template: the images it ran on
    hook = small_manifold.space.model.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    config = nm.FitConfig(steps=1, prefit_steps=1, narrow_batch=0.25, original_distill=False, eval_every=100)
    nm.fit(small_manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=16), None, config,
           progress=False)
    hook.remove()
    teacher, sampled, narrowest = inputs  # the joint step: full width, sampled width, narrowest width
    assert teacher.shape[0] == 16
    assert torch.equal(sampled, teacher[:4]) and torch.equal(narrowest, teacher[4:8])
    assert nm.FitConfig().narrow_batch == 1.0
    with pytest.raises(ValueError, match="narrow_batch"):
        nm.FitConfig(narrow_batch=0)


def test_batch_rows_takes_the_indexth_slice_and_wraps_to_the_start():
    from neumeta.train import batch_rows
    batch = (torch.arange(10), {"logits": torch.arange(10) * 2}, None)
    first, second, third = (batch_rows(batch, i, 4) for i in range(3))
    assert first[0].tolist() == [0, 1, 2, 3] and second[1]["logits"].tolist() == [8, 10, 12, 14]
    assert third[0].tolist() == [0, 1, 2, 3] and third[2] is None  # rows 8-11 run past 10: the first 4
    assert batch_rows(batch, 1, 10)[0] is batch[0]  # a count covering the batch: all of it


def test_full_every_trains_the_full_width_on_every_kth_joint_step_only(small_manifold, monkeypatch):
    task = nm.ClassificationTask(10)
    labelled = []
    original = task.loss
    monkeypatch.setattr(task, "loss", lambda outputs, batch: labelled.append(outputs.requires_grad)
                        or original(outputs, batch))
    graphs = []  # per forward of the template (teacher, then sampled width, each step): builds a graph?
    hook = small_manifold.space.model.register_forward_hook(lambda _m, _a, out: graphs.append(out.requires_grad))
    config = nm.FitConfig(steps=7, prefit_steps=1, full_every=3, sandwich=False, original_distill=False,
                          eval_every=100)
    nm.fit(small_manifold, task, _loader(), None, config, progress=False)
    hook.remove()
    assert labelled == [True] * 3  # joint steps 0, 3 and 6: the only label losses, all with a graph
    trained = [step % 3 == 0 for step in range(7)]
    assert graphs == [flag for full in trained for flag in (full, True)]  # off steps: a forward-only teacher
    with pytest.raises(ValueError, match="full_every"):
        nm.FitConfig(full_every=0)
    with pytest.raises(ValueError, match="inplace_distill"):
        nm.FitConfig(full_every=2, inplace_distill=False)


def test_a_forward_only_teacher_drops_exactly_the_full_widths_label_gradient(small_manifold, example):
    """full_every's off steps: the INR's gradient is the whole step's less the full width's label
    term, i.e. the teacher's forward adds nothing else to the graph."""
    task = nm.ClassificationTask(10)
    batch = (example, torch.tensor([1, 2]))
    counts = small_manifold.space.resolve(0.5)
    config = nm.FitConfig(original_distill=False)

    def gradients(loss_of):
        small_manifold.zero_grad()
        torch.manual_seed(0)  # the same coordinate noise for the full width's rows each time
        loss_of().backward()
        return [p.grad.clone() for p in small_manifold.parameters()]

    def label_term():
        full = small_manifold.space.full
        params = small_manifold.params_from_rows(small_manifold.row_values(full, noise=True), full)
        return task.loss(functional_call(small_manifold.space.model, params, (example,)), batch)

    whole = gradients(lambda: nm.train.task_loss_terms(small_manifold, task, batch, [counts], config)[0])
    label = gradients(label_term)
    teacher_only = gradients(lambda: nm.train.task_loss_terms(small_manifold, task, batch, [counts], config,
                                                               train_full=False)[0])
    assert any(g.abs().max() > 1e-4 for g in label)
    for w, l, t in zip(whole, label, teacher_only):
        torch.testing.assert_close(t, w - l, rtol=1e-4, atol=1e-6)


def test_original_distillation_adds_the_reference_networks_kl(small_manifold, example):
    task = nm.ClassificationTask(10)
    batch = (example, torch.tensor([1, 2]))
    counts = small_manifold.space.resolve(0.5)
    config = nm.FitConfig(original_distill=True, inplace_distill=False)
    reference = small_manifold.space.model(example)
    torch.manual_seed(3)
    plain, _ = task_loss_terms(small_manifold, task, batch, [counts], config, None)
    torch.manual_seed(3)
    with_teacher, _ = task_loss_terms(small_manifold, task, batch, [counts], config, reference)
    torch.manual_seed(3)
    student = torch.func.functional_call(small_manifold.space.model, small_manifold.generate(counts, noise=True),
                                         (example,))
    extra = task.distill(student, reference)
    assert extra.item() > 0
    torch.testing.assert_close(with_teacher - plain, extra)
    torch.manual_seed(3)  # original_fade's weight scales that term alone
    halved, _ = task_loss_terms(small_manifold, task, batch, [counts], config, reference, original_weight=0.5)
    torch.testing.assert_close(halved - plain, 0.5 * extra)


def test_original_fade_falls_linearly_to_zero_over_its_fraction():
    config = nm.FitConfig(prefit_steps=10, steps=100, original_fade=0.5)
    weight = [nm.train.original_weight(step, config) for step in range(0, 120)]
    assert weight[:10] == [1.0] * 10  # the pre-fit has no task terms; the weight is left whole
    assert weight[10] == pytest.approx(1 - 1 / 50) and weight[34] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(weight[10:59], weight[11:60]))
    assert weight[59] == 0.0 and all(w == 0.0 for w in weight[59:])
    assert nm.train.original_weight(50, nm.FitConfig(prefit_steps=10, steps=100)) == 1.0  # no fade
    with pytest.raises(ValueError, match="original_fade"):
        nm.FitConfig(original_fade=1.5)
    with pytest.raises(ValueError, match="needs original_distill"):
        nm.FitConfig(original_fade=0.5, original_distill=False)


def test_a_faded_out_reference_runs_no_forward_pass(small_manifold, monkeypatch):
    """After the fade the reference network is not run: its outputs would teach nothing."""
    model = small_manifold.space.model
    state = copy.deepcopy(small_manifold.state_dict())

    def forward_calls(fade):
        small_manifold.load_state_dict(state)
        calls = []
        monkeypatch.setattr(model, "forward", lambda x, _f=type(model).forward: calls.append(1) or _f(model, x))
        config = nm.FitConfig(steps=4, prefit_steps=1, original_fade=fade, eval_every=100)
        nm.fit(small_manifold, nm.ClassificationTask(10), _loader(), None, config, progress=False)
        return len(calls)

    # joint steps 1-3 are past the fade (weight 1 - 2/2 = 0 from the second of the 4 joint steps on)
    assert forward_calls(0.0) - forward_calls(0.5) == 3


def test_fit_with_original_distillation_and_sandwich_runs(small_manifold):
    config = nm.FitConfig(steps=3, prefit_steps=1, original_distill=True, sandwich=True, inplace_distill=True,
                          eval_every=100)
    before = [p.clone() for p in small_manifold.parameters()]
    nm.fit(small_manifold, nm.ClassificationTask(10), _loader(), None, config, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, small_manifold.parameters()))


def test_reconstruction_sum_is_the_mean_times_the_elements(small_manifold):
    targets = small_manifold.original_rows()
    torch.manual_seed(0)
    mean = reconstruction_loss(small_manifold, targets, 1.0, noise=False, reduction="mean")
    summed = reconstruction_loss(small_manifold, targets, 1.0, noise=False, reduction="sum")
    values = small_manifold.row_values(small_manifold.space.full, noise=False)
    by_hand_mean, by_hand_sum = 0.0, 0.0
    for v, t in zip(values, targets):
        err = (v - t) ** 2 * (1 + t ** 2 / (t ** 2).mean())
        by_hand_mean, by_hand_sum = by_hand_mean + err.mean(), by_hand_sum + err.sum()
    torch.testing.assert_close(mean, by_hand_mean)
    torch.testing.assert_close(summed, by_hand_sum)
    assert summed > 10 * mean


def test_paper_preset_uses_the_papers_coordinates_exactly(lenet, example):
    fit_config, coords = nm.recipe("paper")
    assert (fit_config.recon_weight, fit_config.recon_reduction, fit_config.l2_weight) == (1.0, "sum", 1e-4)
    assert not (fit_config.inplace_distill or fit_config.sandwich or fit_config.original_distill)
    space = nm.WidthSpace(lenet, example)
    counts = space.resolve(0.5)
    layer = space.layers[1]  # conv2: C_in = conv1's channels, C_out = conv2's
    c_in, c_out = space.layer_channels(layer, counts)
    rows, _ = tensor_coordinates(space, layer, counts, bias=False, config=coords)
    L, N = len(space.layers), space.max_channels
    expected = torch.tensor([[1 / L, i / c_in, o / c_out, L / N, c_in / N, c_out / N]
                             for o in range(c_out) for i in range(c_in)])
    torch.testing.assert_close(rows, expected)
    default_rows, _ = tensor_coordinates(space, layer, counts, bias=False, config=nm.recipe("default")[1])
    assert default_rows.shape[1] == 3  # the default drops the size terms and uses cell centres
    torch.testing.assert_close(default_rows[:, 1], (expected[:, 1] * c_in + 0.5) / c_in)


def test_cli_recipe_sits_under_yaml_and_flags(tmp_path):
    import argparse
    from neumeta.cli import FitCommandConfig
    from neumeta.config import load_config
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("recipe: paper\nfit: {recon_weight: 3.0}\n")
    args = argparse.Namespace(config=str(yaml_file), **{"fit.warmup": 0.2})
    config = load_config(FitCommandConfig, args)
    assert config.coords.size_terms and config.coords.positions == "index"  # from the recipe
    assert config.fit.recon_weight == 3.0 and config.fit.warmup == 0.2  # YAML and flag win
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config(FitCommandConfig, argparse.Namespace(config=None, recipe="nope"))


# --------------------------------------------------------------------------- divergence guard
class _ScriptedTask(nm.ClassificationTask):
    """Injects failures: a NaN loss at given training calls, and scripted validation accuracies."""

    def __init__(self, nan_calls=(), scores=None):
        super().__init__(10)
        self.nan_calls, self.scores, self.calls, self.evals = set(nan_calls), list(scores or []), 0, 0

    def loss(self, outputs, batch):
        self.calls += 1
        value = super().loss(outputs, batch)
        return value * float("nan") if self.calls in self.nan_calls else value

    def evaluate(self, model, batches, device="cpu"):
        real = super().evaluate(model, batches, device)
        if self.evals < len(self.scores):
            real["accuracy"] = self.scores[self.evals]
        self.evals += 1
        return real


def _fit(manifold, task, tmp_path, steps=12, **kw):
    config = nm.FitConfig(steps=steps, prefit_steps=2, eval_every=4, eval_widths=(1.0, 0.5), **kw)
    ckpt = tmp_path / "fit.ckpt"
    return nm.fit(manifold, task, _loader(), _loader(16, 16, seed=1), config, checkpoint=str(ckpt),
                  progress=False), ckpt


def test_guard_rolls_back_on_a_nan_and_finishes(small_manifold, tmp_path):
    # loss call 5 = step 6; validation scripted above chance (a few real steps end at chance)
    result, ckpt = _fit(small_manifold, _ScriptedTask(nan_calls={5}, scores=[0.8, 0.7] * 10), tmp_path)
    assert len(result.rollbacks) == 1 and "non-finite" in result.rollbacks[0]["why"]
    assert result.rollbacks[0]["to_step"] == 4  # the last validated state
    saved = load_checkpoint(ckpt)
    assert saved["state"]["step"] == 14  # finished
    assert saved["scheduler"]["base_lrs"][0] == pytest.approx(0.5e-3)  # lower learning rate after the rollback
    assert all(torch.isfinite(p).all() for p in result.manifold.parameters())
    assert result.learned and result.warnings == []


def test_guard_rolls_back_on_a_collapse_and_never_keeps_it(small_manifold, tmp_path):
    # evaluations (2 widths each) at steps 4, 8, 12, 14: width 1.0 falls to chance at step 8 once
    scores = [0.8, 0.7, 0.1, 0.7, 0.81, 0.71, 0.82, 0.72, 0.83, 0.73]
    result, ckpt = _fit(small_manifold, _ScriptedTask(scores=scores), tmp_path)
    assert len(result.rollbacks) == 1 and "width 1" in result.rollbacks[0]["why"]
    assert result.rollbacks[0]["step"] == 8 and result.rollbacks[0]["to_step"] == 4
    assert all(row["val_accuracy@1"] > 0.5 for row in result.history)  # the collapsed evaluation is not kept


def test_guard_gives_up_and_leaves_the_last_good_checkpoint(small_manifold, tmp_path):
    scores = [0.8, 0.7] + [0.1, 0.7] * 10  # collapses at every evaluation after the first
    with pytest.raises(DivergenceError, match=r"step 8.*width 1.*3 rollbacks.*--no-guard") as error:
        _, ckpt = _fit(small_manifold, _ScriptedTask(scores=scores), tmp_path, guard_retries=3)
    assert len(error.value.rollbacks) == 3 and all("width 1" in r["why"] for r in error.value.rollbacks)
    saved = load_checkpoint(tmp_path / "fit.ckpt")
    assert saved["state"]["step"] == 4 and saved["state"]["best_step"] == 4
    assert [row["step"] for row in saved["state"]["history"]] == [4]


@pytest.mark.parametrize("guard", [True, False])
def test_a_fit_that_never_left_chance_is_returned_with_a_warning(small_manifold, tmp_path, guard):
    """Too short a schedule is no divergence: the result comes back, marked and explained."""
    scores = [0.1, 0.7] * 10  # width 1.0 at chance from the first evaluation on: it never *fell*
    with pytest.warns(nm.NeverLearnedWarning, match=r"never left chance.*step 4,.* 0\.1000 at width 1 \(chance "
                                                    r"0\.1000\).*--steps and --prefit-steps.*1000 pre-fit \+ 3000"):
        result, ckpt = _fit(small_manifold, _ScriptedTask(scores=scores), tmp_path, guard=guard)
    assert not result.learned and len(result.warnings) == 1 and "width 0.5" not in result.warnings[0]
    assert result.rollbacks == [] and result.best_step == 4  # nothing fell, so nothing was rolled back
    assert load_checkpoint(ckpt)["state"]["step"] == 14  # finished


def test_without_the_guard_a_nan_stops_at_once(small_manifold, tmp_path):
    with pytest.raises(DivergenceError, match="step 6.*guard is off"):
        _fit(small_manifold, _ScriptedTask(nan_calls={5}), tmp_path, guard=False)


def test_select_widths_pick_the_checkpoint_by_their_own_mean(small_manifold, tmp_path):
    # evaluations at steps 4, 8, 12, 14 of widths (1.0, 0.5): the mean is best at step 4,
    # width 0.5 alone at step 8
    scores = [0.95, 0.60, 0.80, 0.70, 0.90, 0.62, 0.91, 0.61]
    (tmp_path / "mean").mkdir()
    (tmp_path / "half").mkdir()
    by_mean, _ = _fit(copy.deepcopy(small_manifold), _ScriptedTask(scores=scores), tmp_path / "mean")
    by_half, _ = _fit(small_manifold, _ScriptedTask(scores=scores), tmp_path / "half", select_widths=(0.5,))
    assert by_mean.best_step == 4 and by_half.best_step == 8
    assert by_half.best_score == pytest.approx(0.70)


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")  # short on purpose
def test_a_selection_width_outside_the_eval_widths_is_validated_too(small_manifold, tmp_path):
    result, _ = _fit(small_manifold, nm.ClassificationTask(10), tmp_path, select_widths=(0.25,), guard=False)
    assert all(set(row) == {"step", "val_accuracy@1", "val_accuracy@0.5", "val_accuracy@0.25"}
               for row in result.history)
    best = next(row for row in result.history if row["step"] == result.best_step)
    assert result.best_score == pytest.approx(best["val_accuracy@0.25"])
    assert result.best_score == max(row["val_accuracy@0.25"] for row in result.history)


def test_guard_ignores_a_width_outside_the_trained_range(small_manifold, tmp_path):
    # evaluations of widths (1.0, 0.5, and 0.25 watched for selection) at steps 4, 8, 12, 14: the
    # unseen 0.25 dips to chance at step 8 and ends there, which is no collapse of the trained manifold
    scores = [0.8, 0.7, 0.16, 0.81, 0.71, 0.11, 0.82, 0.72, 0.15, 0.83, 0.73, 0.14]
    result, _ = _fit(small_manifold, _ScriptedTask(scores=scores), tmp_path, select_widths=(1.0, 0.5, 0.25))
    assert result.rollbacks == [] and result.best_step == 14
    assert result.learned  # chance at an unseen width is not "never learned" either


def test_original_outputs_teach_the_sampled_widths_only_with_original_distill(small_manifold, example):
    task = nm.ClassificationTask(10)
    batch = (example, torch.tensor([1, 2]))
    counts = small_manifold.space.resolve(0.5)
    reference = small_manifold.space.model(example) * 1.5
    config = nm.FitConfig(inplace_distill=False, original_distill=False)
    torch.manual_seed(3)
    without, _ = task_loss_terms(small_manifold, task, batch, [counts], config, None)
    torch.manual_seed(3)
    given, _ = task_loss_terms(small_manifold, task, batch, [counts], config, reference)
    torch.testing.assert_close(given, without)
