"""What the `neumeta` command refuses, and when: before any work is done, as one `error:` line
and exit code 2, without touching an earlier run's files."""
import importlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neumeta as nm
from neumeta import cli
from neumeta.cli import main, parse_command
from neumeta.config import ConfigError
from neumeta.data.fashion_mnist import fashion_mnist_available

needs_fashion = pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Fashion-MNIST files "
                                   "(CI installs dataset-fashion-mnist)")
TINY = ["--prefit-steps", "2", "--steps", "3", "--eval-every", "5", "--train-size", "256", "--val-size", "500",
        "--batch-size", "64", "--hidden", "16", "--depth", "2", "--frequencies", "2"]


def refused(argv, capsys) -> str:
    """The one error line the command printed; fails unless it exited with code 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Any data loading or fitting fails the test: a refusal must come before the work."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the input was checked")
    monkeypatch.setattr(cli, "load_data", work)
    monkeypatch.setattr(cli, "fit", work)


def _files(*paths):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny `neumeta fit`: (its base, manifold, checkpoint)."""
    if not fashion_mnist_available():
        pytest.skip("needs the Fashion-MNIST files (CI installs dataset-fashion-mnist)")
    folder = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    base = nm.save_model(nm.create_model("lenet"), folder / "base.safetensors")
    out = folder / "m.neumeta"
    main(["fit", "--base", str(base), "--out", str(out), "--seed", "3"] + TINY)
    return base, out, Path(f"{out}.ckpt")


# --------------------------------------------------------------------------- seeds and earlier runs
@needs_fashion
def test_the_same_seed_fits_the_same_manifold(fitted, tmp_path):
    base, out, _ = fitted
    torch.manual_seed(12345)  # whatever drew from torch's generator before does not matter
    again = tmp_path / "again.neumeta"
    main(["fit", "--base", str(base), "--out", str(again), "--seed", "3"] + TINY)
    first, second = load_file(str(out)), load_file(str(again))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@needs_fashion
def test_a_rerun_without_resume_or_overwrite_is_refused_and_replaces_nothing(fitted, capsys):
    base, out, ckpt = fitted
    before = _files(out, ckpt)
    err = refused(["fit", "--base", str(base), "--out", str(out), "--seed", "3"] + TINY, capsys)
    assert str(ckpt) in err and "--resume" in err and "--overwrite" in err
    assert _files(out, ckpt) == before


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys, no_work):
    base = nm.save_model(nm.create_model("lenet"), tmp_path / "base.safetensors")
    err = refused(["fit", "--base", str(base), "--out", str(tmp_path / "m.neumeta"), "--resume"], capsys)
    assert "no checkpoint" in err and str(tmp_path / "m.neumeta.ckpt") in err


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys, no_work):
    base = nm.save_model(nm.create_model("lenet"), tmp_path / "base.safetensors")
    err = refused(["fit", "--base", str(base), "--out", str(tmp_path / "m.neumeta"), "--resume", "--overwrite"],
                  capsys)
    assert "--resume" in err and "--overwrite" in err


@needs_fashion
def test_resume_with_another_base_model_is_refused(fitted, tmp_path, capsys):
    _, out, ckpt = fitted
    before = _files(out, ckpt)
    torch.manual_seed(99)
    other = nm.save_model(nm.create_model("lenet"), tmp_path / "other.safetensors")
    err = refused(["fit", "--base", str(other), "--out", str(out), "--seed", "3", "--resume"] + TINY, capsys)
    assert "base" in err and str(ckpt) in err
    assert _files(out, ckpt) == before


# --------------------------------------------------------------------------- options and devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device cuda is valid here")
def test_a_missing_device_is_refused_before_the_data_loads(tmp_path, capsys, no_work):
    base = nm.save_model(nm.create_model("lenet"), tmp_path / "base.safetensors")
    err = refused(["fit", "--base", str(base), "--out", str(tmp_path / "m.neumeta"), "--device", "cuda"], capsys)
    assert "'cuda'" in err and "CUDA" in err and "--device cpu" in err


def test_a_device_that_is_no_device_is_refused(capsys, no_work):
    assert "not a torch device" in refused(["eval", "--device", "gpu0"], capsys)


def test_a_yaml_value_of_the_wrong_type_is_named_before_any_work(tmp_path, capsys, no_work):
    config = tmp_path / "c.yaml"
    config.write_text('fit: {lr: "fast"}\n')
    err = refused(["fit", "--config", str(config), "--out", str(tmp_path / "m.neumeta")], capsys)
    assert "fit.lr" in err and "'fast'" in err and "a number" in err


@pytest.mark.parametrize("yaml_text, read", [("fit: {lr: 1e-3}\n", lambda c: c.fit.lr == 1e-3),
                                             ("fit: {steps: 20}\n", lambda c: c.fit.steps == 20),
                                             ("fit: {eval_widths: [1, 0.5]}\n",
                                              lambda c: c.fit.eval_widths == (1.0, 0.5))])
