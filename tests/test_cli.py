"""The `neumeta` command: every option documented, one YAML file for every command, flag
precedence, fit and sample end to end."""
import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import neumeta as nm
from neumeta import cli
from neumeta.cli import COMMANDS, main, parse_command
from neumeta.config import ConfigError, add_options, load_config
from neumeta.experiment import DemoConfig
from neumeta.data.fashion_mnist import fashion_mnist_available

DEMO_YAML = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
needs_fashion = pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Fashion-MNIST files "
                                   "(CI installs dataset-fashion-mnist)")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    parser = argparse.ArgumentParser()
    add_options(parser, COMMANDS[command][0])
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and not action.help.startswith(" (default"), action.option_strings
            assert action.option_strings[0] in text


def _config(tmp_path, yaml_text, flags):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    parser = argparse.ArgumentParser()
    add_options(parser, DemoConfig)
    return load_config(DemoConfig, parser.parse_args(["--config", str(path)] + flags))


def test_yaml_then_flags(tmp_path):
    c = _config(tmp_path, "epochs: 2\nfit: {steps: 10, lr: 0.01}\ncoords: {noise: 0.25}\n", ["--steps", "20", "--seed", "3"])
    assert (c.epochs, c.fit.steps, c.fit.lr, c.coords.noise, c.fit.seed) == (2, 20, 0.01, 0.25, 3)


def test_optional_width_list_flag_takes_widths(tmp_path):
    assert _config(tmp_path, "", []).fit.select_widths is None
    assert _config(tmp_path, "", ["--select-widths", "1", "0.25"]).fit.select_widths == (1.0, 0.25)
    assert _config(tmp_path, "fit: {select_widths: [0.5]}\n", []).fit.select_widths == (0.5,)


def test_unknown_yaml_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="stepz"):
        _config(tmp_path, "fit: {stepz: 10}\n", [])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_one_yaml_file_configures_every_command(command):
    func, config = parse_command([command, "--config", str(DEMO_YAML)])
    assert func is COMMANDS[command][1] and isinstance(config, COMMANDS[command][0])


def test_each_command_takes_its_own_options_from_the_shared_file():
    raw = yaml.safe_load(DEMO_YAML.read_text())
    _, base = parse_command(["train-base", "--config", str(DEMO_YAML)])
    assert (base.model, base.epochs, base.lr, base.data.val_size) == (raw["model"], raw["epochs"], raw["lr"],
                                                                      raw["data"]["val_size"])
    _, fit = parse_command(["fit", "--config", str(DEMO_YAML), "--steps", "7"])
    assert (fit.fit.prefit_steps, fit.fit.steps, fit.coords.noise) == (raw["fit"]["prefit_steps"], 7,
                                                                       raw["coords"]["noise"])
    assert fit.recipe == raw["recipe"] and fit.fit.eval_widths == tuple(raw["fit"]["eval_widths"])
    _, sample = parse_command(["sample", "--config", str(DEMO_YAML)])
    assert (sample.samples, sample.calibrate, sample.data.batch_size) == (raw["samples"], raw["calibrate"],
                                                                          raw["data"]["batch_size"])
    _, evaluate = parse_command(["eval", "--config", str(DEMO_YAML), "--split", "val"])
    assert (evaluate.widths, evaluate.split) == (tuple(raw["widths"]), "val")
    _, demo = parse_command(["demo", "--config", str(DEMO_YAML)])
    assert (demo.out_dir, demo.fit.steps, demo.fit.min_width) == (raw["out_dir"], raw["fit"]["steps"],
                                                                  raw["fit"]["min_width"])


@pytest.mark.parametrize("command", ["train-base", "fit", "sample", "eval", "demo"])
@pytest.mark.parametrize("typo, path", [("stepz: 10\n", "stepz"), ("fit: {stepz: 10}\n", "fit.stepz"),
                                        ("data: {val_sise: 10}\n", "data.val_sise")])
