"""FLoRA under torch.distributed on CPU (gloo), 2 processes each: DDP and FSDP2.

DDP: the adapter gradients over a global batch split across 2 ranks equal the single-process
gradients on the whole batch (DDP averages per-rank means of equal halves); an adapter saved by
rank 0 with ``save_flora`` after the optimizer step loads on every rank and reproduces that
rank's own DDP model.

FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per FLoRA layer plus the root; frozen
base weights and trainable adapters share units): the same gradient equality, and the full
state dict gathered with ``get_model_state_dict`` saves with ``save_flora`` from rank 0 and
loads on every rank.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import flora_kernels as fk
from flora_kernels.layers import flora_layers

WORLD = 2
pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="torch.distributed with gloo is unavailable"
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dw(torch.tanh(self.conv(x)))).mean((2, 3))
        return self.head(torch.tanh(self.fc(x)))


def make_model() -> nn.Module:
    """The same adapted model on every process (fixed seeds, non-zero cores)."""
    torch.manual_seed(0)
    model = fk.inject_flora(
        Net(), fk.FLoRAConfig(rank=4, target_modules=["conv", "dw", "fc"], modules_to_save=["head"], backend="reference")
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in flora_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=g) * 0.3)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randn(8, 2, generator=g)


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = batch()
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        F.mse_loss(ddp(xs), ys).backward()
        torch.save(trainable_grads(model), os.path.join(out_dir, f"grads{rank}.pt"))
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
        path = os.path.join(out_dir, "adapter")
        if rank == 0:
            fk.save_flora(model, path)
        dist.barrier()
        fresh = Net()  # a new base model; load_flora injects and loads the adapter
        with torch.no_grad():
            fresh.load_state_dict({k: v for k, v in _base_state(model).items()})
        fk.load_flora(fresh, path)
        mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
        loaded = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
        assert mine.keys() == loaded.keys(), (sorted(mine), sorted(loaded))
        for n, p in mine.items():
            assert torch.equal(p, loaded[n]), n
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain base model's state dict from an adapted model (``<layer>.base_layer.`` unwrapped)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".flora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_adapter_grads_equal_single_process_and_rank0_save_loads_everywhere(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model = make_model()
    x, y = batch()
    F.mse_loss(model(x), y).backward()
    single = trainable_grads(model)
    assert any(".flora_core." in n for n in single) and "head.weight" in single
    for rank in range(WORLD):
        ddp = torch.load(tmp_path / f"grads{rank}.pt")
        assert ddp.keys() == single.keys()
        for n in single:
            torch.testing.assert_close(ddp[n], single[n], atol=1e-6, rtol=1e-5, msg=f"rank {rank}: {n}")


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        model = make_model()
        for _, layer in flora_layers(model):  # one FSDP unit per adapted layer, then the root
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x, y = batch()
        F.mse_loss(model(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]).backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(grads, os.path.join(out_dir, f"fsdp_grads{rank}.pt"))
        # save_flora wants plain tensors: gather a full state dict (a collective, every rank
        # calls it), load it into an unsharded replica on rank 0, save from there.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        path = os.path.join(out_dir, "fsdp_adapter")
        if rank == 0:
            replica = make_model()
            replica.load_state_dict(full)
            fk.save_flora(replica, path)
        dist.barrier()
        fresh = Net()
        fresh.load_state_dict(_base_state(make_model()))
        fk.load_flora(fresh, path)
        for n, p in fresh.named_parameters():
            if p.requires_grad:
                assert torch.equal(p, full[n]), n
    finally:
        dist.destroy_process_group()


def test_fsdp2_fully_shard_adapter_grads_equal_single_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP in this torch build")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model = make_model()
    x, y = batch()
    F.mse_loss(model(x), y).backward()
    single = trainable_grads(model)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"fsdp_grads{rank}.pt")
        assert got.keys() == single.keys()
        for n in single:
            torch.testing.assert_close(got[n], single[n], atol=1e-6, rtol=1e-5, msg=f"rank {rank}: {n}")
