"""Regression tests of issue 7, items 2, 6 and 7: channel counts used through
``numel``/``len``/shape arithmetic, masks of a matmul applied once, rule errors that
surface, and three models that used to be frozen whole though they can be pruned.

For every prunable model: for random widths and kept channels, the emitted graph
equals the hard network, equals the masked emulation, and its flop_counter FLOPs
equal ``pruner.flops()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import s2h_fx
from s2h_fx.channels import FreezeReason
from s2h_fx.errors import InvariantError
from s2h_fx.passes import find_channel_groups, trace_model
from s2h_fx.rules.base import FUNCTION_RULES, register_rule

from helpers import count_flops, random_keep, rel_err
from toy_zoo import cbr

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def check_invariants(model: nn.Module, x: torch.Tensor, draws: int = 3) -> s2h_fx.Pruner:
    """emitted == hard (1e-5), emitted == masked (1e-4), FLOPs exact, for random keep-sets."""
    torch.manual_seed(0)
    pruner = s2h_fx.prune_graph(model.eval(), 1.0, example_inputs=(x,))
    pruner.eval()
    for seed in range(draws):
        widths, keep = random_keep(pruner, seed)
        pruner.set_widths(widths, keep)
        emitted = pruner.export().eval()
        with torch.no_grad():
            out = emitted(x)
            assert rel_err(pruner(x), out) < 1e-5, f"seed {seed}: emitted != hard"
            assert rel_err(pruner.masked_forward(x), out) < 1e-4, f"seed {seed}: != masked"
        assert pruner.flops() == pytest.approx(count_flops(emitted, (x,)), rel=1e-9)
    return pruner


def group_of(pruner_or_result, member: str) -> s2h_fx.ChannelGroup:
    groups = getattr(pruner_or_result, "grouping", pruner_or_result).groups
    return next(g for g in groups if member in g.members)


# ---- item 6: a matmul scales each contracted channel by its mask once -------------
class Attention(nn.Module):
    """q = linear(x), k = linear(x), softmax(q @ k^T) @ v, output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 32), nn.Linear(16, 32)
        self.v, self.o = nn.Linear(16, 24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.o(attn @ v)


def _per_channel(pruner: s2h_fx.Pruner, slot: tuple[str, int]) -> torch.Tensor:
    g = int(pruner.grouping.group_of_id[pruner.grouping.slots[slot][0]])
    classes = torch.as_tensor(pruner.grouping.class_of_id[pruner.grouping.slots[slot]])
    return pruner.masks()[g].values().detach()[classes]


def test_matmul_masks_each_contracted_channel_once() -> None:
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, 16)
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))
    assert group_of(pruner, "q:out") is group_of(pruner, "k:out")  # contracted: one group
    assert group_of(pruner, "v:out").prunable and group_of(pruner, "q:out").prunable
    with torch.no_grad():  # relaxed masks strictly between 0 and 1
        for m in pruner.masks().values():
            m.logits.copy_(torch.randn(m.logits.shape))
    m_qk, m_v = _per_channel(pruner, ("q.weight", 0)), _per_channel(pruner, ("v.weight", 0))
    assert float(m_qk.min()) < 0.5 and float(m_v.min()) < 0.9  # so m * m != m
    # by hand: the mask applied once on the contracted channels and once on v's channels
    with torch.no_grad():
        q, k, v = model.q(x) * m_qk, model.k(x), model.v(x) * m_v
        expected = model.o(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)
        got = pruner.soft_forward(x)
    assert rel_err(got, expected) < 1e-6
    sites = [n for n in pruner.graph_module.graph.nodes if n.op == "call_module"
             and str(n.target).startswith("s2h_mask")]
    assert len(sites) == 2  # q before q @ k^T, and attn @ v before the projection


def test_attention_invariants() -> None:
    check_invariants(Attention(), torch.randn(2, 5, 16))
