"""``nn.MultiheadAttention`` traced as the ops it computes, so its head width prunes.

torch's ``F.multi_head_attention_forward`` requires ``embed_dim == num_heads *
head_dim`` on its input and packed projections, so a pruned head width cannot live
inside an ``nn.MultiheadAttention``. Instead the tracer replaces each call it can
express exactly by its decomposition over the module's own parameters:
``F.linear`` with ``in_proj_weight``/``in_proj_bias`` (one fused projection for
self-attention; three for cross-attention, see :func:`split_projections`), a
reshape to ``(..., 3, heads, head_dim)`` or three views to ``(..., heads,
head_dim)``, ``F.scaled_dot_product_attention`` with the *original*
``1/sqrt(head_dim)`` scale (or ``softmax(q kᵀ) v`` where the weights are returned or
attention dropout is on), the heads merged back and ``F.linear`` with ``out_proj``.
The coupling rules and surgery of those ops then prune the head width, and the
emitted graph is the decomposition with sliced parameters (no
``nn.MultiheadAttention`` object is left in it: the parameters sit in plain module
containers at the same qualified names).

What cannot be expressed exactly stays a ``call_module`` leaf (its boundary channels
frozen) with the reason from :func:`unsupported`: ``add_bias_kv``, ``add_zero_attn``,
a ``key_padding_mask`` (torch's eval fast path turns it into nested tensors that
zero padded positions), unbatched inputs, a module not called on the example inputs
or called with differing kinds of input.

The facts the trace cannot see (the rank of the query, the dtype and rank of the
attention mask) come from one eager run on the example inputs (:func:`s2h_fx.observe.observe_calls`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from s2h_fx.errors import InputError
from s2h_fx.observe import Recorder

log = logging.getLogger(__name__)

DROPOUT_NAME = "attn_dropout"  # nn.Dropout added to an inlined module with dropout > 0
_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@dataclass(frozen=True)
class AttentionCall:
    """What one eager call of an ``nn.MultiheadAttention`` was given."""

    query_ndim: int
    self_attention: bool  # query is key is value
    key_padding_mask: bool
    mask: tuple[bool, int] | None  # (is bool, ndim) of attn_mask
    dtype: torch.dtype


Observed = dict[str, AttentionCall | str]  # qualname -> its one kind of call, or why not


def _call_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> AttentionCall:
    b = bind(args, kwargs)
    q, k, v, mask = (b[n] for n in ("query", "key", "value", "attn_mask"))
    shape = None if mask is None else (mask.dtype == torch.bool, mask.dim())
    return AttentionCall(q.dim(), q is k and k is v, b["key_padding_mask"] is not None,
                         shape, q.dtype)


# what :func:`s2h_fx.observe.observe_calls` watches for this module
RECORDER: Recorder = (lambda m: isinstance(m, nn.MultiheadAttention),
                      lambda m, args, kwargs: _call_of(args, kwargs))


def module_reason(m: nn.MultiheadAttention) -> str | None:
    """Why no call of ``m`` can be inlined, or None."""
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True"
    if m.add_zero_attn:
        return "add_zero_attn=True"
    return None


def observed_reason(call: AttentionCall | str | None) -> str | None:
    """Why a module called so on the example inputs cannot be inlined, or None."""
    if call is None:
        return "not called on the example inputs"
    if isinstance(call, str):
        return call
    if call.key_padding_mask:
        return "key_padding_mask given"
    if call.query_ndim != 3:
        return "unbatched (2-D) query"
    if call.mask is not None and call.mask[1] not in (2, 3):
        return f"attn_mask of rank {call.mask[1]}"
    return None


def call_reason(call: AttentionCall, bound: dict[str, Any]) -> str | None:
    """Why this traced call is not the call observed on the example inputs, or None."""
    flags = ("need_weights", "average_attn_weights", "is_causal")
    if not all(isinstance(bound[f], bool) for f in flags):
        return "need_weights, average_attn_weights or is_causal computed in the graph"
    if bound["key_padding_mask"] is not None or (bound["attn_mask"] is None) != (call.mask is None):
        return "traced with other masks than it ran with on the example inputs"
    if call.self_attention and not (bound["query"] is bound["key"] is bound["value"]):
        return "traced as cross-attention but ran as self-attention on the example inputs"
    return None


def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``nn.MultiheadAttention.forward``'s arguments by name, defaults filled in."""
    b = _SIGNATURE.bind(None, *args, **kwargs)
    b.apply_defaults()
    return dict(b.arguments)


