"""Recipe options change training in the way they claim."""
import torch
from torch.func import functional_call

import neumeta as nm
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
