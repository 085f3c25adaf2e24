"""The recipe benchmark end to end on real Fashion-MNIST, at a smoke-test size."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import recipe as entry
from benchmarks import recipe_benchmark as rb
from neumeta.experiment import DataConfig
from neumeta.train import DivergenceError
from neumeta.data.fashion_mnist import fashion_mnist_available


pytestmark = pytest.mark.skipif(not fashion_mnist_available(),
                                reason="needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")

TINY = rb.Schedule(epochs=1, prefit_steps=4, steps=6, eval_every=3, samples=1, curve_samples=1, cost_rounds=2)


@pytest.fixture
def unguarded(monkeypatch):
    """Smoke schedules sit near chance, where the divergence guard may roll back or give up: these
    tests are about the benchmark's plumbing (the guard has its own tests in test_recipe.py)."""
    real = rb._options

    def options(*args, **kwargs):
        fit_config, *rest = real(*args, **kwargs)
        return (dataclasses.replace(fit_config, guard=False), *rest)
    monkeypatch.setattr(rb, "_options", options)


def test_matched_epochs_give_individual_models_the_manifolds_data():
    assert rb.matched_epochs(rb.Schedule(), batches_per_epoch=430) == 4 + 6  # 2500 steps = 5.8 epochs, rounded up
    assert rb.matched_epochs(rb.Schedule(steps=430), batches_per_epoch=430) == 5
    assert rb.matched_epochs(rb.Schedule(steps=0), batches_per_epoch=430) == 4


def test_variants_switch_one_option_each_unless_named_as_a_combination():
    names = rb.variants()
    assert {"paper", "previous default", "default"} <= set(names) and set(rb.COMBINED) <= set(names)
    assert names["previous default"] == {"recipe": "inr"}
    for name, tree in names.items():
        if name not in ("paper", "previous default", "default"):
            leaves = [v for section in tree.values() for v in (section.values() if isinstance(section, dict) else [section])]
            assert (len(leaves) > 1) == (name in rb.COMBINED), name
            assert (" = " in name) == (name not in rb.COMBINED), name  # "default, key = value" names one switch


@pytest.mark.slow
def test_benchmark_writes_table_json_and_plot_and_resumes(tmp_path, unguarded):
    config = rb.RecipeBenchmarkConfig(seeds=(0,), variants=("default", "paper"), out_dir=str(tmp_path / "runs"),
                                      results=str(tmp_path / "recipe"),
                                      data=DataConfig(train_size=512, val_size=500))
    table = rb.run(config, log=lambda *_: None, schedule=TINY)
    assert "| individual models (1 epoch, the base's) |" in table and "| paper |" in table and "| default |" in table
    # individual models also given the manifold's data: 1 epoch + 6 joint steps of 4 batches = 3
    assert "| individual models (3 epochs: the manifold's data) |" in table
    assert "Targets for the default recipe against individual models given the manifold's data (3 epochs)" in table
    assert (tmp_path / "runs" / "seed0" / "individual_0.5_e3.safetensors").exists()
    assert "Targets for the default recipe" in table
    raw = json.loads((tmp_path / "recipe.json").read_text())
    default = raw["results"]["default"][0]
    assert set(default["test"]) == {str(w) for w in rb.WIDTHS}
    assert len(default["curve"]) == 16  # every channel count of lenet's conv1
    assert set(default["curve_calibrated"]) == set(default["curve"])
    assert default["learned"] == (not default["warnings"])  # a smoke fit may end at chance: said, not raised
    assert f"| default, {rb.CALIBRATED} (same fits) |" in table
    assert f"Targets for the default recipe, {rb.CALIBRATED}" in table
    assert "checkpoint by" not in table  # one selection rule: the validation mean of the trained widths
    # a fit step against a plain step, timed back to back: the INR's generation costs more than
    # the network's own step, and the table shows the measured ratio
    cost = default["step_cost"]
    assert cost["ratio"] == pytest.approx(cost["fit_step_seconds"] / cost["plain_step_seconds"]) and cost["ratio"] > 1
    assert cost["how"].startswith(f"{TINY.cost_rounds} rounds of ")  # the schedule sets the timing rounds
    assert f" | {cost['ratio']:.1f} | " in next(line for line in table.splitlines()
                                                      if line.startswith("| default |"))
    assert (tmp_path / "recipe.png").stat().st_size > 10_000
    assert (tmp_path / "recipe-trajectory.png").stat().st_size > 10_000  # validation along training
    # per-run results stay in the run folder: beside the table only the table, its numbers and plots
    assert {p.name for p in tmp_path.iterdir()} == {"runs", "recipe.md", "recipe.json", "recipe.png",
                                                    "recipe-trajectory.png"}
    individual = json.loads((tmp_path / "runs" / "seed0" / "individual.json").read_text())
    assert individual["matched_epochs"] == 3 and set(individual["test_matched"]) == {str(w) for w in rb.WIDTHS}
    # a second run reads the cached per-run results instead of fitting again
    result_file = tmp_path / "runs" / "seed0" / "default" / "result.json"
    stamp = result_file.stat().st_mtime_ns
    messages = []
    assert rb.run(config, log=messages.append, schedule=TINY) == table
    assert result_file.stat().st_mtime_ns == stamp
    assert not any("another base model" in str(m) for m in messages)
    # a result beside another base model is said; one of other options is refused, not patched
    result_file.write_text(json.dumps(dict(default, base_sha256="0" * 64)))
    rb.run(config, log=messages.append, schedule=TINY)
    assert any("'default' was fitted from another base model" in str(m) for m in messages)
    options = dict(default["options"], fit=dict(default["options"]["fit"], recon_weight=3.0))
    result_file.write_text(json.dumps(dict(default, options=options)))
    with pytest.raises(ValueError, match=r"other options than variant 'default'.*delete .*default to fit it again"):
        rb.run(config, log=lambda *_: None, schedule=TINY)


