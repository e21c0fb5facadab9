"""``attention="both"``: whole heads and the width of the heads kept, in one run.

An attention block gets two groups: its heads (a head's channels kept or dropped
whole) and its head width (the same positions kept in every head; separate q, k, v
projections give the query/key width and the value width a group each). A head's
channel (h, d) is kept when head h and position d are. The toy blocks of
test_whole_heads (3 heads of width 8) keep heads {0, 2} and a few width positions;
the exported network is compared with a reference written by hand from weights
sliced to those heads and positions (the softmax scale stays the unpruned one).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_whole_heads import FORMS, KEEP, Block, D, E, H, N, make
from torch import nn

import s2h_fx
from s2h_fx.config import PruneConfig
from s2h_fx.errors import BudgetError
from s2h_fx.passes import find_channel_groups, trace_model

from helpers import build, check_random_keeps, count_flops, rel_err

TOL = 1e-5
QK = [1, 2, 5, 6]  # width positions kept of the query/key width
VW = [0, 3, 4, 7]  # of the value width (the same as QK where q, k, v share one width)


def reference(model: Block, x: torch.Tensor, heads: list[int], qk: list[int],
              vw: list[int]) -> torch.Tensor:
    """The block computed by hand with only ``heads``, and in each of them only the
    positions ``qk`` of the query/key width and ``vw`` of the value width."""
    def rows(pos: list[int]) -> torch.Tensor:
        return torch.tensor([h * D + d for h in heads for d in pos])

    hk = len(heads)
    h = model.embed(x)
    b, n, _ = h.shape

    def project(lin: nn.Linear, offset: int, pos: list[int]) -> torch.Tensor:
        r = offset + rows(pos)
        return F.linear(h, lin.weight[r], lin.bias[r]).view(b, n, hk, len(pos)).transpose(1, 2)

    if model.form == "separate":
        q, k, v = project(model.q, 0, qk), project(model.k, 0, qk), project(model.v, 0, vw)
    else:
        q, k, v = (project(model.qkv, s * E, p) for s, p in enumerate((qk, qk, vw)))
    logits = q @ k.transpose(-2, -1) * D**-0.5  # the unpruned head width's scale
    if model.form.startswith("relpos"):
        logits = logits + model.table[:, heads][model.index].view(N, N, hk).permute(2, 0, 1)
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, hk * len(vw))
    h = h + F.linear(o, model.proj.weight[:, rows(vw)], model.proj.bias)
    return model.head(h.mean(1))


def width_classes(pruner: s2h_fx.Pruner, group: int, path: str, axis: int,
                  positions: list[int]) -> np.ndarray:
    """The classes of ``group`` at those positions of a head's width, read on head 0 of
    a parameter axis laid out (heads, width)."""
    group_of, class_of = pruner.grouping.labels(group)
    ids = pruner.grouping.slots[(path, axis)][: H * D].reshape(H, D)
    assert np.all(group_of[ids] == group)
    return np.sort(class_of[ids[0, positions]])


@pytest.mark.parametrize("form", FORMS)
def test_toy_heads_and_widths(form: str) -> None:
    model, x = make(form)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="both", divisor=2).eval()
    assert pruner.grouping.attention == "both"
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL  # every mask at 1: the model itself
    groups = [g for g in pruner.grouping.prunable if "proj:in" in g.members]
    inner = [g for g in groups if g.index >= pruner.grouping.inner_from]
    outer = [g for g in groups if g.index < pruner.grouping.inner_from]
    assert len(outer) == 1 and (outer[0].size, outer[0].divisor, outer[0].atom) == (E, D, D)
    heads = outer[0]
    if form == "separate":  # the value width is its own group, the query/key width too
        vgroup = inner[0]
        qkgroup = next(g for g in pruner.grouping.prunable
                       if "q:out" in g.members and g.index >= pruner.grouping.inner_from)
        assert {"q:out", "k:out"} <= set(qkgroup.members) and "v:out" not in qkgroup.members
        qk, vw = QK, VW
        qk_classes = width_classes(pruner, qkgroup.index, "q.weight", 0, qk)
    else:  # a fused qkv reshaped into (3, H, D): one width for q, k and v
        (vgroup,) = inner
        qkgroup, qk, vw = vgroup, VW, VW
        qk_classes = None
    assert (vgroup.size, vgroup.divisor) == (D, 2)
    keep = {g.index: np.arange(g.size) for g in pruner.grouping.prunable}
    keep[heads.index] = np.flatnonzero(np.isin(pruner.grouping.atom_of_class[heads.index], KEEP))
    keep[vgroup.index] = width_classes(pruner, vgroup.index, "proj.weight", 1, vw)
    if qk_classes is not None:
        keep[qkgroup.index] = qk_classes
    pruner.set_widths({g: len(k) for g, k in keep.items()}, keep)
    pruned = pruner.export(enforce_budget=False)
    with torch.no_grad():
        out = pruned(x)
        assert rel_err(out, pruner(x)) < TOL
        assert rel_err(out, reference(model, x, KEEP, qk, vw)) < TOL
    assert pruned.get_submodule("proj").in_features == len(KEEP) * len(vw)
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


@pytest.mark.parametrize("form", FORMS)
def test_toy_random_keeps(form: str) -> None:
    model, x = make(form)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="both", divisor=2).eval()
    check_random_keeps(pruner, (x,), seeds=4)


@pytest.mark.parametrize("name", ["attention_matmul", "mha_self", "shuffle", "cat_split"])
def test_other_layouts_random_keeps(name: str) -> None:
    """Other layouts in both mode (nn.MultiheadAttention inlined, a shuffle's rows):
    whatever is prunable exports exactly, with the FLOPs the model predicts."""
    model, inputs = build(name)
    pruner = s2h_fx.prune_graph(model.eval(), 1.0, inputs, attention="both", divisor=2).eval()
    check_random_keeps(pruner, inputs, seeds=3)


def test_latency_budget_is_refused_in_both_mode() -> None:
    model, x = make("unbind")
    with pytest.raises(BudgetError, match="attention='both'"):
        s2h_fx.prune_graph(model, {"latency": 0.5, "runtime": "eager"}, (x,),
                           attention="both")


def test_both_is_an_attention_option() -> None:
    assert PruneConfig(0.5, attention="both").attention == "both"


def test_auto_prunes_both_kinds_unless_told_not_to() -> None:
    """The default picks both kinds on an attention block; ``auto_both=False`` (what a
    latency budget passes) picks one."""
    model, x = make("unbind")
    assert find_channel_groups(trace_model(model, (x,)), divisor=2).attention == "both"
    single = find_channel_groups(trace_model(model, (x,)), divisor=2, auto_both=False)
    assert single.attention == "width" and single.inner_group_of_id is None


def test_head_width_sized_from_the_embedding_in_both_mode() -> None:
    """The merge of the heads back into tokens sized by the embedding's count
    (``reshape(b, n, c)`` with c read from the input): with heads and widths pruned the
    size is the kept heads x widths, not the embedding's (exported == hard)."""
    from test_size_constants import MergeWithEmbedWidth

    torch.manual_seed(0)
    model, x = MergeWithEmbedWidth().eval(), torch.randn(2, 7, 12)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), divisor=4, attention="both").eval()
    assert pruner.grouping.inner_group_of_id is not None
    check_random_keeps(pruner, (x,), seeds=4)


timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")


def sliced_vit_attention(attn: nn.Module, heads: list[int], pos: list[int]) -> object:
    """timm's ViT attention computed by hand over the kept heads and, in each, the kept
    positions of its width (one width for q, k and v: a fused qkv)."""
    d, dim = attn.head_dim, attn.qkv.in_features
    rows = torch.tensor([h * d + p for h in heads for p in pos])

    def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (F.linear(x, attn.qkv.weight[s * dim + rows], attn.qkv.bias[s * dim + rows])
                   .view(b, n, len(heads), len(pos)).transpose(1, 2) for s in range(3))
        logits = q @ k.transpose(-2, -1) * d**-0.5
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, len(rows))
        return F.linear(o, attn.proj.weight[:, rows], attn.proj.bias)

    return forward


def test_timm_vit_heads_and_widths_against_a_reference() -> None:
    """A tiny timm ViT (3 heads of 64): block 0 keeps heads {0, 2} and 16 positions of
    their width, block 1 head 1 and 40 positions."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="both").eval()
    grouping = pruner.grouping
    rng = np.random.default_rng(0)
    plan = {0: ([0, 2], sorted(rng.choice(64, 16, replace=False).tolist())),
            1: ([1], sorted(rng.choice(64, 40, replace=False).tolist()))}
    keep = {g.index: np.arange(g.size) for g in grouping.prunable}
    for i, (heads, pos) in plan.items():
        member = f"blocks.{i}.attn.proj:in"
        outer, inner = (g for g in grouping.prunable if member in g.members)
        assert (outer.size, outer.divisor, outer.atom, inner.size, inner.divisor) == (
            192, 64, 64, 64, 8)
        keep[outer.index] = np.flatnonzero(np.isin(grouping.atom_of_class[outer.index], heads))
        ids = grouping.slots[(f"blocks.{i}.attn.proj.weight", 1)].reshape(3, 64)
        _, class_of = grouping.labels(inner.index)
        keep[inner.index] = np.sort(class_of[ids[0, pos]])
    pruner.set_widths({g: len(k) for g, k in keep.items()}, keep)
    pruned = pruner.export(enforce_budget=False)
    originals = {i: model.blocks[i].attn.forward for i in plan}
    try:
        for i, (heads, pos) in plan.items():
            model.blocks[i].attn.forward = sliced_vit_attention(model.blocks[i].attn, heads, pos)
        with torch.no_grad():
            expected = model(x)
    finally:
        for i, fwd in originals.items():
            model.blocks[i].attn.forward = fwd
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < TOL
        assert rel_err(pruned(x), expected) < TOL
    assert pruned.get_submodule("blocks.0.attn.qkv").out_features == 3 * 2 * 16
    assert pruned.get_submodule("blocks.1.attn.proj").in_features == 40
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def _torchvision(name: str, size: int, **kwargs: object) -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    return model.eval(), torch.randn(2, 3, size, size)


@pytest.mark.parametrize(("name", "size", "kwargs", "blocks"), [
    ("vit_b_16", 32, {"image_size": 32}, 12),  # nn.MultiheadAttention, inlined
    ("swin_t", 64, {}, 12),  # shifted windows, relative position table
    ("swin_v2_t", 64, {}, 12),  # cosine attention, per-head logit scale and bias MLP
])
def test_torchvision_transformers_prune_heads_and_widths(name: str, size: int,
                                                         kwargs: dict[str, object],
                                                         blocks: int) -> None:
    """Every attention block gets a head-width group inside its heads group; random
    keep sets export exactly, with the FLOPs the model predicts."""
    model, x = _torchvision(name, size, **kwargs)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="both").eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    grouping = pruner.grouping
    inner = [g for g in grouping.prunable if g.index >= grouping.inner_from]
    assert len(inner) == blocks
    assert all(any(m.endswith("proj:in") or "out_proj" in m for m in g.members) for g in inner)
    check_random_keeps(pruner, (x,), seeds=2)


class CatBeforeProj(nn.Module):
    """The attention's output joined on the channel axis with other channels before the
    output projection: that axis holds heads x widths plus a count of its own, which is
    no product of the two, so the head width is left out (whole heads still prune)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.qkv = nn.Linear(10, E), nn.Linear(E, 3 * E)
        self.side, self.proj, self.head = nn.Linear(E, 8), nn.Linear(E + 8, E), nn.Linear(E, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, E)
        return self.head((h + self.proj(torch.cat([o, self.side(h)], -1))).mean(1))