def split_projections(m: nn.MultiheadAttention) -> None:
    """Give ``m`` one weight and one bias per projection (``q_proj_weight``, ...,
    ``q_proj_bias``, ...) in place of the packed ones, so that cross-attention's three
    ``F.linear`` take bare parameters (their coupling rule needs them). ``m`` must only
    ever be called inlined after this. Running it twice changes nothing."""
    if m.in_proj_weight is not None:
        for name, w in zip(("q", "k", "v"), m.in_proj_weight.detach().chunk(3)):
            setattr(m, f"{name}_proj_weight", nn.Parameter(w.clone(), m.in_proj_weight.requires_grad))
        m.register_parameter("in_proj_weight", None)
        m._qkv_same_embed_dim = False
    if m.in_proj_bias is not None:
        for name, b in zip(("q", "k", "v"), m.in_proj_bias.detach().chunk(3)):
            m.register_parameter(f"{name}_proj_bias", nn.Parameter(b.clone(), m.in_proj_bias.requires_grad))
        m.register_parameter("in_proj_bias", None)


def _bias(m: nn.Module, name: str) -> torch.Tensor | None:
    return getattr(m, name, None)


def _heads(t: Any, m: nn.MultiheadAttention, d0: Any, d1: Any) -> Any:
    """(d0, d1, E) -> (B, H, L, D)."""
    t = t.reshape(d0, d1, m.num_heads, m.head_dim)
    return t.transpose(1, 2) if m.batch_first else t.permute(1, 2, 0, 3)


def _projections(m: nn.MultiheadAttention, b: dict[str, Any]) -> tuple[Any, Any, Any]:
    q, k, v = b["query"], b["key"], b["value"]
    if m.in_proj_weight is not None:  # self-attention: one fused projection
        d0, d1 = q.shape[0], q.shape[1]
        fused = F.linear(q, m.in_proj_weight, m.in_proj_bias).reshape(d0, d1, 3, m.num_heads, m.head_dim)
        parts = fused.permute(*((2, 0, 3, 1, 4) if m.batch_first else (2, 1, 3, 0, 4))).unbind(0)
        return parts[0], parts[1], parts[2]
    out = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        p = F.linear(t, getattr(m, f"{name}_proj_weight"), _bias(m, f"{name}_proj_bias"))
        out.append(_heads(p, m, t.shape[0], t.shape[1]))
    return out[0], out[1], out[2]


def _mask(b: dict[str, Any], call: AttentionCall, heads: int) -> tuple[Any, bool]:
    """The attention mask broadcastable to (B, H, L, S), and whether it is a bool mask
    (True: *not* attended, as in ``nn.MultiheadAttention``; the float form would be a
    tensor of -inf, which the pruner takes for a diverged constant)."""
    mask = b["attn_mask"]
    if mask is None or call.mask is None:
        return None, False
    is_bool, ndim = call.mask
    if ndim == 3:  # (B * H, L, S), head fastest
        mask = mask.unflatten(0, (-1, heads))
    return mask, is_bool


