"""Whole-heads mode (``attention="heads"``): an attention block's
heads are pruned whole (q, k and v rows of a head, the output projection's columns
for it, and per-head tables), the head width stays.

Toy blocks have 3 heads of width 8 over a 24-wide embedding; the tests keep heads
{0, 2} and compare the exported network with the hard network and with a reference
written by hand from weights sliced to those heads.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx
from s2h_fx.config import PruneConfig
from s2h_fx.passes import find_channel_groups, trace_model

from helpers import build, count_flops, prunable_group, random_keep, rel_err

TOL = 1e-5
E, H, D, N = 24, 3, 8, 5  # embedding, heads, head width, tokens
KEEP = [0, 2]  # the heads kept


class Block(nn.Module):
    """Embedding, one attention block with a residual, a classifier over the mean token.

    ``form``: ``unbind`` (fused qkv, reshape (B, N, 3, H, D), permute, unbind, SDPA),
    ``index`` (fused qkv indexed qkv[0], qkv[1], qkv[2]; q @ kᵀ * scale, softmax, @ v),
    ``chunk`` (as ``index`` but chunk(3) over the qkv axis and squeeze), ``separate``
    (three projections viewed (B, N, H, D), SDPA), ``relpos`` (as ``index``, plus a
    per-head relative position bias: a (num_rel, H) table gathered by a fixed index
    buffer, viewed (N, N, H), permuted to (H, N, N) and added to the logits),
    ``relpos_sdpa`` (the same bias passed to SDPA as its ``attn_mask``, as timm's BEiT does).
    """

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.embed = nn.Linear(10, E)
        if form == "separate":
            self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E)
        else:
            self.qkv = nn.Linear(E, 3 * E)
        if form.startswith("relpos"):
            self.table = nn.Parameter(torch.randn(2 * N - 1, H))
            pos = torch.arange(N)
            self.register_buffer("index", (pos[:, None] - pos[None, :] + N - 1).reshape(-1))
        self.proj = nn.Linear(E, E)
        self.head = nn.Linear(E, 5)

    def qkv_heads(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = h.shape
        if self.form == "separate":
            return tuple(p(h).view(b, n, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        qkv = self.qkv(h).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4)
        if self.form == "unbind":
            return qkv.unbind(0)
        if self.form == "chunk":
            parts = qkv.chunk(3, dim=0)
            return parts[0].squeeze(0), parts[1].squeeze(0), parts[2].squeeze(0)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        q, k, v = self.qkv_heads(h)
        if self.form in ("unbind", "separate"):
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.form == "relpos_sdpa":
            bias = self.table[self.index].view(N, N, H).permute(2, 0, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        else:
            attn = q @ k.transpose(-2, -1) * D**-0.5
            if self.form == "relpos":
                bias = self.table[self.index].view(N, N, H).permute(2, 0, 1)
                attn = attn + bias.unsqueeze(0)
            o = attn.softmax(dim=-1) @ v
        h = h + self.proj(o.transpose(1, 2).reshape(b, n, E))
        return self.head(h.mean(1))


FORMS = ["unbind", "index", "chunk", "separate", "relpos", "relpos_sdpa"]


def reference(model: Block, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """The model computed by hand with only ``heads`` (weights sliced here)."""
    rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])
    hk = len(heads)
    h = model.embed(x)
    b, n, _ = h.shape

    def project(lin: nn.Linear, offset: int) -> torch.Tensor:
        w, bias = lin.weight[offset + rows], lin.bias[offset + rows]
        return F.linear(h, w, bias).view(b, n, hk, D).transpose(1, 2)

    if model.form == "separate":
        q, k, v = (project(p, 0) for p in (model.q, model.k, model.v))
    else:
        q, k, v = (project(model.qkv, s * E) for s in range(3))
    logits = q @ k.transpose(-2, -1) * D**-0.5
    if model.form.startswith("relpos"):
        logits = logits + model.table[:, heads][model.index].view(N, N, hk).permute(2, 0, 1)
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, hk * D)
    h = h + F.linear(o, model.proj.weight[:, rows], model.proj.bias)
    return model.head(h.mean(1))


def make(form: str) -> tuple[Block, torch.Tensor]:
    torch.manual_seed(0)
    return Block(form).eval(), torch.randn(2, N, 10)


def keep_heads(pruner: s2h_fx.Pruner, group: int, heads: list[int], head_dim: int) -> None:
    """Set the group to those heads (classes of a head: its atom), the rest full."""
    atom_of = pruner.grouping.atom_of_class[group]
    keep = {g.index: np.arange(g.size) for g in pruner.grouping.prunable}
    keep[group] = np.flatnonzero(np.isin(atom_of, heads))
    pruner.set_widths({group: len(heads) * head_dim}, keep)


@pytest.mark.parametrize("form", FORMS)
def test_toy_heads_group(form: str) -> None:
    model, x = make(form)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    g = prunable_group(pruner, "proj:in")
    # one group: q, k, v rows of every head and proj's columns; 3 heads of 8 channels
    # (q's, k's and v's channel d of a head are one class); a head is kept or dropped whole
    assert (g.size, g.divisor, g.atom) == (H * D, D, D)
    assert g.candidate_widths == (8, 16, 24)
    atoms = pruner.grouping.atom_of_class[g.index]
    assert sorted(np.bincount(atoms).tolist()) == [D] * H
    if form.startswith("relpos"):
        assert "table[1]" in g.members  # the table's head axis follows the heads
    # all masks at one is the model
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
        assert rel_err(pruner.soft_forward(x), model(x)) < TOL


@pytest.mark.parametrize("form", FORMS)
def test_toy_keep_heads_0_and_2(form: str) -> None:
    model, x = make(form)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    g = prunable_group(pruner, "proj:in")
    # which atom is which head: the atom of the classes of proj's input columns
    atom_of_head = _atom_of_head(pruner, g.index)
    keep_heads(pruner, g.index, [atom_of_head[h] for h in KEEP], D)
    pruned = pruner.export(enforce_budget=False)
    with torch.no_grad():
        out, hard, ref = pruned(x), pruner(x), reference(model, x, KEEP)
        assert rel_err(out, hard) < TOL
        assert rel_err(out, ref) < TOL
        assert rel_err(ref, model(x)) > 1e-3  # removing a head changes the function
    params = dict(pruned.named_parameters())
    if form == "separate":
        assert params["q.weight"].shape == (2 * D, E)
    else:
        assert params["qkv.weight"].shape == (3 * 2 * D, E)
    assert params["proj.weight"].shape == (E, 2 * D)
    if form.startswith("relpos"):
        assert torch.equal(params["table"], model.table[:, KEEP])
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
    assert float(pruner.flops()) < count_flops(model, (x,))


def _atom_of_head(pruner: s2h_fx.Pruner, group: int) -> dict[int, int]:
    """Head h's atom: the atom of the class of proj's input column h * D."""
    ids = pruner.grouping.slots[("proj.weight", 1)]
    classes = pruner.grouping.class_of_id[ids]
    atoms = pruner.grouping.atom_of_class[group][classes]
    return {h: int(atoms[h * D]) for h in range(H)}


def test_width_mode_is_unchanged_on_the_toys() -> None:
    model, x = make("relpos")
    width = s2h_fx.prune_graph(model, 1.0, (x,), attention="width")
    assert width.grouping.attention == "width"
    g = [g for g in width.grouping.groups if "proj:in" in g.members]
    # head width: one set of 8 channels repeated over the heads (too small to prune
    # at divisor 8); the table is not in it
    assert [(g.size, g.atom) for g in g] == [(D, 1)]
    assert "table[1]" not in g[0].members
    assert not g[0].prunable


def test_auto_mode_prunes_heads_where_the_width_cannot() -> None:
    """The default, attention="auto": here the head width (8 channels, the divisor) has
    no smaller width, so whole heads prune more and are chosen; with a divisor that
    lets the width shrink, both prune (whole heads and the width of those kept)."""
    model, x = make("relpos")
    auto = s2h_fx.prune_graph(model, 1.0, (x,))
    heads = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads")
    assert auto.grouping.attention == "heads"
    assert auto.grouping.table() == heads.grouping.table()
    assert [g for g in auto.grouping.prunable if "proj:in" in g.members]
    auto4 = s2h_fx.prune_graph(model, 1.0, (x,), divisor=4)
    both4 = s2h_fx.prune_graph(model, 1.0, (x,), divisor=4, attention="both")
    assert auto4.grouping.attention == "both"
    assert auto4.grouping.table() == both4.grouping.table()
    # the heads (3 x 8, kept whole) and the width (8, in multiples of 4)
    assert sorted((g.size, g.divisor) for g in both4.grouping.prunable
                  if "proj:in" in g.members) == [(D, 4), (H * D, D)]


def test_attention_option_is_validated() -> None:
    model, x = make("unbind")
    with pytest.raises(ValueError, match="'width', 'heads'"):
        PruneConfig(0.5, attention="head")
    with pytest.raises(ValueError, match="attention must be one of"):
        s2h_fx.prune_graph(model, 0.5, (x,), attention="rows")
    gm = trace_model(model, (x,))
    with pytest.raises(ValueError, match="attention must be one of"):
        find_channel_groups(gm, attention=None)  # type: ignore[arg-type]
    assert PruneConfig(0.5, attention="heads").attention == "heads"


class OneHead(nn.Module):
    """Uses head 0 alone (an integer index on the head axis): after pruning, index 0
    would be another head, so the heads must stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(2, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o[:, 0].mean(1))


def test_integer_index_on_the_head_axis_freezes_the_heads() -> None:
    torch.manual_seed(0)
    model, x = OneHead().eval(), torch.randn(2, N, E)
    grouping = find_channel_groups(trace_model(model, (x,)), attention="heads")
    assert not any("qkv:out" in g.members for g in grouping.prunable)
    frozen = [g for g in grouping.frozen if "qkv:out" in g.members]
    assert frozen and any("indexed" in r for r in frozen[0].frozen)


class Masked(nn.Module):
    """SDPA with an additive mask of one row per head (1, H, N, N): a buffer of the model,
    or given with the input."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.register_buffer("mask", torch.randn(1, H, N, N))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(2, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        mask = self.mask if mask is None else mask
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.proj(o.transpose(1, 2).reshape(2, N, E))


def test_sdpa_mask_buffer_per_head_follows_the_heads() -> None:
    torch.manual_seed(0)
    model, x = Masked().eval(), torch.randn(2, N, E)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    g = prunable_group(pruner, "proj:in")
    assert "mask[1]" in g.members
    classes = pruner.grouping.class_of_id[pruner.grouping.slots[("proj.weight", 1)]]
    keep = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    keep[g.index] = np.sort(classes.reshape(H, D)[KEEP].ravel())
    pruner.set_widths({g.index: 2 * D}, keep)
    pruned = pruner.export(enforce_budget=False)
    assert torch.equal(pruned.get_buffer("mask"), model.mask[:, KEEP])
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < TOL


def test_sdpa_mask_input_per_head_keeps_the_heads() -> None:
    """A mask of one row per head that comes from outside is not sliced with the heads:
    they stay whole (pruning them would leave the mask H rows for H' heads)."""
    torch.manual_seed(0)
    model, x, mask = Masked().eval(), torch.randn(2, N, E), torch.randn(1, H, N, N)
    grouping = find_channel_groups(trace_model(model, (x, mask)), attention="heads")
    heads = [g for g in grouping.groups if "proj:in" in g.members]
    assert len(heads) == 1 and not heads[0].prunable
    assert any("not tracked" in r for r in heads[0].frozen)


def test_heads_mode_trains() -> None:
    """One S2H step in train mode: both branches run and the head mask gets a gradient."""
    model, x = make("relpos")
    pruner = s2h_fx.prune_graph(model.train(), 0.7, (x,), attention="heads")
    g = prunable_group(pruner, "proj:in")
    soft, hard = pruner(x)
    losses = pruner.losses((soft, hard), torch.tensor([0, 3]))
    assert pruner.backward(losses)
    grad = pruner.masks()[g.index].logits.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
    pruner.mask_step()


@pytest.mark.parametrize("name", ["shuffle", "attention_matmul", "mha_self", "grouped",
                                  "cat_split"])
def test_heads_mode_random_keeps_export_equals_hard(name: str) -> None:
    """Other layouts in heads mode (a channel shuffle's split is kept in whole rows,
    nn.MultiheadAttention is inlined): whatever is prunable exports exactly."""
    model, inputs = build(name)
    pruner = s2h_fx.prune_graph(model.eval(), 1.0, inputs, attention="heads").eval()
    for seed in range(2):
        widths, keep = random_keep(pruner, seed)
        pruner.set_widths(widths, keep)
        emitted = pruner.export(enforce_budget=False)
        with torch.no_grad():
            assert rel_err(emitted(*inputs), pruner(*inputs)) < TOL
        assert count_flops(emitted, inputs) == pytest.approx(float(pruner.flops()), rel=1e-9)


timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=10).eval()


def timm_reference(model: nn.Module, x: torch.Tensor, heads: dict[int, list[int]]) -> torch.Tensor:
    """timm's ViT with each block's attention computed by hand over its kept heads."""
    originals = {}
    for i, kept in heads.items():
        attn = model.blocks[i].attn
        originals[i] = attn.forward
        attn.forward = _sliced_attention(attn, kept)
    try:
        return model(x)
    finally:
        for i, fwd in originals.items():
            model.blocks[i].attn.forward = fwd


def _sliced_attention(attn: nn.Module, kept: list[int]) -> object:
    d = attn.head_dim
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept])
    dim = attn.qkv.in_features

    def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = [F.linear(x, attn.qkv.weight[s * dim + rows], attn.qkv.bias[s * dim + rows])
               .view(b, n, len(kept), d).transpose(1, 2) for s in range(3)]
        logits = qkv[0] @ qkv[1].transpose(-2, -1) * d**-0.5
        o = (logits.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, len(kept) * d)
        return F.linear(o, attn.proj.weight[:, rows], attn.proj.bias)

    return forward


