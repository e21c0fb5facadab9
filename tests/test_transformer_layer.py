"""``nn.Transformer`` and its encoder/decoder (layers) traced as their ops, so they prune.

torch keeps these torch.nn classes whole under torch.fx; s2h-fx traces torch's slow path
over their own parameters (s2h_fx/transformer_layer.py). Here: the traced graph computes
what the module computes (eval with torch's fused fast path, eval with grad, train with
dropout 0), the feed-forward width, each attention's head width and the embedding are
prunable groups of the sizes the layer's arguments imply, export at budget 0.5 equals the
hard network within its FLOPs, and what cannot be traced exactly stays whole with why.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx
from s2h_fx.errors import NoPrunableChannelsError
from s2h_fx.passes.trace_model import S2H_TRACE, trace_model

from helpers import count_flops, rel_err

TOL = 1e-5
E, HEADS, FF, L, B = 32, 2, 48, 6, 2  # head width: E / HEADS = 16
TORCH_CLASSES = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                 nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


def causal() -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool).triu(1)  # True: not attended


class OneLayer(nn.Module):
    """tokens -> Linear -> one encoder or decoder layer -> mean -> Linear. A decoder's
    memory comes from its own Linear (a second embedding, read by the cross-attention)."""

    def __init__(self, decoder: bool, batch_first: bool, norm_first: bool, activation: Any,
                 mask: str | None = "bool", dropout: float = 0.0, causal_hint: bool = False,
                 padding: bool = False, **options: Any) -> None:
        super().__init__()
        self.decoder, self.batch_first, self.hint = decoder, batch_first, causal_hint
        cls = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
        self.embed = nn.Linear(12, E)
        self.memory = nn.Linear(12, E) if decoder else None
        self.layer = cls(E, HEADS, FF, dropout, activation=activation, batch_first=batch_first,
                         norm_first=norm_first, **options)
        self.head = nn.Linear(E, 5)
        g = torch.Generator().manual_seed(1)
        masks = {"bool": causal(), "float": torch.randn(L, L, generator=g),
                 "bool3d": (torch.rand(B * HEADS, L, L, generator=g) > 0.6) & ~torch.eye(L, dtype=torch.bool)}
        self.register_buffer("mask", masks[mask] if mask else None)
        self.register_buffer("pad", torch.zeros(B, L, dtype=torch.bool) if padding else None)

    def _seq(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batch_first else t.transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._seq(self.embed(x))
        if self.memory is not None:
            m = self._seq(self.memory(x))
            h = self.layer(h, m, tgt_mask=self.mask, tgt_key_padding_mask=self.pad,
                           tgt_is_causal=self.hint)
        else:
            h = self.layer(h, src_mask=self.mask, src_key_padding_mask=self.pad,
                           is_causal=self.hint)
        return self.head(self._seq(h).mean(1))


def tokens() -> torch.Tensor:
    return torch.randn(B, L, 12)


ACTIVATIONS = {"relu": "relu", "gelu": F.gelu}  # a string and a function
LAYERS = [(dec, bf, nf, act) for dec in (False, True) for bf in (True, False)
          for nf in (False, True) for act in ACTIVATIONS]


def _id(case: tuple[bool, bool, bool, str]) -> str:
    dec, bf, nf, act = case
    return f"{'decoder' if dec else 'encoder'}-{'bf' if bf else 'seq'}-{'pre' if nf else 'post'}-{act}"


def _traced(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """The traced graph, with no transformer or attention module left whole in it."""
    gm = trace_model(model, (x,))
    assert gm.meta[S2H_TRACE]["leaves"] == {}
    assert not any(isinstance(m, TORCH_CLASSES) for m in gm.modules())
    return gm


def _same_as_module(model: nn.Module, gm: torch.fx.GraphModule, x: torch.Tensor,
                    fast_path: bool = True) -> None:
    if fast_path:
        with torch.no_grad():  # eval without grad: torch's fused fast path where it has one
            assert rel_err(gm(x), model(x)) < TOL
    assert rel_err(gm(x), model(x)) < TOL  # eval with grad: torch's slow path
    model.train(), gm.train()  # dropout 0: training computes the same function
    assert rel_err(gm(x), model(x)) < TOL
    model.eval(), gm.eval()


def _sizes(pruner: s2h_fx.Pruner) -> list[int]:
    return sorted(g.size for g in pruner.grouping.prunable)


def _member_group(pruner: s2h_fx.Pruner, member: str) -> Any:
    (g,) = [g for g in pruner.grouping.prunable if member in g.members]
    return g


def _widths_consistent(module: nn.Module) -> None:
    """Every module left in the emitted graph claims the width its tensors have."""
    for name, m in module.named_modules():
        assert not isinstance(m, TORCH_CLASSES), f"{name} is a {type(m).__name__}"
        if isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
        if isinstance(m, nn.LayerNorm):
            assert tuple(m.weight.shape) == m.normalized_shape, name


def _prune_and_export(model: nn.Module, x: torch.Tensor,
                      attention: str = "auto") -> tuple[s2h_fx.Pruner, nn.Module]:
    dense = count_flops(model.train(), (x,))  # training: torch's slow path, every op counted
    model.eval()
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), attention=attention)
    pruned = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < TOL  # exported == hard network
    assert count_flops(pruned, (x,)) / dense <= 0.5 + 0.005
    _widths_consistent(pruned)
    return pruner, pruned


@pytest.mark.parametrize("case", LAYERS, ids=[_id(c) for c in LAYERS])
def test_layer_traces_as_its_ops_and_prunes(case: tuple[bool, bool, bool, str]) -> None:
    decoder, batch_first, norm_first, act = case
    torch.manual_seed(0)
    model = OneLayer(decoder, batch_first, norm_first, ACTIVATIONS[act]).eval()
    x = tokens()
    gm = _traced(model, x)
    _same_as_module(model, gm, x)
    pruner, pruned = _prune_and_export(model, x, "width")
    # embedding E; the feed-forward width FF; each attention's head width E / HEADS (a
    # decoder's cross-attention: its query/key width and its value width apart, as q
    # and v come from different projections); a decoder's memory embedding E (its own
    # Linear and the cross-attention's k, v inputs)
    assert _sizes(pruner) == ([16, 16, 16, 32, 32, 48] if decoder else [16, 32, 48])
    ff = _member_group(pruner, "layer.linear1:out")
    assert ff.size == FF
    assert pruned.get_submodule("layer.linear1").out_features == pruner.widths[ff.index]
    assert pruned.get_submodule("layer.linear2").in_features == pruner.widths[ff.index]
    emb = pruner.widths[_member_group(pruner, "embed:out").index]
    for norm in ("norm1", "norm2") + (("norm3",) if decoder else ()):  # norms follow
        assert pruned.get_submodule(f"layer.{norm}").normalized_shape == (emb,)


@pytest.mark.parametrize("mask,hint", [(None, False), ("float", False), ("bool3d", False),
                                       ("bool", True)])
def test_encoder_layer_masks_pass_through(mask: str | None, hint: bool) -> None:
    torch.manual_seed(0)
    model, x = OneLayer(False, True, False, "relu", mask=mask, causal_hint=hint).eval(), tokens()
    gm = _traced(model, x)
    # torch 2.14's fused encoder-layer kernel (eval, no grad) returns NaN for a float mask
    # of finite values (its slow path, the reference here, does not)
    _same_as_module(model, gm, x, fast_path=mask != "float")
    if mask is not None:  # the mask changes the function: the traced graph uses it
        unmasked = OneLayer(False, True, False, "relu", mask=None).eval()
        unmasked.load_state_dict(model.state_dict(), strict=False)
        assert rel_err(unmasked(x), model(x)) > 1e-3  # with grad: torch's slow path


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
def test_no_bias_and_layer_norm_eps(decoder: bool) -> None:
    torch.manual_seed(0)
    model = OneLayer(decoder, True, False, "gelu", bias=False, layer_norm_eps=0.5).eval()
    x = tokens()
    gm = _traced(model, x)
    _same_as_module(model, gm, x)
    pruner, pruned = _prune_and_export(model, x, "width")
    assert _sizes(pruner) == ([16, 16, 16, 32, 32, 48] if decoder else [16, 32, 48])
    norm = pruned.get_submodule("layer.norm1")
    assert norm.eps == 0.5 and norm.bias is None
    assert pruned.get_submodule("layer.linear1").bias is None


def test_dropout_modules_follow_train_and_eval() -> None:
    torch.manual_seed(0)
    model, x = OneLayer(False, True, False, "relu", dropout=0.3).eval(), tokens()
    gm = _traced(model, x)
    # the layer's dropout, dropout1, dropout2, and the attention's dropout on its weights
    assert sorted(d.p for d in gm.modules() if isinstance(d, nn.Dropout)) == [0.3] * 4
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < TOL
        gm.train()
        assert rel_err(gm(x), gm(x)) > 1e-3  # two draws differ
        gm.eval()
        assert rel_err(gm(x), model(x)) < TOL


class Unbatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(12, E), nn.Linear(E, 5)
        self.layer = nn.TransformerEncoderLayer(E, HEADS, FF, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x[0])).mean(0))  # (L, E): no batch axis


class PaddedEncoder(nn.Module):
    """An nn.TransformerEncoder given a key padding mask: in eval without grad torch runs
    its layers on nested tensors (padded positions dropped, zeros in the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(12, E), nn.Linear(E, 5)
        self.layer = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(E, HEADS, FF, 0.0, batch_first=True), 2)
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[0, -2:] = True  # the first sequence is two tokens shorter
        self.register_buffer("pad", pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x), src_key_padding_mask=self.pad).mean(1))


