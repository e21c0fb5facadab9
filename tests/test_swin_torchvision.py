"""torchvision's Swin: its window attention (``shifted_window_attention``, a function
torchvision keeps out of torch.fx's reach) is traced as its ops for the example size
(s2h_fx.swin), ``torch.roll`` of the shifted windows and the patch merging's 2x2
phases have rules, so every group but the classifier's output prunes: head widths (or
whole heads), the MLPs and each stage's embedding."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import s2h_fx
from s2h_fx.swin import InlinedShiftedWindowAttention, InlinedShiftedWindowAttentionV2

from helpers import count_flops, random_keep, rel_err

TOL = 1e-5


def swin_t() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.swin_t(num_classes=10).eval()


@pytest.mark.parametrize(("size", "attention"), [(64, "auto"), (112, "heads")])
def test_swin_t_prunes_attention_and_embedding_exactly(size: int, attention: str) -> None:
    """At 64x64 the stages are 16, 8, 4, 2 wide (padded to windows of 7, the last ones
    unshifted); at 112, 28 to 4."""
    model, x = swin_t(), torch.randn(2, 3, size, size)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention=attention).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL  # full width: the model itself
    frozen = pruner.grouping.frozen
    assert len(frozen) == 1 and frozen[0].frozen[0].startswith("reaches a model output")
    members = {m for g in pruner.grouping.prunable for m in g.members}
    assert {"features.1.0.attn.qkv:out", "features.7.1.attn.proj:in",
            "features.2.reduction:in"} <= members
    for seed in range(2):
        pruner.set_widths(*random_keep(pruner, seed))
        exported = pruner.export(enforce_budget=False)
        with torch.no_grad():
            assert rel_err(exported(x), pruner(x)) < TOL
            assert exported(torch.randn(3, 3, size, size)).shape == (3, 10)  # any batch
        assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
        assert count_flops(exported, (x,)) < count_flops(model, (x,))
        # patch merging: four copies of the kept channels into its norm and linear
        c = exported.get_submodule("features.1.0.mlp.0").in_features  # stage-1 embedding
        assert exported.get_submodule("features.2.reduction").in_features == 4 * c


def swin_v2_t() -> nn.Module:
    """swin_v2_t with a key bias and logit scales that are not torchvision's initial
    values: torchvision zeroes the key's bias at every call, and the inlined forward
    must too."""
    torch.manual_seed(0)
    model = torchvision.models.swin_v2_t(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "logit_scale"):
                m.qkv.bias.normal_()
                m.logit_scale.normal_(2.0, 0.5)
    return model


def test_swin_v2_t_prunes_whole_heads_exactly() -> None:
    """Swin V2: cosine attention (q, k normalised over the head width), a per-head
    logit scale and a position-bias MLP with one output per head. Whole heads leave
    more prunable than head widths (the width analysis leaves the MLP's per-head
    outputs and the qkv split frozen), so the default ``attention="auto"`` prunes
    them, with their widths (``attention="both"``, tests/test_both_kinds.py); here
    whole heads alone: every group but the classifier's output prunes; the exported
    network is the hard one and its FLOPs the model's."""
    model, x = swin_v2_t(), torch.randn(2, 3, 64, 64)
    assert s2h_fx.prune_graph(model, 1.0, (x,)).grouping.attention == "both"
    pruner = s2h_fx.prune_graph(model, 1.0, (x,), attention="heads").eval()
    assert pruner.grouping.attention == "heads"
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    frozen = pruner.grouping.frozen
    assert len(frozen) == 1 and frozen[0].frozen[0].startswith("reaches a model output")
    members = {m for g in pruner.grouping.prunable for m in g.members}
    assert {"features.1.0.attn.qkv:out", "features.1.0.attn.cpb_mlp.2:out",
            "features.1.0.attn.cpb_mlp.0:out", "features.2.reduction:in"} <= members
    for seed in range(2):
        pruner.set_widths(*random_keep(pruner, seed))
        exported = pruner.export(enforce_budget=False)
        with torch.no_grad():
            assert rel_err(exported(x), pruner(x)) < TOL
        assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
        heads = exported.get_submodule("features.5.0.attn.cpb_mlp.2").out_features
        assert exported.get_parameter("features.5.0.attn.logit_scale").shape[0] == heads
        # the qkv linear (read by F.linear: a weight, not a module) keeps 3 x heads x D rows
        assert exported.get_parameter("features.5.0.attn.qkv.weight").shape[0] == 3 * heads * 32


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_inlined_attention_is_torchvisions_function(version: str) -> None:
    """The traceable forward equals torchvision's on the size it was made for (shifted
    and unshifted blocks, padded windows) and falls back to it on another size."""
    model, x = (swin_t() if version == "v1" else swin_v2_t()), torch.randn(2, 3, 64, 64)
    cls = InlinedShiftedWindowAttention if version == "v1" else InlinedShiftedWindowAttentionV2
    from s2h_fx.observe import observe_calls
    from s2h_fx.swin import RECORDER, prepare

    seen = observe_calls(model, (x,), {"swin": RECORDER})["swin"]
    assert seen["features.1.1.attn"] == (16, 16) and seen["features.7.0.attn"] == (2, 2)
    with torch.no_grad():
        feats = {name: model.get_submodule(name) for name in ("features.1.0.attn",
                                                              "features.1.1.attn",
                                                              "features.7.1.attn")}
        inputs = {name: torch.randn(2, *seen[name], m.qkv.in_features)
                  for name, m in feats.items()}
        other = torch.randn(2, 9, 9, feats["features.1.1.attn"].qkv.in_features)
        expected = {name: feats[name](inputs[name]) for name in feats}
        expected_other = feats["features.1.1.attn"](other)
        assert prepare(model, seen) == {}
        for name, m in feats.items():
            assert type(m) is cls
            assert rel_err(m(inputs[name]), expected[name]) < TOL
        assert rel_err(feats["features.1.1.attn"](other), expected_other) < TOL


def test_attention_dropout_still_drops_in_training() -> None:
    """The inlined attention's dropouts are modules, so the traced graph drops in train
    mode (F.dropout(training=self.training) would have been traced as never)."""
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10, attention_dropout=0.5).eval()
    x = torch.randn(1, 3, 64, 64)
    gm = s2h_fx.prune_graph(model, 1.0, (x,)).graph_module
    assert any(n.op == "call_module" and str(n.target).endswith("s2h_attn_drop")
               for n in gm.graph.nodes)
    for m in gm.modules():  # only the attention dropout left to make runs differ
        if type(m).__name__ == "StochasticDepth" or (
                isinstance(m, nn.Dropout) and m.p != 0.5):
            m.p = 0.0
    with torch.no_grad():
        outs = []
        for mode in (True, False):
            gm.train(mode)
            for seed in (1, 2):
                torch.manual_seed(seed)
                outs.append(gm(x))
        assert rel_err(outs[0], outs[1]) > 1e-3  # training: two draws differ
        assert rel_err(outs[2], outs[3]) == 0.0  # eval: no dropout


def test_shift_mask_follows_the_model_dtype() -> None:
    """A bfloat16 Swin: the shifted windows' mask is a bfloat16 buffer (a float32 mask
    promoted the attention and the traced graph failed)."""
    model = swin_t().to(torch.bfloat16)
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    masks = [b for name, b in pruner.graph_module.named_buffers()  # traced as constants
             if name.startswith("_tensor_constant") and b.ndim == 5]
    assert masks and all(b.dtype == torch.bfloat16 for b in masks)
    with torch.no_grad():
        assert rel_err(pruner(x).float(), model(x).float()) < 1e-2