def test_timm_vit_whole_heads() -> None:
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    groups = [prunable_group(pruner, f"blocks.{i}.attn.proj:in") for i in range(2)]
    for g in groups:  # 3 heads of 64 channels
        assert (g.size, g.divisor, g.atom) == (192, 64, 64)
    assert any("patch_embed.proj:out" in g.members for g in pruner.grouping.prunable)
    heads = {0: [0, 2], 1: [1]}
    keep = {g.index: np.arange(g.size) for g in pruner.grouping.prunable}
    for i, g in enumerate(groups):
        ids = pruner.grouping.slots[(f"blocks.{i}.attn.proj.weight", 1)]
        classes = pruner.grouping.class_of_id[ids].reshape(3, 64)
        keep[g.index] = np.sort(classes[heads[i]].ravel())
    pruner.set_widths({g.index: 64 * len(heads[i]) for i, g in enumerate(groups)}, keep)
    pruned = pruner.export(enforce_budget=False)
    with torch.no_grad():
        out = pruned(x)
        assert rel_err(out, pruner(x)) < TOL
        assert rel_err(out, timm_reference(model, x, heads)) < TOL
    assert pruned.get_submodule("blocks.0.attn.qkv").out_features == 3 * 2 * 64
    assert pruned.get_submodule("blocks.1.attn.proj").in_features == 64
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def test_timm_swin_whole_heads_slice_the_relative_position_table() -> None:
    """Swin's windowed attention: the logits are viewed per window, the shifted-window
    mask is added, and the relative position table (num_rel, heads) is gathered by an
    index buffer; keeping heads {0, 2} of the first stage slices the table's columns."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56,
                              embed_dim=24, depths=(2, 1), num_heads=(3, 6), window_size=7,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 56, 56)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    attn = "layers.0.blocks.1.attn"  # the shifted block (it adds the window mask)
    g = prunable_group(pruner, f"{attn}.proj:in")
    assert (g.size, g.divisor, g.atom) == (24, 8, 8)
    ids = pruner.grouping.slots[(f"{attn}.proj.weight", 1)]
    classes = pruner.grouping.class_of_id[ids].reshape(3, 8)
    keep = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    keep[g.index] = np.sort(classes[KEEP].ravel())
    pruner.set_widths({g.index: 16}, keep)
    pruned = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < TOL
    table = model.get_submodule(attn).relative_position_bias_table
    assert torch.equal(pruned.get_submodule(attn).relative_position_bias_table, table[:, KEEP])
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def test_a_dynamic_per_group_size_of_rows_kept_whole_is_rewritten() -> None:
    """``x.view(n, 2, c // 2, h, w)`` in heads mode keeps whole rows: pruned to one row,
    ``c // 2`` would halve the row it no longer splits, so that size becomes -1."""
    model, inputs = build("shuffle")
    pruner = s2h_fx.prune_graph(model.eval(), 1.0, inputs, attention="heads").eval()
    group = next(g for g in pruner.grouping.prunable if "a.0:out" in g.members)
    assert group.divisor == 16  # one row of the shuffle's (2, 16) split
    pruner.set_widths({**pruner.widths, group.index: 16})
    emitted = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(emitted(*inputs), pruner(*inputs)) < TOL
    assert "view(getitem, 1, -1" in emitted.code


def test_batch_heads_reshape_at_batch_one() -> None:
    """Attention over (B * H, N, D) (q.reshape(b * H, n, D)) traced at batch 1: the
    size b * H is computed from no channels, yet the axis holds the heads. It is written
    as -1, so the pruned graph reshapes to the heads it keeps (it used to keep H and
    fail to run); any batch runs."""
    hk = 3

    class BatchHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.qkv = nn.Linear(10, E), nn.Linear(E, 3 * E)
            self.proj, self.head = nn.Linear(E, E), nn.Linear(E, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            b, n, _ = h.shape
            q, k, v = self.qkv(h).reshape(b, n, 3, hk, D).permute(2, 0, 3, 1, 4).unbind(0)
            q, k, v = (t.reshape(b * hk, n, D) for t in (q, k, v))
            o = ((q @ k.transpose(1, 2)).softmax(-1) @ v).reshape(b, hk, n, D)
            return self.head((h + self.proj(o.transpose(1, 2).reshape(b, n, E))).mean(1))

    torch.manual_seed(0)
    model, x = BatchHeads().eval(), torch.randn(1, N, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    g = prunable_group(pruner, "proj:in")
    keep = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    keep[g.index] = np.arange(g.atom, g.size)  # drop head 0
    pruner.set_widths({i: len(k) for i, k in keep.items()}, keep)
    pruned = pruner.export(enforce_budget=False)
    assert pruned.get_submodule("proj").in_features == 2 * D
    with torch.no_grad():
        for batch in (x, torch.randn(3, N, 10)):
            assert rel_err(pruned(batch), pruner(batch)) < 1e-5