@pytest.mark.slow
def test_a_refine_variant_refines_the_previous_defaults_fit_against_its_own_data_matched_models(
        tmp_path, unguarded, monkeypatch):
    name = "default, then a grid refines the range"
    first = "previous default"  # the INR at every width: the refine stage adds the grid to it
    monkeypatch.setitem(rb.COMBINED, name, {"recipe": "inr", "fit": {"refine_steps": 4}, "first_stage": first})
    config = rb.RecipeBenchmarkConfig(seeds=(0,), variants=(first, name), out_dir=str(tmp_path / "runs"),
                                      results=str(tmp_path / "recipe"), data=DataConfig(train_size=512, val_size=500))
    table = rb.run(config, log=lambda *_: None, schedule=TINY)
    seed = tmp_path / "runs" / "seed0"
    # the joint phase is fitted once, in the first stage's folder; the refine stage has its own checkpoint
    assert (rb.variant_folder(seed, first) / "fit.ckpt").exists()
    assert not (rb.variant_folder(seed, name) / "fit.ckpt").exists()
    assert (rb.variant_folder(seed, name) / "fit.refine.ckpt").exists()
    # 1 epoch + 6 joint steps of 4 batches = 3 epochs; with 4 refine steps more, 4
    individual = json.loads((seed / "individual.json").read_text())
    assert individual["matched_epochs"] == 3 and set(individual["matched_by_epochs"]) == {"4"}
    assert "| individual models (4 epochs: the data of a variant with a refine stage) |" in table
    raw = json.loads((tmp_path / "recipe.json").read_text())
    default, refined = raw["results"][first][0], raw["results"][name][0]
    assert refined["options"]["fit"]["refine_steps"] == 4 and refined["refine_step_seconds"] > 0
    # below the trained range (and its fade) the refined manifold is the default's, exactly
    for width in ("0.25", "0.125"):
        assert refined["test"][width] == default["test"][width]
        assert refined["test_calibrated"][width] == default["test_calibrated"][width]


def test_targets_are_judged_per_seed():
    base = {"test": {str(w): 0.80 for w in rb.WIDTHS}, "seed": 0}
    good = {"seed": 0, "test": {**{str(w): 0.81 for w in rb.WIDTHS}, "0.25": 0.795}}
    bad = {"seed": 0, "test": {**{str(w): 0.81 for w in rb.WIDTHS}, "0.25": 0.78}}
    assert "every seed within 1.0 point of its individual model: met" in rb.targets([good], [base], 0.1, 0.5)
    assert "every seed within 1.0 point of its individual model: missed (-2.00)" in rb.targets([bad], [base], 0.1, 0.5)
    edge = {"seed": 0, "test": {**{str(w): 0.80 for w in rb.WIDTHS}, "1.0": 0.795, "0.25": 0.79}}
    said = rb.targets([edge], [base], 0.1, 0.5)  # exactly at each margin: met, and the margins are said
    assert "γ 0 % within 0.5 points of individual: met (-0.50)" in said
    assert "γ 25 % mean ≥ individual: met (+0.00)" in said
    assert "every seed within 1.0 point of its individual model: met (-1.00)" in said
    collapsed = {"seed": 0, "test": {**good["test"], "0.5": 0.1}}
    assert "no seed collapses: missed" in rb.targets([collapsed], [base], 0.1, 0.5)


