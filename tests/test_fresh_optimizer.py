"""FitConfig(fresh_optimizer=True): Adam's moments start again when the joint phase begins."""
import pytest
import torch

import neumeta as nm
from neumeta.data import TensorLoader


def _adam_step_counts(monkeypatch, **options) -> list:
    """Adam's step count (max over parameters) seen before each optimizer step of a tiny fit."""
    seen, original = [], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(max((int(s["step"]) for s in self.state.values() if "step" in s), default=0))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    x = torch.randn(8, 1, 28, 28)
    manifold = nm.WeightManifold(nm.WidthSpace(base, x[:2]), nm.INRConfig(hidden=16, depth=3, frequencies=2))
    loader = TensorLoader(x, torch.arange(8) % 10, batch_size=4)
    nm.fit(manifold, nm.ClassificationTask(10), loader, None,
           nm.FitConfig(prefit_steps=3, steps=3, eval_every=10, guard=False, **options), progress=False)
    return seen


@pytest.mark.filterwarnings("ignore::neumeta.PoorReconstructionWarning")  # 3 pre-fit steps on purpose
def test_the_joint_phase_starts_adam_afresh_only_when_asked(monkeypatch):
    assert _adam_step_counts(monkeypatch) == [0, 1, 2, 3, 4, 5]  # one run of Adam over both phases
    assert _adam_step_counts(monkeypatch, fresh_optimizer=True) == [0, 1, 2, 0, 1, 2]
