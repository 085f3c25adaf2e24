"""`neumeta compare`: every method on the same data and seeds, one table, one CSV, one curve;
a rerun skips the runs that are done."""
import csv
from pathlib import Path

import pytest

from neumeta import compare as compare_module
from neumeta.cli import main
from neumeta.compare import BATCHNORM_ONLY, METHODS, CompareConfig, compare
from neumeta.data.fashion_mnist import fashion_mnist_available
from neumeta.experiment import DataConfig
from neumeta.inr import INRConfig
from neumeta.train import FitConfig

TINY = ["--model", "lenet", "--seeds", "0", "--epochs", "1", "--widths", "1", "0.5", "0.25", "--samples", "1",
        "--curve-samples", "1", "--train-size", "256", "--eval-size", "200", "--val-size", "500", "--batch-size", "64",
        "--prefit-steps", "2", "--steps", "3", "--eval-every", "5", "--hidden", "16", "--depth", "2",
        "--frequencies", "2"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    if not fashion_mnist_available():
        pytest.skip("needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("compare")
    main(["compare", *TINY, "--out-dir", str(out)])
    return out


def test_every_method_has_a_row_with_every_width(compared):
    table = (compared / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    lenet = set(METHODS) - BATCHNORM_ONLY  # LeNet has no BatchNorm to recalibrate
    assert lenet <= set(rows) and not BATCHNORM_ONLY & set(rows)
    assert "γ 75 % †" in rows["method"] and "γ 50 % †" not in rows["method"]  # 0.25 is outside [0.5, 1]
    for name in lenet:
        cells = [c.strip() for c in rows[name].split("|")[2:5]]
        assert all(c.replace(".", "").isdigit() for c in cells), (name, cells)


def test_each_from_scratch_method_trains_its_own_model(compared):
    """US-Nets over [0.5, 1] and over [0.25, 1] are two trainings, never one shared."""
    with open(compared / "table.csv") as f:
        seconds = {r["method"]: r["seconds"] for r in csv.DictReader(f)}
    trained = [seconds[m] for m in ("slimmable", "usnet", "usnet-wide", "inn")]
    assert len(set(trained)) == len(trained)


def test_the_csv_holds_every_number_and_the_curve_every_integer_width(compared):
    with open(compared / "table.csv") as f:
        rows = list(csv.DictReader(f))
    curve = {(r["method"], float(r["width"])) for r in rows if r["kind"] == "curve"}
    smallest = 16  # LeNet's conv1
    for name in set(METHODS) - BATCHNORM_ONLY:
        widths = {w for m, w in curve if m == name}
        if name.startswith(("individual", "distill")):
            assert widths == {1.0, 0.5, 0.25}  # only the widths trained exist
        else:
            assert widths == {k / smallest for k in range(1, smallest + 1)}, name
    assert all(0 <= float(r["metric"]) <= 1 for r in rows)
    assert (compared / "curve.png").stat().st_size > 10_000


def test_a_rerun_skips_what_is_done(compared, monkeypatch):
    def never(run):
        raise AssertionError("a finished run was run again")
    monkeypatch.setattr(compare_module, "METHODS", {n: (never, p) for n, (_, p) in METHODS.items()})

    def no_data(*args, **kwargs):
        raise AssertionError("a seed whose numbers are all kept loaded its data")
    monkeypatch.setattr(compare_module, "load_data", no_data)  # so a fresh clone redraws tables at once
    before = (compared / "table.md").read_text()
    config = CompareConfig(seeds=(0,), epochs=1, widths=(1.0, 0.5, 0.25), samples=1, curve_samples=1,
                           out_dir=str(compared), data=DataConfig(train_size=256, eval_size=200, val_size=500,
                                                                  batch_size=64),
                           fit=FitConfig(prefit_steps=2, steps=3, eval_every=5),
                           inr=INRConfig(hidden=16, depth=2, frequencies=2))
    assert compare(config) + "\n" == before


def test_running_some_methods_keeps_the_rows_of_the_others(compared, tmp_path):
    """--methods picks what runs: the table still shows every method finished in out_dir, in the
    usual order, and a method finished for only some seeds is left out."""
    import shutil
    out = tmp_path / "again"
    shutil.copytree(compared, out)
    (out / "seed0" / "inn.json").unlink()  # not finished
    config = CompareConfig(seeds=(0,), methods=("individual",), epochs=1, widths=(1.0, 0.5, 0.25), samples=1,
                           curve_samples=1, out_dir=str(out),
                           data=DataConfig(train_size=256, eval_size=200, val_size=500, batch_size=64))
    table = compare(config)
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("| ")]
    expected = [n for n in METHODS if n != "inn" and n not in BATCHNORM_ONLY]
    assert rows == expected


def test_individual_models_trained_earlier_keep_their_time(compared):
    """A rerun that finds the per-width models on disk counts the time they took to train, so an
    interrupted comparison does not report them as free."""
    import json
    folder = compared / "seed0"
    first = json.loads((folder / "individual.json").read_text())["seconds"]
    widths = sorted(folder.glob("individual_*_e1.json"))
    assert len(widths) == 3 and first == pytest.approx(sum(json.loads(f.read_text())["seconds"] for f in widths))
    (folder / "individual.json").rename(folder / "individual.json.done")
    try:
        config = CompareConfig(seeds=(0,), methods=("individual",), epochs=1, widths=(1.0, 0.5, 0.25), samples=1,
                               curve_samples=1, out_dir=str(compared / "again"),
                               data=DataConfig(train_size=256, eval_size=200, val_size=500, batch_size=64))
        (compared / "again").mkdir()
        (compared / "again" / "seed0").symlink_to(folder, target_is_directory=True)
        compare(config)
        assert json.loads((folder / "individual.json").read_text())["seconds"] == pytest.approx(first)
    finally:
        (folder / "individual.json.done").replace(folder / "individual.json")


def test_methods_trained_from_scratch_never_train_the_base_model(tmp_path, monkeypatch):
    """individual-matched starts from nothing: a run of it alone leaves no base model behind, and
    its full-width model is trained like the others (the base's epochs would be too few)."""
    if not fashion_mnist_available():
        pytest.skip("needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")
    trained = []
    real = compare_module.train_base
    monkeypatch.setattr(compare_module, "train_base",
                        lambda *a, desc="", **k: trained.append(desc) or real(*a, desc=desc, **k))
    config = CompareConfig(seeds=(0,), methods=("individual-matched",), epochs=1, widths=(1.0, 0.5), samples=1,
                           curve_samples=0, out_dir=str(tmp_path), fit=FitConfig(steps=3, prefit_steps=1),
                           data=DataConfig(train_size=256, eval_size=200, val_size=500, batch_size=64))
    compare(config)
    assert not (tmp_path / "seed0" / "base.safetensors").exists()
    assert trained == ["individual 1", "individual 0.5"]


def test_the_full_width_individual_model_is_the_base_and_counts_its_time_once(tmp_path):
    """Run alone, `individual` has the base model trained for it: its width-1 model is that base,
    with the base's training time, not twice it."""
    if not fashion_mnist_available():
        pytest.skip("needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")
    import json
    config = CompareConfig(seeds=(0,), methods=("individual",), epochs=1, widths=(1.0, 0.5), samples=1,
                           curve_samples=0, out_dir=str(tmp_path),
                           data=DataConfig(train_size=256, eval_size=200, val_size=500, batch_size=64))
    compare(config)
    folder = tmp_path / "seed0"
    base = json.loads((folder / "base.json").read_text())["seconds"]
    assert json.loads((folder / "individual_1_e1.json").read_text())["seconds"] == pytest.approx(base)


def test_an_unknown_method_is_named(tmp_path):
    with pytest.raises(KeyError, match="prune-l3"):
        compare(CompareConfig(methods=("neumeta", "prune-l3"), out_dir=str(tmp_path)))


def test_compare_takes_its_config_file_as_an_argument(tmp_path):
    from neumeta.cli import parse_command
    from neumeta.config import ConfigError
    config = tmp_path / "c.yaml"
    config.write_text("seeds: [4, 5]\nmethods: [neumeta, slimmable]\n")
    _, c = parse_command(["compare", str(config)])
    assert tuple(c.seeds) == (4, 5) and tuple(c.methods) == ("neumeta", "slimmable")
    assert tuple(parse_command(["compare", "--config", str(config)])[1].seeds) == (4, 5)
    with pytest.raises(ConfigError, match="two config files"):
        parse_command(["compare", str(config), "--config", str(tmp_path / "other.yaml")])


def test_recalibrated_slimmable_shares_the_training_and_remeasures_batchnorm(tmp_path, monkeypatch):
    """With BatchNorm, the recalibrated row samples the slimmable model trained for the plain
    row (one training), and its untrained width differs from borrowing the nearest switch."""
    if not fashion_mnist_available():
        pytest.skip("needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")
    from neumeta.baselines import Slimmable
    calls = []
    train = Slimmable.train
    monkeypatch.setattr(Slimmable, "train", lambda self, *a, **k: calls.append(1) or train(self, *a, **k))
    main(["compare", "--model", "resnet20", "--dataset", "fashion-mnist-32x3", "--groups", "paper", "--seeds", "0",
          "--epochs", "1", "--widths", "1", "0.5", "0.25", "--curve-samples", "0", "--train-size", "128",
          "--eval-size", "100", "--val-size", "200", "--batch-size", "64", "--steps", "2",
          "--methods", "slimmable", "slimmable-recalibrated", "--out-dir", str(tmp_path)])
    assert len(calls) == 1
    with open(tmp_path / "table.csv") as f:
        rows = {(r["method"], r["width"]): r for r in csv.DictReader(f)}
    plain, recal = rows[("slimmable", "0.25")], rows[("slimmable-recalibrated", "0.25")]
    assert plain["seconds"] == recal["seconds"] and plain["stored_parameters"] == recal["stored_parameters"]
    assert plain["metric"] != recal["metric"]


def test_fine_tuned_pruning_is_measured_again_and_says_so(compared, tmp_path):
    """--finetune-steps N: the pruning rows kept from a run without fine-tuning are not reused;
    the fine-tuned networks are measured (other numbers) and the row names its fine-tuning."""
    import json
    import shutil
    out = tmp_path / "finetuned"
    shutil.copytree(compared, out)
    plain = json.loads((out / "seed0" / "prune-l1.json").read_text())
    config = CompareConfig(seeds=(0,), methods=("prune-l1",), epochs=1, widths=(1.0, 0.5, 0.25), samples=1,
                           curve_samples=0, finetune_steps=10, out_dir=str(out),
                           data=DataConfig(train_size=256, eval_size=200, val_size=500, batch_size=64))
    table = compare(config)
    tuned = json.loads((out / "seed0" / "prune-l1.json").read_text())
    assert tuned["protocol"] == plain["protocol"] + "; fine-tuned 10 steps per width"
    assert tuned["table"] != plain["table"]
    assert tuned["seconds"] > plain["seconds"]  # the base's time plus the fine-tuning of the table's widths
    assert "fine-tuned 10 steps per width" in table


@pytest.mark.parametrize("name", ["compare.yaml", "compare-resnet20.yaml", "compare-resnet20-every.yaml",
                                  "compare-resnet20-every-fast.yaml"])
def test_the_shipped_compare_configs_parse_with_their_fit_options(name):
    """A config whose options the parser renamed or dropped would fail the run hours in, or
    quietly run another recipe."""
    import yaml
    from neumeta.cli import parse_command
    path = Path(__file__).resolve().parents[1] / "configs" / name
    _, c = parse_command(["compare", str(path)])
    for key, value in (yaml.safe_load(path.read_text()).get("fit") or {}).items():
        got = getattr(c.fit, key)
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == \
            (tuple(value) if isinstance(value, list) else value), key
