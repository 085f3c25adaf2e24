"""FitConfig(width_ramp=...): the trained range opens from full width down to min_width."""
import pytest
import torch

import neumeta as nm
import neumeta.train as train
from neumeta.data import TensorLoader


def test_the_lower_end_falls_linearly_over_the_ramp_then_stays():
    config = nm.FitConfig(prefit_steps=10, steps=20, min_width=0.5, width_ramp=0.5)
    assert train.trained_min_width(0, config) == 0.5  # the pre-fit trains no width
    ends = [train.trained_min_width(s, config) for s in (10, 14, 19, 20, 29)]
    assert ends == pytest.approx([0.95, 0.75, 0.5, 0.5, 0.5])
    assert train.trained_min_width(10, nm.FitConfig(prefit_steps=10, steps=20)) == 0.5  # no ramp
    with pytest.raises(ValueError, match="width_ramp"):
        nm.FitConfig(width_ramp=1.5)


@pytest.mark.filterwarnings("ignore::neumeta.train.PoorReconstructionWarning")
def test_a_ramped_fit_trains_only_widths_the_ramp_has_opened(monkeypatch):
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=8, fc1=16, fc2=8)
    manifold = nm.WeightManifold(nm.WidthSpace(base, torch.zeros(2, 1, 28, 28)),
                                 nm.INRConfig(hidden=16, depth=2, frequencies=2))
    full = manifold.space.full
    seen = []
    real = train.task_loss_terms

    def spy(manifold, task, batch, counts_list, *args, **kwargs):
        seen.append([min(c[g] / full[g] for g in full) for c in counts_list[1:]])  # [0] is the full width
        return real(manifold, task, batch, counts_list, *args, **kwargs)

    monkeypatch.setattr(train, "task_loss_terms", spy)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    config = nm.FitConfig(prefit_steps=2, steps=8, width_ramp=0.5, min_width=0.5, eval_every=100)
    nm.fit(manifold, nm.ClassificationTask(10), TensorLoader(x, y, batch_size=8), None, config, progress=False)
    assert len(seen) == 8
    for k, narrowest in enumerate(seen):
        low = train.trained_min_width(config.prefit_steps + k, config)
        assert min(narrowest) >= low - 1e-9, (k, narrowest, low)
    assert min(seen[0]) > 0.75  # the first joint step trains widths near full only
    assert min(seen[-1]) == pytest.approx(0.5)  # by the end, the sandwich's narrowest width is min_width
