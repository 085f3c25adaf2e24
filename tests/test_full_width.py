"""What sampling gives at full width (INRConfig.full_width): the network the manifold was built
from, exactly ("reference", and "best" before a fit), the INR's ("inr"), or whichever fit scored
better on validation ("best", the default); every narrower width is the INR's, unchanged."""
import dataclasses

import pytest
import torch
import torch.nn as nn

import neumeta as nm
from neumeta.data import TensorLoader
from neumeta.experiment import build_manifold
from neumeta.train import FitConfig, evaluate_widths, validation_scores
from helpers import TwoLayer

TINY = nm.INRConfig(hidden=16, depth=3, frequencies=2, grid=False)


def _lenet_manifold(inr=TINY):
    torch.manual_seed(0)
    model, x = nm.create_model("lenet").eval(), torch.randn(16, 1, 28, 28)
    return model, x, build_manifold(model, x[:2], inr, log=lambda *a: None)


def test_a_fresh_manifold_samples_the_model_at_full_width():
    """The issue's test: fold + smoothing + INR, before any training, sampled at width 1.0 with
    the library's K = 50, give back the trained network's outputs."""
    model, x, manifold = _lenet_manifold()
    assert manifold.full_width_source == "reference"
    assert (manifold.sample(1.0)(x) - model(x)).abs().max() <= 1e-4
    # the INR's own full width is far from it (what the reference replaces)
    manifold.inr_config = dataclasses.replace(TINY, full_width="inr")
    assert (manifold.sample(1.0)(x) - model(x)).abs().max() > 1e-2


def test_narrower_widths_are_the_inrs_alone():
    """Every width that is not full, also one that narrows a single group, is the same network
    whatever the full width is: no layer of the reference is mixed into an INR network (that
    measured 60-82 % against 87 % on LeNet)."""
    _, x, manifold = _lenet_manifold()
    full = manifold.space.full
    for width in (0.75, 0.5, {**full, "fc1": 127}, {**full, "conv1": 8}):
        with_reference = manifold.expected_parameters(width, samples=3, full_width="reference")
        without = manifold.expected_parameters(width, samples=3, full_width="inr")
        assert with_reference.keys() == without.keys()
        assert all(torch.equal(with_reference[k], without[k]) for k in without)


def _fitted(steps, base_steps=0):
    """A fit of a two-layer net on a learnable task, its base trained ``base_steps``."""
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    model = TwoLayer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(base_steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    manifold = nm.WeightManifold(nm.WidthSpace(model, x[:2]), TINY)
    task, loader = nm.ClassificationTask(4), TensorLoader(x, y, batch_size=64)
    config = FitConfig(prefit_steps=20, steps=steps, eval_every=max(1, steps), lr=5e-3, recon_rows=1.0)
    return model, x, task, loader, nm.fit(manifold, task, loader, loader, config, progress=False)


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning", "ignore::neumeta.PoorReconstructionWarning")
@pytest.mark.parametrize("base_steps, expected", [(300, "reference"), (0, "inr")])
def test_fit_chooses_the_better_full_width_on_validation(base_steps, expected):
    """A well trained base beats the INR's copy of it: the reference is kept. An untrained base
    (chance) is beaten by the fit, which learned the task: the INR's full width is taken. fit's
    own validation sees the INR's full width either way."""
    model, x, task, loader, result = _fitted(steps=200, base_steps=base_steps)
    fitted = result.manifold
    scores = result.full_width
    assert scores["chosen"] == expected == fitted.full_width_source
    assert scores["reference"] == task.evaluate(model, loader)["accuracy"]
    assert scores["inr"] == validation_scores(fitted, task, loader, [1.0])[1.0]
    assert scores[expected] >= scores["inr" if expected == "reference" else "reference"]
    sampled = evaluate_widths(fitted, task, loader, [1.0])[1.0]["accuracy"]
    assert sampled == scores[expected]
    if expected == "reference":
        torch.testing.assert_close(fitted.sample(1.0, samples=4)(x), model(x), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::neumeta.NeverLearnedWarning", "ignore::neumeta.PoorReconstructionWarning")
def test_the_choice_and_the_setting_survive_a_save_and_load(tmp_path):
    model, x, task, loader, result = _fitted(steps=200)
    fitted = result.manifold
    assert fitted.full_width_choice == "inr"
    fitted.save(tmp_path / "m.neumeta")
    loaded = nm.load(tmp_path / "m.neumeta", model=TwoLayer())
    assert loaded.full_width_source == "inr"
    torch.testing.assert_close(loaded.sample(1.0, samples=2)(x), fitted.sample(1.0, samples=2)(x))
    _, x, manifold = _lenet_manifold(dataclasses.replace(TINY, full_width="inr"))
    manifold.save(tmp_path / "lenet.neumeta")
    assert nm.load(tmp_path / "lenet.neumeta").inr_config.full_width == "inr"


def test_a_setting_other_than_the_three_is_refused():
    with pytest.raises(ValueError, match="full_width must be one of"):
        nm.INRConfig(full_width="base")


def test_calibration_corrects_narrower_widths_to_the_inrs_full_width_and_leaves_the_reference_alone():
    """Narrower widths are the INR's, so their statistics are corrected to the INR's full width
    (the reference's measured 2-3 points worse on LeNet); full width, the reference, is returned
    untouched by calibration."""
    model, x, manifold = _lenet_manifold()
    batches = [(x,)]
    reference = manifold.calibration_reference(batches, samples=2, num_batches=1)
    inr_full = manifold.sample(1.0, samples=2, full_width="inr")
    assert (inr_full(x) - model(x)).abs().max() > 1e-2  # the two full widths differ...
    from neumeta.calibrate import measure_reference
    own = measure_reference(inr_full, manifold.space, batches, 1)
    for name, stats in own.statistics.items():  # ...and the reference measured is the INR's
        for a, b in zip(stats, reference.statistics[name]):
            torch.testing.assert_close(a, b)
    full = manifold.sample(1.0, samples=2, calibration=reference)
    assert not hasattr(full, "neumeta_calibration")
    torch.testing.assert_close(full(x), model(x), rtol=0, atol=1e-5)
    narrow = manifold.sample(0.5, samples=2, calibration=reference)
    assert narrow.neumeta_calibration.layers
