"""`make demo`'s pipeline at a tiny size: every artefact written, the table and the plot complete."""
import json

import pytest

from neumeta.data.fashion_mnist import fashion_mnist_available
from neumeta.experiment import DataConfig, DemoConfig, run_demo
from neumeta.inr import INRConfig
from neumeta.train import FitConfig


pytestmark = pytest.mark.skipif(not fashion_mnist_available(), reason="needs Fashion-MNIST (`make test` gets it)")


def test_tiny_demo_writes_table_json_and_plot(tmp_path):
    config = DemoConfig(
        epochs=1, samples=2, calibrate=2, curve_samples=1, out_dir=str(tmp_path / "demo"),
        data=DataConfig(train_size=512, eval_size=300, batch_size=64, eval_batch_size=300),
        fit=FitConfig(prefit_steps=10, steps=10, eval_every=10, guard=False),
        inr=INRConfig(hidden=16, depth=2, frequencies=2),
    )
    lines = []
    summary = run_demo(config, progress=False, log=lines.append)

    out = tmp_path / "demo"
    assert [r["width"] for r in summary["rows"]] == [1.0, 0.75, 0.5, 0.25]
    assert summary["rows"][-1]["trained_range"] is False  # 0.25 is below the trained 0.5
    # the curve: every channel count of LeNet's smallest group (conv1, 16 channels)
    assert [float(w) for w in summary["curve"]] == [c / 16 for c in range(1, 17)]
    assert all(0 <= v <= 1 for v in summary["curve"].values())
    assert json.loads((out / "demo.json").read_text())["curve"] == summary["curve"]
    assert "| 75 % (unseen) | 0.25 |" in (out / "demo.md").read_text()
    # beside the base's budget, individual models given the manifold's data: 1 epoch + 10 steps of 8 batches
    assert {r["matched_epochs"] for r in summary["rows"]} == {3}
    assert "individual, 3 epochs (the manifold's data)" in (out / "demo.md").read_text()
    assert all(0 <= r["matched_test"] <= 1 for r in summary["rows"])
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert any("plot:" in line for line in lines)
    stages = summary["stage_seconds"]
    assert {"base model", "manifold (smoothing + fit)", "individual models"} <= set(stages)
    # the stages add up to the whole run, within the rounding of each to 0.1 s (and of the total)
    assert abs(sum(stages.values()) - summary["seconds"]) <= 0.05 * (len(stages) + 1) + 1e-6

    # a second run resumes: the base, the manifold and the individual models are loaded, not retrained
    lines.clear()
    again = run_demo(config, progress=False, log=lines.append)
    assert any(line.startswith("base model: loaded") for line in lines)
    assert any(line.startswith("manifold: loaded") for line in lines)
    assert [r["individual_test"] for r in again["rows"]] == [r["individual_test"] for r in summary["rows"]]