def test_a_width_sharing_an_axis_with_other_channels_is_left_out() -> None:
    torch.manual_seed(0)
    model, x = CatBeforeProj().eval(), torch.randn(2, N, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="both", divisor=2).eval()
    grouping = pruner.grouping
    assert grouping.attention == "heads" and grouping.inner_group_of_id is None
    heads = [g for g in grouping.prunable if "qkv:out" in g.members]
    assert [(g.size, g.atom) for g in heads] == [(H * D, D)]
    check_random_keeps(pruner, (x,), seeds=3)


def test_the_random_keep_check_alone_leaves_such_a_width_out(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Without the first filter (channels of one axis all labelled by head widths or
    none), the check on random keep sets finds that the axis's size is not heads x
    widths and leaves the width out, saying so."""
    import importlib

    fcg = importlib.import_module("s2h_fx.passes.find_channel_groups")
    monkeypatch.setattr(fcg, "_unmixed", lambda *args: set())
    torch.manual_seed(0)
    model, x = CatBeforeProj().eval(), torch.randn(2, N, 10)
    with caplog.at_level("WARNING"):
        grouping = find_channel_groups(trace_model(model, (x,)), divisor=2, attention="both")
    assert grouping.attention == "heads" and grouping.inner_group_of_id is None
    assert "are not heads x widths" in caplog.text


def test_a_run_in_both_mode_resumes_only_in_both_mode(tmp_path) -> None:  # noqa: ANN001
    """A checkpoint of a run in both mode holds more masks than one kind has: resuming
    it with another mode is refused by name, and in both mode it goes on."""
    from torch.utils.data import DataLoader, TensorDataset

    from s2h_fx.errors import CheckpointError

    model, x = make("unbind")
    data = TensorDataset(torch.randn(16, N, 10), torch.randint(0, 5, (16,)))

    def run(attention: str, **kwargs: object) -> s2h_fx.Pruner:
        pruner = s2h_fx.prune_graph(model, 0.7, (x,), attention=attention, divisor=2)
        pruner.fit(DataLoader(data, batch_size=8), 1, progress=False, checkpoint=tmp_path,
                   **kwargs)
        return pruner

    assert run("both").grouping.attention == "both"
    with pytest.raises(CheckpointError, match="attention='both'"):
        run("heads", resume=True)
    assert run("both", resume=True).grouping.attention == "both"


def test_timm_swin_prunes_heads_and_widths() -> None:
    """timm's Swin (heads of width 8: widths in multiples of 2 here): each block's head
    width merges inside its heads, the relative position table follows the heads;
    random keep sets export exactly with the FLOPs the model predicts."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56,
                              embed_dim=24, depths=(2, 1), num_heads=(3, 6), window_size=7,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 56, 56)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="both", divisor=2).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    grouping = pruner.grouping
    inner = [g for g in grouping.prunable if g.index >= grouping.inner_from]
    assert len(inner) == 3 and all(g.size == 8 for g in inner)  # one per block
    # the table (a parameter of the attention module itself) is in its block's heads
    heads = next(g for g in grouping.prunable if "layers.0.blocks.1.attn" in g.members)
    assert heads.index < grouping.inner_from and (heads.size, heads.atom) == (24, 8)
    check_random_keeps(pruner, (x,), seeds=3)
