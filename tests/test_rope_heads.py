"""Rotary position embeddings (RoPE) in whole-heads mode.

RoPE rotates q and k within each head: ``q * cos + rotate_half(q) * sin``, where the
sin/cos tables vary along the head width D (computed from a buffer of periods, so
their channels are the buffer's) and broadcast over the heads, and ``rotate_half``
cuts D in two (``chunk`` or slicing) and joins the halves swapped (``cat``), or
rotates the pairs (2j, 2j + 1) (``stack`` of two strided slices, then
``reshape(x.shape)``: timm's EVA02). None of
that slices along the heads, so whole heads can be dropped: the head's D channels
are kept together, the tables are never sliced. Before, every such attention block
was kept whole (DINOv3's ViT and EVA02 in timm). In width mode the head width must not be
pruned (the tables would need slicing): those groups stay unprunable there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx
from s2h_fx.channels import FreezeReason
from s2h_fx.passes import find_channel_groups, trace_model

from helpers import count_flops, prunable_group, random_keep, rel_err

TOL = 1e-5
E, H, D, N = 24, 3, 8, 6  # embedding, heads, head width, tokens
KEEP = [0, 2]


def rotate_half(x: torch.Tensor, form: str) -> torch.Tensor:
    if form == "interleaved":  # pairs (2j, 2j + 1) rotated, as timm's EVA02 does
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    if form in ("chunk", "computed"):
        x1, x2 = x.chunk(2, dim=-1)
    else:  # slicing by bounds within the head width
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat([-x2, x1], dim=-1)


class RopeBlock(nn.Module):
    """Embedding, one RoPE attention block (fused qkv, SDPA) with a residual, a
    classifier over the mean token."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.embed = nn.Linear(10, E)
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)
        self.head = nn.Linear(E, 4)
        self.register_buffer("periods", 10000.0 ** (torch.arange(D // 2) / (D // 2)))

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(n, dtype=torch.float32, device=self.periods.device)
        periods = self.periods
        if self.form == "computed":  # computed in the graph: channels not tracked
            periods = 10000.0 ** (pos[: D // 2] / (D // 2))
        angles = pos[:, None] / periods[None, :]
        if self.form == "interleaved":  # each angle twice in a row
            emb = torch.stack([angles, angles], dim=-1).flatten(-2)
        else:
            emb = torch.cat([angles, angles], dim=-1)  # (N, D)
        return emb.sin(), torch.cos(emb)

    def rope(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x, self.form) * sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        sin, cos = self.tables(n)
        q, k = self.rope(q, sin, cos), self.rope(k, sin, cos)
        o = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(o.transpose(1, 2).reshape(b, n, E))
        return self.head(h.mean(1))


def reference(model: RopeBlock, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """The block computed by hand from weights sliced to the kept heads."""
    rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])
    h = model.embed(x)
    b, n, _ = h.shape
    q, k, v = (F.linear(h, model.qkv.weight[s * E + rows], model.qkv.bias[s * E + rows])
               .view(b, n, len(heads), D).transpose(1, 2) for s in range(3))
    sin, cos = model.tables(n)
    q, k = model.rope(q, sin, cos), model.rope(k, sin, cos)
    logits = q @ k.transpose(-2, -1) / math.sqrt(D)
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, len(heads) * D)
    h = h + F.linear(o, model.proj.weight[:, rows], model.proj.bias)
    return model.head(h.mean(1))


def make(form: str) -> tuple[RopeBlock, torch.Tensor]:
    torch.manual_seed(0)
    return RopeBlock(form).eval(), torch.randn(2, N, 10)


def keep_classes(pruner: s2h_fx.Pruner, param: str, group: int, heads: list[int],
                 head_dim: int) -> np.ndarray:
    """The group's classes of the kept heads, read from proj's input columns."""
    ids = pruner.grouping.slots[(param, 1)]
    classes = pruner.grouping.class_of_id[ids].reshape(-1, head_dim)
    kept = np.unique(classes[heads].ravel())
    others = np.unique(np.delete(classes, heads, axis=0).ravel())
    assert not set(kept) & set(others)  # a class belongs to one head
    return kept


@pytest.mark.parametrize("form", ["chunk", "slice", "computed", "interleaved"])
def test_rope_heads_are_prunable_and_exact(form: str) -> None:
    model, x = make(form)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    g = prunable_group(pruner, "proj:in")
    assert g.divisor == g.atom and g.size // g.atom == H  # three heads, each one unit
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    keep = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    keep[g.index] = keep_classes(pruner, "proj.weight", g.index, KEEP, D)
    assert len(keep[g.index]) == len(KEEP) * g.atom
    pruner.set_widths({g.index: len(keep[g.index])}, keep)
    pruned = pruner.export(enforce_budget=False)
    with torch.no_grad():
        out, ref = pruned(x), reference(model, x, KEEP)
        assert rel_err(out, pruner(x)) < TOL
        assert rel_err(out, ref) < TOL
        assert rel_err(ref, model(x)) > 1e-3  # dropping a head changes the function
    params = dict(pruned.named_parameters())
    assert params["qkv.weight"].shape == (3 * len(KEEP) * D, E)
    assert params["proj.weight"].shape == (E, len(KEEP) * D)
    # the periods (whatever the emitted graph calls them) are never sliced
    assert sorted(b.numel() for b in pruned.buffers()) == ([] if form == "computed" else [D // 2])
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


@pytest.mark.parametrize("form", ["chunk", "slice", "interleaved"])
def test_rope_width_mode_keeps_the_head_width(form: str) -> None:
    """In width mode the head width is not pruned (the tables would need slicing); the
    rest prunes and exports exactly. The default (attention="auto") takes whole heads
    here, since they prune where the width cannot."""
    model, x = make(form)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="width").eval()
    assert not [g for g in pruner.grouping.prunable if "proj:in" in g.members]
    auto = s2h_fx.prune_graph(model, 1.0, (x,))
    assert auto.grouping.attention == "heads"
    assert [g for g in auto.grouping.prunable if "proj:in" in g.members]
    # what the analyses wrote into the graph (SDPA's original scale) is in its code,
    # whichever analysis was kept
    gm = trace_model(model, (x,))
    assert find_channel_groups(gm).attention == "heads"
    assert "scale = " in gm.code
    for seed in range(2):
        widths, keep = random_keep(pruner, seed)
        pruner.set_widths(widths, keep)
        emitted = pruner.export(enforce_budget=False)
        with torch.no_grad():
            assert rel_err(emitted(x), pruner(x)) < TOL


def test_a_table_that_varies_over_the_heads_keeps_them() -> None:
    """A tensor of untracked channels that varies along the heads too (a per-head,
    per-width table) cannot broadcast over fewer heads: the heads are kept."""

    class PerHead(RopeBlock):
        def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            sin, cos = super().tables(n)
            scale = torch.arange(1, H + 1, dtype=torch.float32)[:, None, None]
            return sin * scale, cos * scale  # (H, N, D)

    torch.manual_seed(0)
    model, x = PerHead("chunk").eval(), torch.randn(2, N, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    assert not [g for g in pruner.grouping.prunable if "proj:in" in g.members]
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL


def test_a_learned_table_is_frozen_within_the_heads() -> None:
    """Tables from a producer (a learned position embedding over the head width): its
    channels vary along D inside every head and are never sliced, so its group is
    frozen with the reason that says so, while the heads still prune exactly."""

    class Learned(RopeBlock):
        def __init__(self) -> None:
            super().__init__("chunk")
            self.pos = nn.Embedding(N, D)

        def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            emb = self.pos(torch.arange(n, device=self.periods.device))  # (N, D)
            return emb.sin(), emb.cos()

    torch.manual_seed(0)
    model, x = Learned().eval(), torch.randn(2, N, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    table = [g for g in pruner.grouping.groups if "pos:out" in g.members]
    assert len(table) == 1 and not table[0].prunable
    assert any(r.startswith(FreezeReason.WITHIN_BLOCK.value) for r in table[0].frozen)
    g = prunable_group(pruner, "proj:in")
    keep = {h.index: np.arange(h.size) for h in pruner.grouping.prunable}
    keep[g.index] = keep_classes(pruner, "proj.weight", g.index, KEEP, D)
    pruner.set_widths({g.index: len(keep[g.index])}, keep)
    pruned = pruner.export(enforce_budget=False)
    assert pruned.get_submodule("pos").embedding_dim == D  # the table is not sliced
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < TOL
        assert rel_err(pruned(x), reference(model, x, KEEP)) < TOL


timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")


TIMM_ROPE = {
    # rotate_half (cat of the swapped halves), register tokens, layer scale
    "vit_tiny_patch16_dinov3_qkvb": dict(img_size=32, patch_size=8),
    # interleaved pairs (stack + reshape(x.shape)), the class token left unrotated
    "eva02_tiny_patch14_224": dict(img_size=56),
}


@pytest.mark.parametrize("name", sorted(TIMM_ROPE))
def test_timm_vit_heads_with_rope(name: str) -> None:
    """timm's RoPE ViTs: their heads are prunable in heads mode; the exported network
    is the hard network, and is the model whose dropped heads' output-projection
    columns are zero."""
    torch.manual_seed(0)

    def build() -> nn.Module:
        return timm.create_model(name, pretrained=False, depth=2, num_classes=10,
                                 **TIMM_ROPE[name]).eval()

    model = build()
    with torch.no_grad():  # layer scale starts near 0: make the attention count
        for pname, p in model.named_parameters():
            if "gamma" in pname:
                p.fill_(1.0)
    size = TIMM_ROPE[name]["img_size"]
    x = torch.randn(2, 3, size, size)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    attn = model.blocks[0].attn
    d, heads = attn.head_dim, attn.num_heads
    keep = {g.index: np.arange(g.size) for g in pruner.grouping.prunable}
    kept_heads = {0: [0, 2], 1: [1]}
    for i, kept in kept_heads.items():
        g = prunable_group(pruner, f"blocks.{i}.attn.proj:in")
        # every head one unit (the rotation pairs channel j of a head with j + d / 2,
        # or 2j with 2j + 1, so a head is d / 2 classes: the add of the two rotated
        # terms couples them)
        assert g.size == heads * g.atom and g.atom in (d, d // 2)
        keep[g.index] = keep_classes(pruner, f"blocks.{i}.attn.proj.weight", g.index, kept, d)
    pruner.set_widths({k: len(v) for k, v in keep.items()}, keep)
    pruned = pruner.export(enforce_budget=False)
    zeroed = build()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i, kept in kept_heads.items():
            w = zeroed.blocks[i].attn.proj.weight
            for h in set(range(heads)) - set(kept):
                w[:, h * d:(h + 1) * d] = 0
        out = pruned(x)
        assert rel_err(out, pruner(x)) < TOL
        assert rel_err(out, zeroed(x)) < TOL
        assert rel_err(out, model(x)) > 1e-3
    for i, kept in kept_heads.items():
        assert pruned.get_submodule(f"blocks.{i}.attn.proj").in_features == len(kept) * d
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