def _explicit(q: Any, k: Any, v: Any, mask: tuple[Any, bool],
              drop: Callable[[Any], Any] | None, scale: float) -> tuple[Any, Any]:
    """softmax(q kᵀ · scale + mask), its dropout, and the weights times v."""
    w = (q * scale) @ k.transpose(-2, -1)
    if mask[0] is not None:
        w = w.masked_fill(mask[0], float("-inf")) if mask[1] else w + mask[0]
    w = w.softmax(dim=-1)
    if drop is not None:
        w = drop(w)
    return w @ v, w


def inline_forward(m: nn.MultiheadAttention, b: dict[str, Any], call: AttentionCall) -> tuple[Any, Any]:
    """``m``'s forward on proxies, as plain ops over its parameters (see the module doc)."""
    q, k, v = _projections(m, b)
    scale = float(m.head_dim) ** -0.5  # the original width's: pruning keeps the function
    mask = _mask(b, call, m.num_heads)
    drop = getattr(m, DROPOUT_NAME, None)
    weights: Any = None
    if drop is not None:
        o, weights = _explicit(q, k, v, mask, drop, scale)
    else:
        causal = b["is_causal"] and not b["need_weights"]
        sdpa_mask = None if causal or mask[0] is None else (
            mask[0].logical_not() if mask[1] else mask[0])  # SDPA's bool: True is attended
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal,
                                           scale=scale)
        if b["need_weights"]:  # a separate computation, dropped as dead code if unused
            weights = _explicit(q, k, v, mask, None, scale)[1]
    d0, d1 = b["query"].shape[0], b["query"].shape[1]
    o = (o.transpose(1, 2) if m.batch_first else o.permute(2, 0, 1, 3)).reshape(d0, d1, -1)
    out = F.linear(o, m.out_proj.weight, m.out_proj.bias)
    if not b["need_weights"]:
        return out, None
    return out, weights.mean(dim=1) if b["average_attn_weights"] else weights


class InlinedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose forward is :func:`inline_forward` for the kind of
    call seen on the example inputs (``s2h_call``). Not a torch.nn class, so torch.fx
    traces its forward into plain ops; run eagerly it computes the same function (where
    the tracer falls back to keeping it, or a module around it, whole)."""

    s2h_call: AttentionCall

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        b = bind(args, kwargs)
        why = call_reason(self.s2h_call, b)
        if why is None:
            return inline_forward(self, b, self.s2h_call)
        if self.in_proj_weight is None:  # projections split: torch's forward would be wrong
            raise InputError(
                f"an inlined nn.MultiheadAttention was called unlike on the example inputs "
                f"({why}); pass example inputs that reach it the way the model calls it")
        return super().forward(*args, **kwargs)


def prepare(model: nn.Module, observed: Observed) -> dict[str, str]:
    """Get ``model`` (the tracer's working copy, modified in place) ready to trace its
    attention: each ``nn.MultiheadAttention`` that can be inlined becomes an
    :class:`InlinedMultiheadAttention` (same object and parameters; an ``nn.Dropout``
    added where it has attention dropout; projections split for cross-attention).
    Returns the reason of each one that stays a leaf."""
    leaves: dict[str, str] = {}
    for name, m in model.named_modules():
        if type(m) is not nn.MultiheadAttention:
            continue
        call = observed.get(name)
        why = module_reason(m) or observed_reason(call)
        if why is not None or not isinstance(call, AttentionCall):
            leaves[name] = leaf_reason(why or "not called on the example inputs")
            continue
        if m.dropout > 0:
            m.add_module(DROPOUT_NAME, nn.Dropout(m.dropout))
        if not call.self_attention or not m._qkv_same_embed_dim:
            split_projections(m)
        m.__class__ = InlinedMultiheadAttention
        cast(InlinedMultiheadAttention, m).s2h_call = call
    if leaves:
        log.info("nn.MultiheadAttention kept whole: %s",
                 "; ".join(f"{k}: {v}" for k, v in leaves.items()))
    return leaves


def leaf_reason(why: str) -> str:
    return f"nn.MultiheadAttention kept whole ({why}): its head width is not pruned"
