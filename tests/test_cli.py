"""The `neumeta` command: every option documented, YAML + flag precedence, sample end to end."""
import argparse

import pytest

import neumeta as nm
from neumeta.cli import COMMANDS, _add_options, load_config, main
from neumeta.experiment import DemoConfig


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    parser = argparse.ArgumentParser()
    _add_options(parser, COMMANDS[command][0])
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and not action.help.startswith(" (default"), action.option_strings
            assert action.option_strings[0] in text


def _config(tmp_path, yaml_text, flags):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    parser = argparse.ArgumentParser()
    _add_options(parser, DemoConfig)
    return load_config(DemoConfig, parser.parse_args(["--config", str(path)] + flags))


def test_yaml_then_flags(tmp_path):
    c = _config(tmp_path, "epochs: 2\nfit: {steps: 10, lr: 0.01}\ncoords: {noise: 0.25}\n", ["--steps", "20", "--seed", "3"])
    assert (c.epochs, c.fit.steps, c.fit.lr, c.coords.noise, c.fit.seed) == (2, 20, 0.01, 0.25, 3)


def test_optional_width_list_flag_takes_widths(tmp_path):
    assert _config(tmp_path, "", []).fit.select_widths is None
    assert _config(tmp_path, "", ["--select-widths", "1", "0.25"]).fit.select_widths == (1.0, 0.25)
    assert _config(tmp_path, "fit: {select_widths: [0.5]}\n", []).fit.select_widths == (0.5,)


def test_unknown_yaml_key_is_named(tmp_path):
    with pytest.raises(SystemExit, match="stepz"):
        _config(tmp_path, "fit: {stepz: 10}\n", [])


def test_invalid_value_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="positions"):
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
    import os
    import torch
    if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
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
                              nm.INRConfig(hidden=8, depth=2, frequencies=2))
    with pytest.raises(SystemExit, match=r"\(3, 32, 32\).*fashion-mnist.*\(1, 28, 28\).*--calibrate 0"):
        main(["sample", "--manifold", str(cifar.save(tmp_path / "c.neumeta")), "--width", "0.5", "--samples", "1"])


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
