"""benchmarks/joint_start.py: the first joint steps from a finished pre-fit, under other options."""
import pytest
import yaml

from benchmarks import joint_start
from neumeta.cli import main
from neumeta.data.fashion_mnist import fashion_mnist_available

pytestmark = pytest.mark.skipif(not fashion_mnist_available(),
                                reason="needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")


def test_joint_steps_from_a_checkpoint_with_overrides(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": "lenet", "seeds": [0], "methods": ["neumeta"], "epochs": 1, "widths": [1.0, 0.5], "samples": 1,
        "curve_samples": 0, "out_dir": str(out),
        "data": {"train_size": 256, "eval_size": 100, "val_size": 500, "batch_size": 64},
        "fit": {"prefit_steps": 3, "steps": 2, "eval_every": 5},
        "inr": {"hidden": 16, "depth": 2, "frequencies": 2}}))
    main(["compare", str(config)])
    checkpoint = out / "seed0" / "neumeta.ckpt"
    history = joint_start.main([str(checkpoint), "--config", str(config), "--steps", "4", "--eval-every", "2",
                                "--eval-size", "100", "--set", "lr=0.0002", "sandwich=false", "coords.noise=0"])
    assert [row["step"] for row in history] == [2, 4]
    assert all(0 <= row["val_accuracy@0.5"] <= 1 for row in history)
    with pytest.raises(SystemExit):
        joint_start.main([str(checkpoint), "--config", str(config), "--set", "learning_rate=1"])
    # --start-only trains nothing: the checkpoint's widths, plain and calibrated; at full width
    # calibration changes nothing (it matches narrower widths to the full width's statistics)
    scores = joint_start.main([str(checkpoint), "--config", str(config), "--start-only", "--widths", "1", "0.5",
                               "--samples", "2", "--eval-size", "100"])
    assert set(scores) == {1.0, 0.5}
    assert scores[1.0]["plain"] == scores[1.0]["calibrated"]
    assert all(0 <= v <= 1 for row in scores.values() for v in row.values())
