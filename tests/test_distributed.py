"""fit under torch.distributed (gloo, two CPU processes): ranks stay in lock-step."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import neumeta as nm
from neumeta.data import TensorLoader


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = nm.create_model("lenet", conv1=4, conv2=6, fc1=16, fc2=8)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    manifold = nm.WeightManifold(nm.WidthSpace(base, x[:2]), nm.INRConfig(hidden=16, depth=3, frequencies=2))
    loader = TensorLoader(x, y, batch_size=8, rank=rank, world_size=world)
    config = nm.FitConfig(steps=6, prefit_steps=2, eval_every=100)
    torch.save({k: v.clone() for k, v in manifold.state_dict().items()}, f"{out}/init{rank}.pt")
    nm.fit(manifold, nm.ClassificationTask(10), loader, None, config, progress=False)
    torch.save({k: v.clone() for k, v in manifold.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_two_processes_end_with_identical_manifolds(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    start = torch.load(tmp_path / "init0.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], start[k]) for k in a)
