"""FitConfig(train_original=True): the distillation teacher goes on learning; the reference stays."""
import pytest
import torch

import neumeta as nm
from neumeta.data import TensorLoader


class RecordingTask(nm.ClassificationTask):
    """Keeps every teacher output that ``distill`` is given."""

    def __init__(self):
        super().__init__(10)
        self.teachers = []

    def distill(self, student, teacher):
        self.teachers.append(teacher.detach().clone())
        return super().distill(student, teacher)


def _fit(train_original: bool):
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        base_outputs = base(x)
    manifold = nm.WeightManifold(nm.WidthSpace(base, x[:2]), nm.INRConfig(hidden=16, depth=3, frequencies=2))
    task = RecordingTask()
    # one batch, seen every step: a teacher that learns gives other outputs on it each step
    loader = TensorLoader(x, torch.arange(8) % 10, batch_size=8, shuffle=False)
    nm.fit(manifold, task, loader, None, nm.FitConfig(prefit_steps=2, steps=4, eval_every=10, guard=False,
                                                      inplace_distill=False, sandwich=False,
                                                      train_original=train_original, lr=1e-2), progress=False)
    with torch.no_grad():
        reference_outputs = manifold.space.model(x)
    return task.teachers, reference_outputs, base_outputs


@pytest.mark.filterwarnings("ignore::neumeta.PoorReconstructionWarning")  # 2 pre-fit steps on purpose
@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning")
def test_the_teacher_learns_and_the_reference_stays():
    still, reference_outputs, _ = _fit(False)
    assert len(still) == 4
    for teacher in still:  # the reference's outputs, every step
        torch.testing.assert_close(teacher, reference_outputs, rtol=0, atol=0)
    learning, reference_outputs, base_outputs = _fit(True)
    assert len(learning) == 4
    torch.testing.assert_close(learning[0], reference_outputs, rtol=0, atol=0)  # it starts as the reference
    for before, after in zip(learning, learning[1:]):  # then learns, a step at a time
        assert (after - before).abs().max() > 1e-4
    # the reference (full width, L_recon's targets) is still the base model's function
    torch.testing.assert_close(reference_outputs, base_outputs, rtol=0, atol=1e-5)