def test_base_models_do_not_depend_on_the_machines_thread_count(tmp_path):
    import torch
    from neumeta.experiment import load_data, train_base
    from neumeta.io import save_model
    data = load_data(DataConfig(train_size=512, val_size=500), 0)
    before = torch.get_num_threads()
    digests = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with rb.reproducible_threads("cpu"):
            assert torch.get_num_threads() == 1
            model = train_base("lenet", data, 1, 1e-3, 0, "cpu", progress=False)
        assert torch.get_num_threads() == threads  # restored
        save_model(model, tmp_path / f"base{threads}.safetensors")
        digests.append(rb.model_digest(tmp_path / f"base{threads}.safetensors"))
    torch.set_num_threads(before)
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_a_variant_fits_the_same_whatever_ran_before_in_the_process(tmp_path, unguarded):
    import shutil
    import torch
    config = rb.RecipeBenchmarkConfig(seeds=(0,), variants=("default",), out_dir=str(tmp_path / "runs"),
                                      results=str(tmp_path / "recipe"), data=DataConfig(train_size=256, val_size=200))
    schedule = rb.Schedule(epochs=1, prefit_steps=3, steps=3, eval_every=3, samples=1, curve_samples=1)
    results = []
    for noise in (0, 1000):
        torch.rand(noise)  # what ran before: other draws from torch's global generator
        rb.run(config, log=lambda *_: None, schedule=schedule)
        results.append(json.loads((tmp_path / "recipe.json").read_text())["results"]["default"][0])
        # fit again, the base and individual models now cached (no training reseeds torch first)
        shutil.rmtree(tmp_path / "runs" / "seed0" / "default")
    assert results[0]["history"] == results[1]["history"] and results[0]["test"] == results[1]["test"]


