"""``nn.MultiheadAttention`` traced as its ops, so that its head width prunes.

The toy blocks (``mha_*`` in tests/toy_zoo.py) also go through the numerical ladder
(tests/test_ladder.py); here: the decomposition equals torch's module (eval fast path
included) in every form the tracer inlines, the attention's channels are prunable
groups with the widths the module implies, the forms it cannot express stay whole
with their reason, and torchvision's VisionTransformer prunes its attention.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import s2h_fx
from s2h_fx.passes.trace_model import S2H_TRACE, trace_model

from helpers import count_flops, random_keep, rel_err
from toy_zoo import TorchAttention, tokens

TOL = 1e-5


class Call(nn.Module):
    """One attention call, with the options the decomposition must reproduce."""

    def __init__(self, mask: str | None = None, weights: str | None = None,
                 causal: bool = False, **kw: object) -> None:
        super().__init__()
        self.mask, self.weights, self.causal = mask, weights, causal
        self.embed = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, **kw)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(3)
        masks = {"bool2d": torch.rand(6, 6, generator=g) > 0.7,
                 "float3d": torch.randn(2 * 4, 6, 6, generator=g),
                 "causal": torch.ones(6, 6, dtype=torch.bool).triu(1)}
        for k in masks:  # no row fully masked: the diagonal is always attended
            if masks[k].dtype == torch.bool:
                masks[k].fill_diagonal_(False)
        self.register_buffer("m", masks[mask] if mask else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        need = self.weights is not None
        out, w = self.attn(h, h, h, attn_mask=self.m, need_weights=need, is_causal=self.causal,
                           average_attn_weights=self.weights != "per_head")
        if self.weights is None:
            return out
        return out.sum(-1) + (w.sum(1) if self.weights == "per_head" else w).sum(-1)


CALLS = {
    "plain": lambda: Call(),
    "no_bias": lambda: Call(bias=False),
    "bool_mask": lambda: Call("bool2d"),
    "float_mask_3d": lambda: Call("float3d"),
    "causal": lambda: Call("causal", causal=True),
    "weights_used": lambda: Call("bool2d", weights="mean"),
    "weights_per_head": lambda: Call(weights="per_head"),
    "dropout": lambda: Call(dropout=0.5),
    "kdim": lambda: Call(kdim=32, vdim=32),
}


def _leaf_attention(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), nn.MultiheadAttention)]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_decomposition_equals_the_module(name: str, grad: bool) -> None:
    # eval + no_grad: torch takes its fused fast path; with grad: the Python path
    torch.manual_seed(0)
    model, x = CALLS[name]().eval(), tokens()
    gm = trace_model(model, (x,))
    assert _leaf_attention(gm) == []  # traced as ops, not kept whole
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    with torch.set_grad_enabled(grad):
        assert rel_err(gm(x), model(x)) < TOL


def test_dropout_is_a_module_that_follows_train_and_eval() -> None:
    torch.manual_seed(0)
    model, x = CALLS["dropout"]().eval(), tokens()
    gm = trace_model(model, (x,))
    drops = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.5]
    gm.train()
    with torch.no_grad():
        assert rel_err(gm(x), gm(x)) > 1e-3  # attention dropout is on in training
        gm.eval()
        assert rel_err(gm(x), model(x)) < TOL


def _attention_groups(pruner: s2h_fx.Pruner, qualname: str) -> dict[int, int]:
    """Prunable groups that hold the attention's out_proj input (head width) or output."""
    out = {}
    for g in pruner.grouping.prunable:
        if any(m.startswith(f"{qualname}.out_proj") for m in g.members):
            out[g.index] = g.size
    return out


@pytest.mark.parametrize("form", ["self", "self_seq", "cross"])
def test_toy_attention_prunes_head_width_and_embedding(form: str) -> None:
    torch.manual_seed(0)
    model, x = TorchAttention(form).eval(), tokens()
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), attention="width")
    # head width: 16 = 32 / 2 heads (q, k, v and out_proj's input); embedding: 32
    assert sorted(_attention_groups(pruner, "attn").values()) == [16, 32]
    pruned = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < TOL
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in pruned.modules())
    groups = _attention_groups(pruner, "attn")
    head = pruner.widths[min(groups, key=groups.__getitem__)]
    assert pruned.get_submodule("attn.out_proj").weight.shape[1] == 2 * head
    names = dict(pruned.named_parameters())
    if form == "cross":  # q, k and v take different inputs: three projections
        assert names["attn.k_proj_weight"].shape[0] == 2 * head
    else:
        assert names["attn.in_proj_weight"].shape[0] == 3 * 2 * head


def test_add_bias_kv_stays_whole_with_its_reason() -> None:
    torch.manual_seed(0)
    model, x = TorchAttention("bias_kv").eval(), tokens()
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))
    assert _attention_groups(pruner, "attn") == {}
    frozen = [r for g in pruner.grouping.frozen for r in g.frozen]
    assert any("add_bias_kv=True" in r for r in frozen), frozen
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL


class Padded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.attn = nn.Linear(12, 32), nn.MultiheadAttention(32, 2, batch_first=True)
        self.register_buffer("pad", torch.zeros(2, 6, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.attn(h, h, h, key_padding_mask=self.pad, need_weights=False)[0]


def test_key_padding_mask_stays_a_leaf_with_its_reason() -> None:
    gm = trace_model(Padded().eval(), (tokens(),))
    assert _leaf_attention(gm) == ["attn"]
    assert "key_padding_mask given" in gm.meta[S2H_TRACE]["leaves"]["attn"]


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=48,
        num_classes=10).eval()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torchvision_vit_prunes_its_attention(train: bool) -> None:
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: outputs all 0
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))
    model.train(train)
    pruner.train(train)
    with torch.no_grad():
        assert rel_err(pruner.hard_forward(x), model(x)) < TOL
        assert rel_err(pruner.soft_forward(x), model(x)) < TOL
    for i in range(2):
        groups = _attention_groups(pruner, f"encoder.layers.encoder_layer_{i}.self_attention")
        assert 16 in groups.values()  # each block's head width (32 / 2 heads)
    for seed in range(2):
        widths, keep = random_keep(pruner, seed)
        pruner.set_widths(widths, keep)
        pruned = pruner.export().train(train)
        with torch.no_grad():
            assert rel_err(pruned(x), pruner.hard_forward(x)) < TOL
        assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def test_unused_weights_cost_nothing() -> None:
    # need_weights=True (the default) with the weights ignored: the attention runs as
    # SDPA and the weights' separate computation is dead code, dropped at trace time
    torch.manual_seed(0)
    model, x = TorchAttention("self_seq").eval(), tokens()
    gm = trace_model(model, (x,))
    targets = [n.target for n in gm.graph.nodes]
    assert torch.nn.functional.scaled_dot_product_attention in targets
    assert "softmax" not in targets