LEAVES = {  # model, the reason its module "layer" stays whole
    "padding": (lambda: OneLayer(False, True, False, "relu", padding=True),
                "src_key_padding_mask given"),
    "unbatched": (Unbatched, "unbatched (2-D) src"),
    "encoder_padding": (PaddedEncoder, "src_key_padding_mask given"),
}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("form", sorted(LEAVES))
def test_what_cannot_be_traced_exactly_stays_whole_with_its_reason(form: str) -> None:
    torch.manual_seed(0)
    make, why = LEAVES[form]
    model, x = make().eval(), tokens()
    gm = trace_model(model, (x,))
    assert why in gm.meta[S2H_TRACE]["leaves"]["layer"]
    # torch's own classes inside, attention included (the leaf runs torch's forward)
    assert all(type(m) in TORCH_CLASSES for m in gm.get_submodule("layer").modules()
               if isinstance(m, TORCH_CLASSES))
    assert type(gm.get_submodule("layer")) in TORCH_CLASSES
    _same_as_module(model, gm, x)
    if form == "padding":  # the embedding around the layer is frozen, and says why
        with pytest.raises(NoPrunableChannelsError, match="src_key_padding_mask given"):
            s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))


class Classifier(nn.Module):
    """An nn.TransformerEncoder (2 layers, a module activation, a final norm) or a whole
    nn.Transformer (its target from a second embedding, a causal target mask)."""

    def __init__(self, whole: bool) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(12, E), nn.Linear(E, 5)
        if whole:
            self.net: nn.Module = nn.Transformer(E, HEADS, 2, 1, FF, 0.0, batch_first=True)
            self.target = nn.Linear(12, E)
        else:
            layer = nn.TransformerEncoderLayer(E, HEADS, FF, 0.0, activation=nn.GELU(),
                                               batch_first=True)
            self.net = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E))
        self.register_buffer("causal", causal())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if isinstance(self.net, nn.Transformer):
            h = self.net(h, self.target(x), tgt_mask=self.causal)
        else:
            h = self.net(h, mask=self.causal)
        return self.head(h.mean(1))