def test_ablation_seeds_fit_the_ablation_on_those_seeds_only_and_write_two_tables(tmp_path, monkeypatch):
    """One command, two tables: paper and default on every seed (with the targets), every variant
    on the ablation seeds beside those seeds' default and individual models only."""
    import types
    fitted = []

    def fake_variant(name, tree, config, schedule, seed, *args, **kwargs):
        fitted.append((name, seed))
        score = 0.80 + 0.01 * seed + (0.05 if name == "default" else 0.0)
        return {"variant": name, "seed": seed, "test": {str(w): score for w in rb.WIDTHS}}

    def fake_baselines(config, schedule, seed, *args, **kwargs):
        return {"test": {str(w): 0.70 + 0.1 * seed for w in rb.WIDTHS},
                "test_matched": {str(w): 0.86 + 0.01 * seed for w in rb.WIDTHS}, "val_matched": {}, "matched_epochs": 2}

    monkeypatch.setattr(rb, "load_data", lambda data, seed: types.SimpleNamespace(task=types.SimpleNamespace(chance=0.1)))
    monkeypatch.setattr(rb, "train_base", lambda *a, **k: None)
    monkeypatch.setattr(rb, "save_model", lambda model, file: file.write_text("base"))
    monkeypatch.setattr(rb, "model_digest", lambda file: "0" * 64)
    monkeypatch.setattr(rb, "run_seed_baselines", fake_baselines)
    monkeypatch.setattr(rb, "run_variant", fake_variant)
    ablation = "default, smooth = False"
    config = rb.RecipeBenchmarkConfig(seeds=(0, 1, 2), ablation_seeds=(0,), out_dir=str(tmp_path / "runs"),
                                      results=str(tmp_path / "recipe"))
    table = rb.run(config, log=lambda *_: None, schedule=rb.QUICK)
    assert sorted(s for n, s in fitted if n == "default") == [0, 1, 2]
    assert sorted(s for n, s in fitted if n == "paper") == [0, 1, 2]
    assert [s for n, s in fitted if n == ablation] == [0]
    candidates = rb.candidate_names()
    assert set(rb.COMBINED) <= candidates
    assert not candidates & {n for n, _ in fitted}  # candidates, combined ones too, run only when named
    main, few = table.split("The ablation and candidates, seed(s) 0")
    assert "3 seed(s) [0, 1, 2]" in main and ablation not in main and "Targets for the default recipe" in main
    assert "| individual models (1 epoch, the base's) | 80.00 (70.0–90.0) |" in main  # every seed's individual models
    assert "| individual models (2 epochs: the manifold's data) | 87.00 (86.0–88.0) |" in main
    # the default (86.00 mean) judged against those too: 1 point under them at every width
    assert ("Targets for the default recipe against individual models given the manifold's data (2 epochs): "
            "no seed collapses: met (0/3); γ 25 % mean ≥ individual: missed (-1.00)") in main
    assert f"| {ablation} | 80.00 |" in few and "| default | 85.00 |" in few  # seed 0 only
    assert "| individual models (1 epoch, the base's) | 70.00 |" in few and "Targets" not in few
    assert (tmp_path / "recipe.md").read_text().strip() == table
    with pytest.raises(ValueError, match="ablation seeds \\[3\\]"):
        rb.run(dataclasses.replace(config, ablation_seeds=(3,)), log=lambda *_: None, schedule=rb.QUICK)
    # other epochs of the base and individual models: their own run folder, and the table there too
    # (benchmarks/results holds the standard schedules' tables only)
    monkeypatch.chdir(tmp_path)
    folders = []
    monkeypatch.setattr(rb, "run_seed_baselines", lambda *a, **k: folders.append(a[4]) or fake_baselines(*a, **k))
    rb.run(rb.RecipeBenchmarkConfig(seeds=(0,), variants=("default",), epochs=10), log=lambda *_: None)
    assert folders == [Path("runs/recipe-e10/seed0")] and (tmp_path / "runs/recipe-e10/recipe.md").exists()
    assert not (tmp_path / "benchmarks").exists()
    schedules = []
    monkeypatch.setattr(rb, "run_variant", lambda name, tree, config, schedule, *a, **k:
                        schedules.append(schedule) or fake_variant(name, tree, config, schedule, *a, **k))
    rb.run(rb.RecipeBenchmarkConfig(seeds=(0,), variants=("default",), prefit_steps=3000, steps=7500),
           log=lambda *_: None)
    assert folders[-1] == Path("runs/recipe-p3000-s7500/seed0")
    assert (tmp_path / "runs/recipe-p3000-s7500/recipe.md").exists() and not (tmp_path / "benchmarks").exists()
    assert (schedules[-1].prefit_steps, schedules[-1].steps, schedules[-1].epochs) == (3000, 7500, 4)
    rb.run(rb.RecipeBenchmarkConfig(seeds=(0,), variants=("default",), quick=True), log=lambda *_: None)
    assert folders[-1] == Path("runs/recipe-quick/seed0")  # a standard schedule: its table is kept
    assert (tmp_path / "benchmarks/results/recipe-quick.md").exists()
    # candidate variants on the standard schedule: their table goes to the run folder, not over the standard one
    standard = (tmp_path / "benchmarks/results/recipe-quick.md").read_text()
    candidate = rb._switched(*rb.candidate_flips()[0][1:])
    rb.run(rb.RecipeBenchmarkConfig(seeds=(0,), variants=(candidate,), quick=True), log=lambda *_: None)
    assert candidate in (tmp_path / "runs/recipe-quick/recipe.md").read_text()
    assert (tmp_path / "benchmarks/results/recipe-quick.md").read_text() == standard
    with pytest.raises(ValueError, match="steps must be >= 1, not 0"):
        rb.run(rb.RecipeBenchmarkConfig(seeds=(0,), variants=("default",), steps=0), log=lambda *_: None)


@pytest.mark.parametrize("kept, epochs", [({"epochs": 4}, "4"), ({}, "unrecorded")])
def test_individual_models_of_other_epochs_are_refused(tmp_path, kept, epochs):
    (tmp_path / "individual.json").write_text(json.dumps({"test": {}, "val": {}, **kept}))
    with pytest.raises(ValueError, match=f"individual models of {epochs} epochs, not 10.*own --out-dir"):
        rb.run_seed_baselines(rb.RecipeBenchmarkConfig(epochs=10), rb.Schedule(epochs=10), 0, None, tmp_path,
                              log=lambda *_: None, base_digest="0" * 64)


