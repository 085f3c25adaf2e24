"""benchmarks/fit_cost.py: base + pre-fit + joint steps against the individual models' steps."""
import math

import yaml

from benchmarks import fit_cost


def test_the_ratio_is_the_step_times_times_the_compare_schedule(monkeypatch, tmp_path):
    """With step times fixed, the row's totals are exactly the schedule's arithmetic: the base's
    epochs at full width, the pre-fit and joint steps, and one data-matched model per width."""
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({
        "model": "lenet", "epochs": 2, "widths": [1.0, 0.5],
        "data": {"train_size": 256, "eval_size": 200, "val_size": 500, "batch_size": 64},
        "fit": {"prefit_steps": 30, "steps": 50}}))
    plain = {}
    monkeypatch.setattr(fit_cost, "plain_step_seconds",  # each width its own time, in the order first timed
                        lambda name, data, lr, seed, device, steps, **width: plain.setdefault(repr(width),
                                                                                           0.01 * (len(plain) + 1)))
    monkeypatch.setattr(fit_cost, "prefit_step_seconds", lambda manifold, data, config, steps: 0.02)
    monkeypatch.setattr(fit_cost, "fit_step_seconds",
                        lambda manifold, data, config, steps: 0.05 * config.sampled_every)
    results = tmp_path / "cost.md"
    fit_cost.main([str(config), "--variant", "", "--variant", "sampled_every=2 sandwich_every=2",
                   "--rounds", "1", "--steps", "1", "--results", str(results)])
    rows = [line for line in results.read_text().splitlines() if line.startswith("| compare.yaml")]
    assert len(rows) == 2
    full, half = 0.01, 0.02  # the full-width model was timed first
    batches = 256 // 64
    matched = 2 + math.ceil(50 / batches)
    individuals = matched * batches * (full + half)
    assert "(the config's)" in rows[0] and "sampled_every=2 sandwich_every=2" in rows[1]
    for row, joint in zip(rows, (0.05, 0.10)):
        cells = [c.strip() for c in row.split("|")]
        ours = 2 * batches * full + 30 * 0.02 + 50 * joint
        assert float(cells[6]) == round(ours) and float(cells[7]) == round(individuals)
        assert cells[8] == f"**{ours / individuals:.2f}**"
