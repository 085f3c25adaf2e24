"""benchmarks/reconstruction.py: one row per generated tensor, every variant a column, cached."""
import pytest

import neumeta as nm
from benchmarks import reconstruction
from neumeta.data.fashion_mnist import fashion_mnist_available

pytestmark = pytest.mark.skipif(not fashion_mnist_available(),
                                reason="needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")


def test_the_table_has_every_tensor_and_a_rerun_reads_the_cache(tmp_path):
    base = tmp_path / "base.safetensors"
    nm.save_model(nm.create_model("resnet20"), base)
    args = ["--base", str(base), "--steps", "2", "--hidden", "8", "--train-size", "256", "--eval-size", "100",
            "--variants", "paper", "gaussian+relative, no noise",
            "--out-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "r.md")]
    text = reconstruction.main(args)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| tensor")]
    tensors = [r for r in rows if not r.startswith("| *")]
    assert len(tensors) == 44  # ResNet-20, every group: 22 weights and 22 (folded) biases
    for row in tensors:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 2 and all(float(c) >= 0 for c in cells)
    assert any(r.startswith("| *within 0.05* |") for r in rows)
    accuracy = next(r for r in rows if r.startswith("| *full width, validation accuracy"))
    assert accuracy.split("|")[2:4] and all("(" in c for c in accuracy.split("|")[2:4])  # each variant: the INR's full width (the base model's)
    assert any(r.startswith("| *width 0.5, validation accuracy") for r in rows)
    cached = sorted((tmp_path / "runs").glob("*.json"))
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert reconstruction.main(args).split("\n", 1)[1] == text.split("\n", 1)[1]
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    with pytest.raises(FileNotFoundError, match="--base"):
        reconstruction.main(["--base", str(tmp_path / "missing.safetensors"), "--out-dir", str(tmp_path / "x")])


def test_set_overrides_a_variant_and_keeps_its_own_cache(tmp_path):
    base = tmp_path / "base.safetensors"
    nm.save_model(nm.create_model("resnet20"), base)
    args = ["--base", str(base), "--steps", "2", "--hidden", "8", "--train-size", "256", "--eval-size", "100",
            "--groups", "paper", "--variants", "gaussian+relative, no noise", "--out-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "r.md")]
    plain = reconstruction.main(args)
    wider = reconstruction.main(args + ["--set", "inr.frequencies=40", "fit.lr=0.003"])
    assert "frequencies=40, fit.lr=0.003" in wider and "frequencies=40" not in plain
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    params = [int(t.split("(")[1].split(" parameters")[0].replace(",", "")) for t in (plain, wider)]
    assert params[1] > params[0]  # 40 features: a wider first layer than the default 16
    with pytest.raises(SystemExit):
        reconstruction.main(args + ["--set", "inr.features=5"])