def test_a_diverged_fit_is_recorded_with_its_rollbacks_and_device(tmp_path, monkeypatch):
    rollbacks = [{"step": 8, "to_step": 4, "why": "validation accuracy at width 1 fell"}] * 3

    def diverging(*args, **kwargs):
        raise DivergenceError("fit diverged at step 8: width 1 fell to chance", rollbacks=rollbacks)
    monkeypatch.setattr(rb, "_fitted", diverging)
    config = rb.RecipeBenchmarkConfig(seeds=(0,), out_dir=str(tmp_path))
    result = rb.run_variant("default", {}, config, TINY, 0, None, tmp_path, log=lambda *_: None,
                            base_digest="0" * 64)
    assert "step 8" in result["diverged"] and result["rollbacks"] == rollbacks
    assert result["device"] == rb.device_name("cpu")  # the table's "fits run on" names it
    cached = json.loads((tmp_path / "default" / "result.json").read_text())
    assert cached["diverged"] == result["diverged"] and rb._collapsed(cached, 0.1, 0.5)


def test_a_fit_that_never_left_chance_counts_as_collapsed():
    run = {"learned": False, "test": {str(w): 0.8 for w in rb.WIDTHS}}  # validation said chance
    assert rb._collapsed(run, 0.1, 0.5) and not rb._collapsed(dict(run, learned=True), 0.1, 0.5)


def test_every_option_of_the_entry_point_has_help():
    parser = entry.make_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and not action.help.startswith(" (default"), action.option_strings


def test_the_entry_point_runs_as_a_script_from_anywhere(tmp_path):
    script = Path(entry.__file__).resolve()
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert "--ablation-seeds" in done.stdout and "--prefit-steps" in done.stdout and "--train-size" in done.stdout


def test_the_entry_point_reads_the_shared_yaml_file_and_flags(tmp_path):
    from neumeta.config import ConfigError, load_config
    file = tmp_path / "c.yaml"
    file.write_text("quick: true\nseeds: [1]\nfit: {steps: 9}\ndata: {train_size: 64}\n")  # fit: neumeta's
    args = entry.make_parser().parse_args(["--config", str(file), "--variants", "default"])
    config = load_config(rb.RecipeBenchmarkConfig, args, commands=entry.CONFIGS)
    assert (config.quick, config.seeds, config.variants, config.data.train_size) == (True, (1,), ("default",), 64)
    file.write_text("fit: {stepz: 9}\n")
    with pytest.raises(ConfigError, match=r"fit\.stepz"):
        load_config(rb.RecipeBenchmarkConfig, entry.make_parser().parse_args(["--config", str(file)]),
                    commands=entry.CONFIGS)


def test_an_option_added_later_reads_as_its_default_in_an_older_result():
    """Results written before an option existed were fitted with the behaviour its default keeps:
    they stay valid; a result with another value of it does not."""
    current = {"fit": json.loads(json.dumps(dataclasses.asdict(rb.FitConfig()))),
               "coords": dataclasses.asdict(rb.CoordConfig()), "inr": dataclasses.asdict(rb.INRConfig())}
    older = dict(current, inr={k: v for k, v in current["inr"].items() if k not in ("encoding", "encoding_scale")})
    assert rb._results_options(older) == rb._results_options(current)
    other = dict(current, inr=dict(current["inr"], encoding="gaussian"))
    assert rb._results_options(other) != rb._results_options(current)


def test_issue_20s_targets_are_judged_per_seed_against_the_base_the_matched_models_and_the_previous_default():
    widths = {str(w): 0.80 for w in rb.WIDTHS}
    base = [{"seed": s, "test": dict(widths)} for s in (0, 1)]
    matched = [{"seed": s, "test": {**widths, "0.75": 0.82, "0.5": 0.82}} for s in (0, 1)]
    previous = [{"seed": s, "test": {**widths, "0.25": 0.70}} for s in (0, 1)]
    good = {"test": {**widths, "1.0": 0.81, "0.75": 0.815, "0.5": 0.83, "0.25": 0.70}}
    runs = [{**good, "seed": 0}, {"seed": 1, "test": {**good["test"], "1.0": 0.797, "0.25": 0.69}}]
    line = rb.full_width_targets(runs, base, matched, previous)
    assert "γ 0 % within 0.2 points of the base model: missed, met on 1/2 seeds (+1.00, -0.30)" in line
    assert "γ 25 % within 1.0 point of the data-matched individual model: met, met on 2/2 seeds" in line
    assert "γ 75 % (unseen) not below the previous default: missed, met on 1/2 seeds (+0.00, -1.00)" in line
    assert "previous default" not in rb.full_width_targets(runs, base, matched)