def test_a_key_of_no_command_is_refused_by_every_command_with_its_path(tmp_path, command, typo, path):
    file = tmp_path / "typo.yaml"
    file.write_text(DEMO_YAML.read_text() + typo)
    with pytest.raises(ConfigError, match=rf"unknown option {path} in {file}: no command has it"):
        parse_command([command, "--config", str(file)])


def test_the_command_imports_no_benchmark_code_nor_matplotlib():
    code = ("import sys\nfrom neumeta.cli import main\n"
            "for argv in (['--help'], ['fit', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            # torch and torch-pruning ship modules of their own named *benchmark*: not ours
            "print(sorted(m for m in sys.modules if ('benchmark' in m and m.split('.')[0] not in ('torch', "
            "'torch_pruning')) or m.split('.')[0] == 'matplotlib'))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


@needs_fashion
def test_a_short_fit_ends_with_a_manifold_and_a_warning_not_a_traceback(tmp_path, capsys):
    base = nm.save_model(nm.create_model("lenet"), tmp_path / "base.safetensors")
    out = tmp_path / "m.neumeta"
    # a few steps cannot leave chance; a wide collapse margin makes "at chance" certain
    main(["fit", "--base", str(base), "--out", str(out), "--prefit-steps", "2", "--steps", "3", "--eval-every", "5",
          "--train-size", "256", "--val-size", "500", "--batch-size", "64", "--hidden", "16", "--depth", "2",
          "--frequencies", "2", "--collapse-margin", "0.5"])  # returns: exit status 0
    printed = capsys.readouterr()
    assert "wrote" in printed.out and nm.load(out).space.full
    assert printed.err.count("never left chance") == 1
    warning = next(line for line in printed.err.splitlines() if "never left chance" in line)
    assert warning.startswith("warning: ") and "at width 1" in warning and "--steps and --prefit-steps" in warning


def test_a_divergence_is_one_error_line_naming_the_way_out(monkeypatch, capsys):
    """The message is fit's (test_recipe.py checks it names --no-guard); here: how the command shows it."""
    def diverging(config):
        raise nm.DivergenceError("fit diverged at step 8: ...; to fit on without rollbacks turn the divergence "
                                 "guard off (guard=False, --no-guard)")
    monkeypatch.setitem(cli.COMMANDS, "fit", (cli.FitCommandConfig, diverging, "fit"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fit diverged at step 8") and "--no-guard" in err and len(err.splitlines()) == 1


def test_invalid_value_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="positions"):
        _config(tmp_path, "coords: {positions: middle}\n", [])


def test_sample_command_writes_a_loadable_network(small_manifold, tmp_path, capsys):
    path = small_manifold.save(tmp_path / "m.neumeta")
    out = tmp_path / "small.safetensors"
    main(["sample", "--manifold", str(path), "--width", "conv1=4,fc1=0.5", "--samples", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    model = nm.load_model(out)
    assert model.conv1.out_channels == 4 and model.fc1.out_features == 64
    assert f"{sum(p.numel() for p in model.parameters()):,}" in printed


def test_sample_command_reports_flops_of_both_networks(small_manifold, tmp_path, capsys):
    """The saving in compute is reported as measured, next to the full model's."""
    import torch
    from neumeta.flops import count_flops
    path = small_manifold.save(tmp_path / "m.neumeta")
    out = tmp_path / "half.safetensors"
    main(["sample", "--manifold", str(path), "--width", "0.5", "--samples", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    x = torch.zeros(1, 1, 28, 28)
    small, full = count_flops(nm.load_model(out), x), count_flops(small_manifold.space.model, x)
    assert small < full
    assert f"FLOPs per sample: {small:,} of {full:,}" in printed


def test_sample_command_calibrates_by_default_and_names_a_mismatching_dataset(small_manifold, tmp_path, capsys):
    import torch
    if not fashion_mnist_available():
        pytest.skip("needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")
    path = small_manifold.save(tmp_path / "m.neumeta")
    main(["sample", "--manifold", str(path), "--width", "0.5", "--samples", "1", "--calibrate", "3",
          "--out", str(tmp_path / "a.safetensors")])
    assert "calibrated: 5 layers on 3 training batches of fashion-mnist" in capsys.readouterr().out
    main(["sample", "--manifold", str(path), "--width", "0.5", "--samples", "1", "--calibrate", "0",
          "--out", str(tmp_path / "b.safetensors")])
    assert "calibrated" not in capsys.readouterr().out
    x = torch.zeros(2, 3, 32, 32)
    cifar = nm.WeightManifold(nm.WidthSpace(nm.create_model("resnet20"), x, groups="paper"),
                              nm.INRConfig(hidden=8, depth=2, frequencies=2, grid=False))
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--manifold", str(cifar.save(tmp_path / "c.neumeta")), "--width", "0.5", "--samples", "1",
              "--out", str(tmp_path / "c.safetensors")])
    assert exit_.value.code == 2
    assert re.search(r"\(3, 32, 32\).*fashion-mnist.*\(1, 28, 28\).*--calibrate 0", capsys.readouterr().err)


def test_sample_command_reports_bad_width(small_manifold, tmp_path, capsys):
    path = small_manifold.save(tmp_path / "m.neumeta")
    with pytest.raises(SystemExit):
        main(["sample", "--manifold", str(path), "--width", "conv9=4"])
    assert "conv9" in capsys.readouterr().err


def test_smooth_command_keeps_the_function(tmp_path, capsys):
    import torch
    model = nm.create_model("lenet")
    src = nm.save_model(model, tmp_path / "base.safetensors")
    out = tmp_path / "smooth.safetensors"
    main(["smooth", "--model", str(src), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "conv1" in printed and "total" in printed
    permuted = nm.load_model(out)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(permuted(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(permuted.fc1.weight, model.fc1.weight)


@pytest.mark.parametrize("path", sorted((DEMO_YAML.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid_for_its_command(path):
    """A typo in a shipped config (an option that does not exist, a wrong type) fails here, not hours
    into a run."""
    command = "compare" if path.name.startswith("compare") else "demo"
    _, config = parse_command([command, "--config", str(path)])
    # runs/ is ignored; benchmarks/results/ keeps a long comparison's numbers between sessions
    assert config.out_dir and config.out_dir.startswith(("runs/", "benchmarks/results/"))
    if config.out_dir.startswith("benchmarks/"):  # but not the models it trains
        root = Path(__file__).resolve().parents[1]
        ignored = (root / "benchmarks" / "results" / ".gitignore").read_text()
        assert "*.safetensors" in ignored.split() and "*.ckpt" in ignored.split()
        if shutil.which("git") and (root / ".git").exists():  # a clone: ask git itself
            kept, rebuilt = f"{config.out_dir}/seed0/neumeta.json", f"{config.out_dir}/seed0/base.json"
            check = subprocess.run(["git", "check-ignore", kept, rebuilt], cwd=root, capture_output=True, text=True)
            assert check.stdout.split() == [rebuilt], check.stdout


def test_parse_overrides_reads_typed_values_per_section_and_names_a_bad_key():
    from neumeta.config import parse_overrides
    sections = {"fit": nm.FitConfig, "coords": nm.CoordConfig}
    parsed = parse_overrides(["lr=1e-4", "sandwich=false", "coords.noise=0", "eval_widths=[1, 0.5]"],
                             sections, default="fit")
    assert parsed == {"fit": {"lr": 1e-4, "sandwich": False, "eval_widths": (1.0, 0.5)}, "coords": {"noise": 0.0}}
    assert isinstance(parsed["fit"]["lr"], float)  # YAML 1.1 reads 1e-4 as a string; the field's type decides
    for bad, named in [("learning_rate=1", "learning_rate"), ("lr", "lr"), ("steps=many", "steps"),
                       ("inr.hidden=8", "inr.hidden")]:
        with pytest.raises(ConfigError, match=named):
            parse_overrides([bad], sections, default="fit")
