"""A fit killed with SIGKILL (if possible while it writes its checkpoint) and resumed ends bit for
bit where an uninterrupted one does, and leaves no temporary file behind."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neumeta.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from fit_worker import KILL_STEPS  # noqa: E402

WORKER = Path(__file__).with_name("fit_worker.py")
TOTAL_STEPS = 20 + KILL_STEPS  # the worker's pre-fit + joint steps

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def _worker(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), "kill", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _finish(process: subprocess.Popen, timeout=180) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]


def _kill_mid_run(process: subprocess.Popen, folder: Path, ckpt: Path) -> bool:
    """SIGKILL once a checkpoint exists, at a moment a later one is being written if one is seen
    within a few seconds (best effort); True when a temporary file was seen at the kill."""
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        assert process.poll() is None, "the worker ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.005)
    until = time.monotonic() + 3
    caught = False
    while time.monotonic() < until and process.poll() is None:
        if any(name.startswith(".fit.ckpt.") and name.endswith(".tmp") for name in os.listdir(folder)):
            caught = True
            break
    assert process.poll() is None, "the worker finished before it could be killed; give it more steps"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return caught


def test_a_killed_fit_resumes_to_the_uninterrupted_result(tmp_path):
    unbroken_dir, broken_dir = tmp_path / "unbroken", tmp_path / "broken"
    _finish(_worker(unbroken_dir))

    ckpt = broken_dir / "fit.ckpt"
    caught_a_write = _kill_mid_run(_worker(broken_dir), broken_dir, ckpt)
    saved_step = load_checkpoint(ckpt)["state"]["step"]  # the last complete checkpoint is intact
    assert 20 <= saved_step < TOTAL_STEPS
    assert not (broken_dir / "final.safetensors").exists()

    _finish(_worker(broken_dir, "--resume"))
    expected = load_file(str(unbroken_dir / "final.safetensors"))
    got = load_file(str(broken_dir / "final.safetensors"))
    assert sorted(got) == sorted(expected)
    for key in expected:  # the trained INR and the returned best EMA
        assert torch.equal(got[key], expected[key]), key
    assert (broken_dir / "final.json").read_text() == (unbroken_dir / "final.json").read_text()
    left = [p.name for p in broken_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert left == [], f"temporary files left behind (kill during a write: {caught_a_write}): {left}"
