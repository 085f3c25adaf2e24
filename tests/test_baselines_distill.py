"""baselines.distill: a narrow registry network trained from scratch on a teacher's soft labels."""
import pytest
import torch

import neumeta as nm
from neumeta.baselines.distill import DistillationTask, train_distilled
from neumeta.data import TensorLoader
from neumeta.experiment import Data

COUNTS = {"conv1": 4, "conv2": 6, "fc1": 16, "fc2": 12}


def teacher_and_data(train=256, held_out=256):
    """A fixed random LeNet, and random inputs labelled by its argmax: a task the student can only
    learn from the teacher. The inputs lie near a plane of image space, so 256 of them are enough
    for the student to generalise."""
    generator = torch.Generator().manual_seed(123)
    torch.manual_seed(7)
    teacher = nm.create_model("lenet").eval()
    plane = torch.randn(2, 28 * 28, generator=generator)
    n = train + held_out
    x = (torch.randn(n, 2, generator=generator) @ plane / 2 ** 0.5).view(n, 1, 28, 28)
    x = x + 0.1 * torch.randn(n, 1, 28, 28, generator=generator)
    with torch.no_grad():
        # at random init one class wins almost everywhere: standardise each logit over the inputs
        # (and sharpen), so the teacher uses all its classes
        logits = teacher(x)
        scale = 3 / logits.std(0)
        teacher.fc3.weight.mul_(scale[:, None])
        teacher.fc3.bias.sub_(logits.mean(0)).mul_(scale)
        y = teacher(x).argmax(1)
    loader = TensorLoader(x[:train], y[:train], batch_size=16, shuffle=True, seed=0)
    held = TensorLoader(x[train:], y[train:], batch_size=128, shuffle=False)
    return teacher, Data(train=loader, val=held, test=held, task=nm.ClassificationTask(10), example=x[:2])


def agreement(student, teacher, loader):
    with torch.no_grad():
        return float(torch.cat([(student(x).argmax(1) == teacher(x).argmax(1)).float() for x, _ in loader]).mean())


def test_one_epoch_gives_a_student_at_the_requested_widths():
    teacher, data = teacher_and_data()
    teacher.train()
    student = train_distilled("lenet", COUNTS, teacher, data, epochs=1, progress=False)
    assert [student.conv1.out_channels, student.conv2.out_channels, student.fc1.out_features,
            student.fc2.out_features] == list(COUNTS.values())
    assert nm.WidthSpace(student, data.example).full == COUNTS
    assert not student.training and teacher.training  # the teacher is left in its own mode
    assert all(p.grad is None for p in teacher.parameters())  # and never differentiated
    again = train_distilled("lenet", COUNTS, teacher, data, epochs=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))


def test_distilled_student_agrees_with_its_teacher_more_than_an_untrained_one():
    teacher, data = teacher_and_data()
    torch.manual_seed(0)
    untrained = nm.create_model("lenet", **COUNTS).eval()
    student = train_distilled("lenet", COUNTS, teacher, data, epochs=5, lr=3e-3, progress=False)
    before, after = agreement(untrained, teacher, data.val), agreement(student, teacher, data.val)
    assert after > before + 0.15, (before, after)  # measured: 0.17 -> 0.51


def test_distillation_loss_mixes_soft_and_hard_terms():
    teacher, data = teacher_and_data(train=8, held_out=0)
    task = data.task
    x, y = data.train.x, data.train.y
    student = torch.randn(8, 10)
    with torch.no_grad():
        targets = teacher(x)
    soft_only = DistillationTask(task, teacher, temperature=2.0, alpha=1.0).loss(student, (x, y))
    torch.testing.assert_close(soft_only, 4.0 * task.distill(student / 2, targets / 2))
    hard_only = DistillationTask(task, teacher, temperature=2.0, alpha=0.0).loss(student, (x, y))
    torch.testing.assert_close(hard_only, task.loss(student, (x, y)))
    assert DistillationTask(task, teacher).metric == task.metric
    with pytest.raises(ValueError, match="temperature"):
        DistillationTask(task, teacher, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        DistillationTask(task, teacher, alpha=1.5)
