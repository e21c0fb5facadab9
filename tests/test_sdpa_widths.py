"""F.scaled_dot_product_attention with separate q, k and v projections: the query/key
width and the value width are groups of their own (q·kᵀ contracts q's and k's
channels; v's channels are the output's, read by the output projection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import s2h_fx

from helpers import count_flops, rel_err
from toy_zoo import Attention, tokens


@pytest.mark.parametrize(("qk", "v"), [(8, 16), (16, 8)])
def test_query_key_and_value_widths_prune_apart(qk: int, v: int) -> None:
    """Widths are head widths (each of the 2 heads keeps that many of its 16)."""
    torch.manual_seed(0)
    model, x = Attention("separate").eval(), tokens()
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="width")
    (g_qk,) = [g for g in pruner.grouping.prunable if "q:out" in g.members]
    (g_v,) = [g for g in pruner.grouping.prunable if "v:out" in g.members]
    assert g_qk.index != g_v.index and "k:out" in g_qk.members and "proj:in" in g_v.members
    assert g_qk.size == g_v.size == 16
    rng = np.random.default_rng(0)
    widths = {g.index: g.size for g in pruner.grouping.prunable}
    keep = {g.index: np.arange(g.size) for g in pruner.grouping.prunable}
    for g, w in ((g_qk, qk), (g_v, v)):
        widths[g.index], keep[g.index] = w, np.sort(rng.choice(16, w, replace=False))
    pruner.set_widths(widths, keep)
    exported = pruner.eval().export(enforce_budget=False)
    q, k = exported.get_submodule("q"), exported.get_submodule("k")
    assert q.out_features == k.out_features == 2 * qk
    assert exported.get_submodule("v").out_features == exported.get_submodule("proj").in_features == 2 * v
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5  # the hard network
        assert rel_err(exported(x), pruner.masked_forward(x)) < 1e-5  # zeroing == removing
    # two products: q·kᵀ with the query/key width, attn·v with the value width
    assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
    sdpa = [n for n in exported.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert sdpa and sdpa[0].kwargs["scale"] == pytest.approx(16 ** -0.5)  # the unpruned 1/sqrt(D)