def test_yaml_values_of_the_right_type_are_taken(tmp_path, yaml_text, read):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert read(parse_command(["fit", "--config", str(config)])[1])


@pytest.mark.parametrize("yaml_text, named", [("fit: {steps: 2.5}\n", "fit.steps"),
                                              ("fit: {guard: maybe}\n", "fit.guard"),
                                              ("fit: {eval_widths: 0.5}\n", "fit.eval_widths"),
                                              ("data: {batch_size: [64]}\n", "data.batch_size")])
def test_every_typed_option_is_checked(tmp_path, yaml_text, named):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        parse_command(["fit", "--config", str(config)])


def test_only_fit_runs_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="only `neumeta fit` runs under torchrun"):
        parse_command(["sample"])


# --------------------------------------------------------------------------- widths
@pytest.mark.parametrize("width, named", [("1e6", "1000000"), ("inf", "inf"), ("nan", "nan"), ("-0.5", "-0.5"),
                                          ("abc", "abc"), ("fc1=inf", "inf")])
def test_an_impossible_width_is_one_error_line(small_manifold, tmp_path, capsys, width, named):
    path = small_manifold.save(tmp_path / "m.neumeta")
    out = tmp_path / "s.safetensors"
    err = refused(["sample", "--manifold", str(path), "--width", width, "--samples", "1", "--calibrate", "0",
                   "--out", str(out)], capsys)
    assert "width" in err and named in err
    assert not out.exists()


def test_eval_checks_every_width_before_the_data_loads(small_manifold, tmp_path, capsys, no_work):
    path = small_manifold.save(tmp_path / "m.neumeta")
    assert "inf" in refused(["eval", "--manifold", str(path), "--widths", "0.5", "inf"], capsys)


# --------------------------------------------------------------------------- base models
@needs_fashion
@pytest.mark.parametrize("model, kwargs, says", [("resnet20", {}, "cannot read this dataset's inputs"),
                                                 ("lenet", {"num_classes": 4}, "10 classes")])
def test_a_base_model_that_does_not_fit_the_data_is_refused_before_fitting(tmp_path, capsys, monkeypatch,
                                                                           model, kwargs, says):
    monkeypatch.setattr(cli, "fit", lambda *a, **k: pytest.fail("fit started with a base that cannot fit"))
    base = nm.save_model(nm.create_model(model, **kwargs), tmp_path / "base.safetensors")
    err = refused(["fit", "--base", str(base), "--out", str(tmp_path / "m.neumeta")] + TINY, capsys)
    assert says in err and str(base) in err


# --------------------------------------------------------------------------- output paths
@pytest.mark.parametrize("command", ["fit", "train-base", "sample", "smooth"])
def test_an_output_path_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, no_work, command,
                                                                   small_manifold):
    inputs = {"fit": ["--base", str(nm.save_model(nm.create_model("lenet"), tmp_path / "b.safetensors"))],
              "train-base": [], "sample": ["--manifold", str(small_manifold.save(tmp_path / "m.neumeta"))],
              "smooth": ["--model", "lenet"]}[command]
    err = refused([command, *inputs, "--out", str(tmp_path)], capsys)
    assert "is a folder" in err and str(tmp_path) in err


def test_an_output_under_a_file_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("not a folder")
    err = refused(["train-base", "--out", str(tmp_path / "file" / "base.safetensors")], capsys)
    assert "is a file" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, unwritable even as root, is Linux's")
def test_an_output_path_that_cannot_be_written_is_refused_before_training(capsys, no_work):
    err = refused(["train-base", "--out", "/proc/neumeta-base.safetensors"], capsys)
    assert "cannot write in /proc" in err


# --------------------------------------------------------------------------- smooth, Ctrl-C
def test_smooth_checks_the_function_on_inputs_that_see_every_weight(tmp_path, monkeypatch):
    smooth_module = importlib.import_module("neumeta.smooth")  # the package re-exports the function
    seen = []
    real = smooth_module.smooth

    def spying(model, example, **kwargs):
        seen.append(example)
        return real(model, example, **kwargs)
    monkeypatch.setattr(smooth_module, "smooth", spying)
    main(["smooth", "--model", "lenet", "--out", str(tmp_path / "s.safetensors")])
    (example,) = seen
    assert example.shape == (2, 1, 28, 28) and example.std() > 0.5


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "fit", (cli.FitCommandConfig, interrupted, "fit"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit"])
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and len(err.strip().splitlines()) == 1 and "--resume" in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy(config):
        raise ZeroDivisionError("a bug")
    monkeypatch.setitem(cli.COMMANDS, "fit", (cli.FitCommandConfig, buggy, "fit"))
    with pytest.raises(ZeroDivisionError):
        main(["fit"])
