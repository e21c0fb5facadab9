"""The user's own loop under DistributedDataParallel (two CPU processes, gloo):
one S2H step on two half batches gives every rank the gradients and the mask
update of one process on the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import s2h_fx

from helpers import build

WORLD = 2
BATCH = 8  # split evenly over the ranks


class GNNet(nn.Module):
    """GroupNorm (per sample) instead of BatchNorm, so that half batches on two ranks
    compute exactly what the whole batch does in one process; a residual and a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.side = nn.Conv2d(16, 8, 1)
        self.down = nn.Sequential(nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.block(h)
        h = torch.cat([h, self.side(h)], 1)
        h = self.down(h)
        return self.head(h.mean((2, 3)))


def _setup() -> tuple[s2h_fx.Pruner, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GNNet()
    x = torch.randn(BATCH, 3, 12, 12)
    y = torch.randint(0, 5, (BATCH,))
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x[:2],))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # fractional soft masks, hard widths below full
        for m in pruner.masks().values():
            m.logits.copy_(torch.randn(m.logits.shape, generator=gen))
    pruner.train()
    return pruner, x, y


def _step(pruner: s2h_fx.Pruner, forward, x: torch.Tensor, y: torch.Tensor) -> dict:
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    soft, hard = forward(x)
    losses = pruner.losses((soft, hard), y)
    pruner.backward(losses)
    grads = {n: p.grad.detach().clone() for n, p in pruner.named_parameters()}
    opt.step()
    pruner.mask_step()
    soft2, hard2 = forward(x)  # the next step's forward at the updated widths
    return {"grads": grads,
            "params": {n: p.detach().clone() for n, p in pruner.named_parameters()},
            "widths": pruner.mask_widths(),
            "soft2": soft2.detach(), "hard2": hard2.detach()}


def _env(port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if Path("/sys/class/net/lo").exists():  # gloo on loopback, whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _worker(rank: int, port: int, out: str) -> None:
    _env(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        pruner, x, y = _setup()
        ddp = DistributedDataParallel(pruner)
        share = BATCH // WORLD
        rows = slice(rank * share, (rank + 1) * share)
        result = _step(pruner, ddp, x[rows], y[rows])
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_ddp_step_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    pruner, x, y = _setup()
    ref = _step(pruner, pruner, x, y)
    logits = {n for n, _ in pruner.named_parameters() if n.endswith(".logits")}
    assert logits and set(ref["grads"]) > logits
    for rank, got in enumerate(ranks):
        for name, g in ref["grads"].items():
            assert torch.allclose(got["grads"][name], g, rtol=1e-4, atol=1e-6), (rank, name)
        for name, p in ref["params"].items():
            assert torch.allclose(got["params"][name], p, rtol=1e-4, atol=1e-6), (rank, name)
        assert got["widths"] == ref["widths"]
    share = BATCH // WORLD
    soft = torch.cat([r["soft2"] for r in ranks])
    hard = torch.cat([r["hard2"] for r in ranks])
    assert torch.allclose(soft, ref["soft2"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(hard, ref["hard2"], rtol=1e-4, atol=1e-5)
    assert soft.shape[0] == WORLD * share
    # the mask update really used G_s from both halves: without averaging it, the
    # ranks' logits would differ (their half batches differ)
    for name in logits:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name


def _fit_worker(rank: int, port: int, out: str) -> None:
    _env(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model, (x,) = build("residual")  # BatchNorm: running statistics differ per rank
        with torch.no_grad():
            classes = model.eval()(x).shape[-1]
        pruner = s2h_fx.prune_graph(model.train(), 0.5, example_inputs=(x,))
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        data = [(torch.randn(4, *x.shape[1:], generator=gen),
                 torch.randint(0, classes, (4,), generator=gen)) for _ in range(3)]
        history = pruner.fit(data, epochs=2, warmup_epochs=1, progress=False, bn_batches=2)
        torch.save({"state": pruner.state_dict(), "widths": pruner.widths,
                    "flops": [h.flops_ratio for h in history],
                    "out": pruner.export()(x).detach()}, Path(out) / f"fit{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_fit_under_torch_distributed_keeps_the_ranks_identical(tmp_path: Path) -> None:
    """Each rank trains on different batches; fit averages the gradients, so both
    ranks end with the same weights, masks, widths, BatchNorm statistics and export."""
    mp.spawn(_fit_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    a, b = (torch.load(tmp_path / f"fit{r}.pt", weights_only=False) for r in range(WORLD))
    assert a["widths"] == b["widths"] and a["flops"] == b["flops"]
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["state"][key]), key
    assert torch.equal(a["out"], b["out"])
