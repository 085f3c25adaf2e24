"""Files: manifolds and sampled networks survive a round trip; bad files are named."""
import subprocess
import sys
import textwrap

import pytest
import torch

import neumeta as nm


def test_sampled_model_reloads_in_a_fresh_process(small_manifold, example, tmp_path):
    module = small_manifold.sample({"conv1": 5, "fc1": 0.5}, samples=3)
    path = nm.save_model(module, tmp_path / "small.safetensors")
    torch.save(example, tmp_path / "x.pt")
    expected = module(example)
    script = textwrap.dedent(f"""
        import torch
        from neumeta.io import load_model
        model = load_model({str(path)!r})
        torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_manifold_round_trip(small_manifold, tmp_path):
    path = small_manifold.save(tmp_path / "m.neumeta")
    loaded = nm.load(path)
    for width in (1.0, 0.5):
        a, b = small_manifold.generate(width), loaded.generate(width)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert loaded.space.full == small_manifold.space.full


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_manifold_file_is_named(small_manifold, tmp_path, damage):
    path = small_manifold.save(tmp_path / "m.neumeta")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 100, "empty": b""}[damage])
    with pytest.raises(ValueError, match="m.neumeta"):
        nm.load(path)


def test_wrong_kind_of_file_is_named(small_manifold, tmp_path):
    path = nm.save_model(small_manifold.sample(0.5, samples=1), tmp_path / "net.safetensors")
    with pytest.raises(ValueError, match="neumeta-manifold"):
        nm.load(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.neumeta"):
        nm.load(tmp_path / "nothing.neumeta")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    from neumeta.io import atomic_write
    target = tmp_path / "ckpt"
    target.write_text("good")

    def failing(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_sampled_network_of_a_custom_base_on_few_groups_round_trips(tmp_path):
    """Groups left out of the WidthSpace keep the base model's (custom) widths in the file."""
    torch.manual_seed(0)
    base = nm.create_model("resnet20", stages=(8, 16, 24)).eval()
    x = torch.randn(2, 3, 32, 32)
    manifold = nm.WeightManifold(nm.WidthSpace(base, x, groups="paper"),
                                 nm.INRConfig(hidden=8, depth=2, frequencies=2))
    small = manifold.sample(0.5, samples=1)
    assert small.layer3[2].conv1.out_channels == 12 and small.layer1[0].conv1.out_channels == 8
    loaded = nm.load_model(nm.save_model(small, tmp_path / "small.safetensors"))
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_atomic_write_names_its_temporary_file_after_the_process(tmp_path):
    import os
    from neumeta.io import atomic_write
    seen = []
    atomic_write(tmp_path / "ckpt", lambda tmp: (seen.append(os.path.basename(tmp)), open(tmp, "w").write("x")))
    assert seen[0].startswith(f".ckpt.{os.getpid()}.") and seen[0].endswith(".tmp")


def test_atomic_write_removes_temporary_files_of_dead_processes_only(tmp_path):
    import os
    from neumeta.io import atomic_write
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid now names no process (reaped)
    stale = tmp_path / f".ckpt.{finished.pid}.abc123.tmp"
    live = tmp_path / f".ckpt.{os.getpid()}.def456.tmp"  # a write under way in a live process
    other_target = tmp_path / f".other.{finished.pid}.xyz.tmp"  # not this file's to judge
    for p in (stale, live, other_target):
        p.write_text("half")
    atomic_write(tmp_path / "ckpt", lambda tmp: open(tmp, "w").write("good"))
    assert not stale.exists() and live.exists() and other_target.exists()
    assert (tmp_path / "ckpt").read_text() == "good"
