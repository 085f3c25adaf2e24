"""benchmarks/step_cost.py's ``--set``: the FitConfig fields a row is timed with, and its label."""
import pytest

from benchmarks import step_cost
from neumeta.config import ConfigError


def test_set_refuses_what_is_not_a_fitconfig_field(tmp_path):
    with pytest.raises(ConfigError, match="no_such_field"):
        step_cost.main(["--models", "lenet", "--set", "no_such_field=1", "--results", str(tmp_path / "cost.md")])
    assert not (tmp_path / "cost.md").exists()


def test_a_row_is_timed_with_the_options_it_names(monkeypatch, tmp_path):
    """One LeNet row with a leaner recipe: the fit steps timed really ran with the options set
    (train_calibrated included, which needs the full width's statistics every step), and the row's
    recipe column names them."""
    seen = []
    real = step_cost.fit_step_seconds

    def recording(manifold, data, config, steps):
        seen.append(config)
        return real(manifold, data, config, steps)

    monkeypatch.setattr(step_cost, "fit_step_seconds", recording)
    monkeypatch.setattr(step_cost, "sampling_row", lambda *a, **k: "")
    results = tmp_path / "cost.md"
    step_cost.main(["--models", "lenet", "--steps", "1", "--recipes", "inr", "--options", "0.25,off",
                    "--set", "sandwich=false", "original_distill=false", "train_calibrated=true",
                    "--results", str(results)])
    assert seen and all(not c.sandwich and not c.original_distill and c.train_calibrated and c.tensor_subset == 0.25
                        for c in seen)
    row = [line for line in results.read_text().splitlines() if line.startswith("| lenet")]
    assert len(row) == 1
    assert "inr, sandwich=False, original_distill=False, train_calibrated=True" in row[0]


def test_vary_gives_one_row_per_value_over_the_set_fields(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(step_cost, "fit_step_seconds", lambda manifold, data, config, steps: seen.append(config) or 0.1)
    monkeypatch.setattr(step_cost, "sampling_row", lambda *a, **k: "")
    results = tmp_path / "cost.md"
    step_cost.main(["--models", "lenet", "--steps", "1", "--recipes", "inr", "--options", "1,off",
                    "--set", "sandwich=false", "--vary", "full_every=1,3", "--results", str(results)])
    assert sorted({c.full_every for c in seen}) == [1, 3] and not any(c.sandwich for c in seen)
    rows = [line for line in results.read_text().splitlines() if line.startswith("| lenet")]
    assert [("full_every=1" in r, "full_every=3" in r) for r in rows] == [(True, False), (False, True)]
