"""fit under torch.distributed (gloo, two CPU processes): ranks stay in lock-step, and a torchrun
fit is the single-process fit with the ranks' batches put together."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import neumeta as nm
from neumeta.cli import leave_process_group
from neumeta.data import TensorLoader

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

WORKER = Path(__file__).with_name("fit_worker.py")


def _worker(rank: int, world: int, rendezvous: str, out: str):
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(100 + rank)  # each rank's INR starts elsewhere: fit must share rank 0's
    manifold = nm.WeightManifold(nm.WidthSpace(base, x[:2]), nm.INRConfig(hidden=16, depth=2, frequencies=2))
    loader = TensorLoader(x, y, batch_size=8, rank=rank, world_size=world)
    config = nm.FitConfig(steps=6, prefit_steps=2, eval_every=100)
    torch.save({k: v.clone() for k, v in manifold.state_dict().items()}, f"{out}/init{rank}.pt")
    nm.fit(manifold, nm.ClassificationTask(10), loader, None, config, progress=False)
    torch.save({k: v.clone() for k, v in manifold.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.save(torch.get_rng_state(), f"{out}/rng{rank}.pt")
    leave_process_group(finished=True)


def test_two_processes_started_apart_end_with_identical_manifolds(tmp_path):
    rendezvous = (tmp_path / "rendezvous").as_uri()
    mp.spawn(_worker, args=(2, rendezvous, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    start0, start1 = (torch.load(tmp_path / f"init{r}.pt") for r in (0, 1))
    assert any(not torch.equal(start0[k], start1[k]) for k in start0)  # they did start apart
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], start0[k]) for k in a)
    # the same draws on every rank (widths, noise): only the data shards differ
    assert torch.equal(torch.load(tmp_path / "rng0.pt"), torch.load(tmp_path / "rng1.pt"))


def _run(command, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    # the head of stderr too: a rank's own error comes before torchrun's long report of it
    err = done.stderr if len(done.stderr) <= 6000 else f"{done.stderr[:3000]}\n[...]\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{err}"


def test_torchrun_with_uneven_validation_shards_matches_one_process_with_twice_the_batch(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"no torchrun beside {sys.executable}")
    _run([str(torchrun), "--standalone", "--nnodes", "1", "--nproc-per-node", "2", str(WORKER), "ranks",
          str(tmp_path)], tmp_path)
    _run([sys.executable, str(WORKER), "single", str(tmp_path)], tmp_path)
    single = load_file(str(tmp_path / "single.safetensors"))
    single_record = json.loads((tmp_path / "single.json").read_text())
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in single:  # the trained INR (inr.*) and the returned best EMA (ema.*)
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][key], single[key], rtol=0, atol=1e-5)
    # every rank saw the scores of the whole validation set, not of its own shard, and chose alike
    assert records[0] == records[1]
    assert records[0]["best_step"] == single_record["best_step"]
    assert records[0]["rollbacks"] == single_record["rollbacks"]
    assert [row["step"] for row in records[0]["history"]] == [row["step"] for row in single_record["history"]]
    for row, expected in zip(records[0]["history"], single_record["history"]):
        assert row == pytest.approx(expected, rel=1e-6)
    assert records[0]["best_score"] == pytest.approx(single_record["best_score"], rel=1e-6)
    # rank 0 wrote the checkpoint; every rank continues from it (finished: each returns its result)
    _run([str(torchrun), "--standalone", "--nnodes", "1", "--nproc-per-node", "2", str(WORKER), "ranks",
          str(tmp_path), "--resume"], tmp_path)
    for r in (0, 1):
        resumed = load_file(str(tmp_path / f"rank{r}_resumed.safetensors"))
        assert all(torch.equal(resumed[key], ranks[r][key]) for key in ranks[r])
        assert json.loads((tmp_path / f"rank{r}_resumed.json").read_text())["history"] == records[r]["history"]