@pytest.mark.parametrize("whole", [False, True], ids=["encoder", "transformer"])
def test_classifier_end_to_end(whole: bool) -> None:
    torch.manual_seed(0)
    model, x = Classifier(whole).eval(), tokens()
    gm = _traced(model, x)
    _same_as_module(model, gm, x)
    full = s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))
    model.train(), full.train()  # masks at one: both branches are the model (dropout 0)
    with torch.no_grad():
        assert rel_err(full.soft_forward(x), model(x)) < TOL
        assert rel_err(full.hard_forward(x), model(x)) < TOL
    model.eval()
    pruner, pruned = _prune_and_export(model, x)
    # a final norm sits on its stack's embedding: it follows that embedding's width
    norms = ({"net.encoder.norm": "embed:out", "net.decoder.norm": "target:out"} if whole
             else {"net.norm": "embed:out"})
    for norm, producer in norms.items():
        width = pruner.widths[_member_group(pruner, producer).index]
        assert pruned.get_submodule(norm).normalized_shape == (width,)
    layers = (["net.encoder.layers.0", "net.encoder.layers.1", "net.decoder.layers.0"] if whole
              else ["net.layers.0", "net.layers.1"])
    for layer in layers:
        g = _member_group(pruner, f"{layer}.linear1:out")
        assert g.size == FF
        assert pruned.get_submodule(f"{layer}.linear1").out_features == pruner.widths[g.index]
    # two encoder layers and a decoder's self-attention: one head width each; the
    # decoder's cross-attention: a query/key width and a value width
    assert _sizes(pruner).count(16) == (5 if whole else 2)


def test_attention_and_transformer_modules_are_observed_in_one_eager_run() -> None:
    """The tracer runs the model eagerly once to see how both kinds of module are called
    (not once per kind)."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.layer(x)
            return self.attn(h, h, h)[0]

    eager_runs: list[int] = []

    def count(module: nn.Module, args: tuple[Any, ...]) -> None:
        if type(args[0]) is torch.Tensor:  # not a tracing proxy
            eager_runs.append(1)

    model = Both().eval()
    model.register_forward_pre_hook(count)
    gm = trace_model(model, (torch.randn(2, 5, 16),))
    assert len(eager_runs) == 1
    assert not [n for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(str(n.target)),
                               (nn.MultiheadAttention, nn.TransformerEncoderLayer))]
