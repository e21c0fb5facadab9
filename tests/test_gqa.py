"""Grouped-query attention: q has H heads, k and v have KV = H / r heads, each kv head
read by r query heads (``repeat_interleave(r, dim=1)`` on k and v, or SDPA's
``enable_gqa=True``). Head width prunes as in any attention (every head keeps the same
channels); whole heads prune by kv group: kv head g with its r query heads and their
columns of the output projection, so r query heads still share each kv head. Checked
against a smaller GQA block built by hand from the sliced weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx

from helpers import check_random_keeps, count_flops, prunable_group, rel_err

E, H, KV, D, N = 24, 4, 2, 16, 5
R = H // KV
FORMS = ["repeat_interleave", "output_size", "enable_gqa"]


class GQA(nn.Module):
    def __init__(self, form: str, heads: int = H, kv: int = KV) -> None:
        super().__init__()
        self.form, self.heads, self.kv = form, heads, kv
        self.embed = nn.Linear(10, E)
        self.q, self.k = nn.Linear(E, heads * D), nn.Linear(E, kv * D)
        self.v, self.o = nn.Linear(E, kv * D), nn.Linear(heads * D, E)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        B, L, _ = h.shape
        q = self.q(h).reshape(B, L, self.heads, D).transpose(1, 2)
        k = self.k(h).reshape(B, L, self.kv, D).transpose(1, 2)
        v = self.v(h).reshape(B, L, self.kv, D).transpose(1, 2)
        if self.form == "repeat_interleave":
            r = self.heads // self.kv
            y = F.scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1),
                                               v.repeat_interleave(r, dim=1), scale=D ** -0.5)
        elif self.form == "output_size":  # the heads' count given: dropped, it would not follow
            r = self.heads // self.kv
            k = k.repeat_interleave(r, dim=1, output_size=self.heads)
            v = v.repeat_interleave(r, dim=1, output_size=self.heads)
            y = F.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=D ** -0.5)
        h = h + self.o(y.transpose(1, 2).reshape(B, L, -1))
        return self.head(h.mean(1))


def reference(model: GQA, groups: list[int]) -> GQA:
    """The block with only kv heads ``groups`` and their query heads, sliced by hand."""
    small = GQA(model.form, R * len(groups), len(groups)).eval()
    qh = [g * R + j for g in groups for j in range(R)]
    rows = lambda heads: torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])  # noqa: E731
    with torch.no_grad():
        small.embed.load_state_dict(model.embed.state_dict())
        small.head.load_state_dict(model.head.state_dict())
        for lin, heads in ((small.q, qh), (small.k, groups), (small.v, groups)):
            src = getattr(model, [n for n, m in small.named_children() if m is lin][0])
            lin.weight.copy_(src.weight[rows(heads)])
            lin.bias.copy_(src.bias[rows(heads)])
        small.o.weight.copy_(model.o.weight[:, rows(qh)])
        small.o.bias.copy_(model.o.bias)
    return small


@pytest.mark.parametrize("form", FORMS)
def test_whole_heads_prune_by_kv_group(form: str) -> None:
    torch.manual_seed(0)
    model, x = GQA(form).eval(), torch.randn(2, N, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    g = prunable_group(pruner, "o:in")
    assert {"q:out", "k:out", "v:out"} <= set(g.members), pruner.grouping.table()
    # a class per kv head and channel (q's r heads of a group share it); an atom = kv head
    assert (g.size, g.atom) == (KV * D, D)
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < 1e-5
        assert rel_err(pruner.soft_forward(x), model(x)) < 1e-5
    atom_of = pruner.grouping.atom_of_class[g.index]
    # which atom is kv head 1: the atom of k's rows of that head
    kept_atom = int(atom_of[pruner.grouping.class_of_id[
        pruner.grouping.slots[("k.weight", 0)][D]]])
    keep = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    keep[g.index] = np.flatnonzero(atom_of == kept_atom)
    pruner.set_widths({g.index: D}, keep)
    pruned = pruner.export(enforce_budget=False).eval()
    ref = reference(model, [1])
    with torch.no_grad():
        out = pruned(x)
        assert rel_err(out, pruner(x)) < 1e-5
        assert rel_err(out, ref(x)) < 1e-5
        assert rel_err(out, model(x)) > 1e-3
    params = dict(pruned.named_parameters())
    assert params["q.weight"].shape == (R * D, E) and params["k.weight"].shape == (D, E)
    assert params["o.weight"].shape == (E, R * D)
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("attention", ["width", "heads"])
def test_random_keep_sets_export_the_hard_network(form: str, attention: str) -> None:
    torch.manual_seed(1)
    model, x = GQA(form).eval(), torch.randn(2, N, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention=attention).eval()
    assert pruner.grouping.attention == attention
    assert any("q:out" in g.members for g in pruner.grouping.prunable), pruner.grouping.table()
    check_random_keeps(pruner, (x,))
    pruner.train()
    soft, hard = pruner(x)
    assert soft.shape == hard.shape == (2, 3)


def test_repeat_along_a_plain_channel_axis_freezes() -> None:
    """Repeating each channel of a plain channel axis would double the next layer's
    input per kept channel in a way no width expresses: those channels are kept whole."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.a(x).repeat_interleave(2, dim=1) + self.b(x))

    with pytest.raises(s2h_fx.NoPrunableChannelsError,
                       match=r"(?s)8 .*cannot follow at repeat_interleave.*a:out"):
        s2h_fx.prune_graph(Twice(), 1.0, (torch.randn(4, 6),))
