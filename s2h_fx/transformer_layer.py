"""``nn.Transformer`` and its layers traced as the ops they compute, so their widths prune.

``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``, ``nn.TransformerEncoder``,
``nn.TransformerDecoder`` and ``nn.Transformer`` are torch.nn classes, so torch.fx keeps
them whole (leaves) and every channel that touches them is frozen. Their forwards also
branch on what tracing cannot see (the fused fast path on ``self.training``,
``torch.is_grad_enabled()`` and the input's device; nested tensors from a key padding
mask; a causal mask detected by comparing values). For a call it can express exactly the
tracer gives each module a subclass (same object and parameters; not a torch.nn class, so
traced through) whose forward is torch's *slow path*, the one torch's fast paths equal:

- encoder layer: the attention mask made float as torch does (``_canonical_mask``), then
  ``norm1``/``norm2``, ``self_attn`` (traced by :mod:`s2h_fx.mha`), ``dropout1``,
  ``linear1 -> activation -> dropout -> linear2 -> dropout2`` and the residual adds, in
  the order ``norm_first`` says;
- decoder layer: torch's own forward (already plain ops: only its class kept it whole);
- encoder / decoder: the mask made float (encoder), each layer in turn, then ``norm``. A
  causal mask is *not* detected from its values (``is_causal=None`` with a mask passes
  ``is_causal=False``): the layers then apply the mask itself, which computes what the
  causal hint would (the hint only picks a kernel), and the graph stays right for any
  mask;
- ``nn.Transformer``: its encoder, then its decoder (its own shape checks are left out).

Dropouts stay ``nn.Dropout`` modules, so they follow ``train()``/``eval()``. What cannot
be expressed exactly stays a ``call_module`` leaf, its boundary channels frozen, with the
reason from :func:`observed_reason`: a key padding mask (``nn.MultiheadAttention`` keeps
it whole, and the encoder turns it into nested tensors), unbatched or nested input, a
module not called on the example inputs or called with differing kinds of input. Modules
inside a leaf stay torch's own (their ``nn.MultiheadAttention`` too).

Which masks a module is called with and whether they are bool come from one eager run on
the example inputs (:func:`s2h_fx.observe.observe_calls`), as for :mod:`s2h_fx.mha`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn

from s2h_fx.observe import Recorder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument of an eager call: bool or not, its rank, nested or not."""

    is_bool: bool
    ndim: int
    nested: bool = False


ArgKind = TensorArg | bool | str | None  # str: the type name of anything else


@dataclass(frozen=True)
class LayerCall:
    """What one eager call of a transformer module was given, argument by argument."""

    args: tuple[tuple[str, ArgKind], ...]

    def __getitem__(self, name: str) -> ArgKind:
        return dict(self.args)[name]


Observed = dict[str, LayerCall | str]  # qualname -> its one kind of call, or why not
_MASKS = {"src_mask", "mask", "tgt_mask", "memory_mask"}


def _kind(value: Any) -> ArgKind:
    if isinstance(value, torch.Tensor):
        if value.is_nested:
            return TensorArg(False, 0, nested=True)
        return TensorArg(value.dtype == torch.bool, value.dim())
    if value is None or isinstance(value, bool):
        return value
    return type(value).__name__


def bind(cls: type[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``cls.forward``'s arguments by name, defaults filled in."""
    b = inspect.signature(cls.forward).bind(None, *args, **kwargs)
    b.apply_defaults()
    return {k: v for k, v in b.arguments.items() if k != "self"}


def _call_of(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LayerCall:
    return LayerCall(tuple((k, _kind(v)) for k, v in bind(type(m), args, kwargs).items()))


# what :func:`s2h_fx.observe.observe_calls` watches for these modules
RECORDER: Recorder = (lambda m: type(m) in INLINED, _call_of)


def observed_reason(call: LayerCall | str | None) -> str | None:
    """Why a module called so on the example inputs cannot be traced as its ops, or None."""
    if call is None:
        return "not called on the example inputs"
    if isinstance(call, str):
        return call
    for name, kind in call.args:
        if name.endswith("key_padding_mask") and kind is not None:
            return f"{name} given: nn.MultiheadAttention keeps key padding masks whole"
        if isinstance(kind, TensorArg) and kind.nested:
            return f"{name} is a nested tensor"
        if name in ("src", "tgt", "memory") and isinstance(kind, TensorArg) and kind.ndim != 3:
            return f"unbatched ({kind.ndim}-D) {name}"
        if name in _MASKS and isinstance(kind, TensorArg) and kind.ndim not in (2, 3):
            return f"{name} of rank {kind.ndim}"
        if isinstance(kind, str):
            return f"{name} given as {kind}"
    return None


def call_reason(call: LayerCall, bound: dict[str, Any]) -> str | None:
    """Why this traced call is not the call observed on the example inputs, or None."""
    for name, kind in call.args:
        if _category(kind) != _category(bound[name]):
            return f"traced with another {name} than it ran with on the example inputs"
    return None


def _category(value: Any) -> str | None:
    """None, 'bool', 'tensor' (a tensor, a proxy or its record) or 'other'."""
    if value is None or isinstance(value, bool):
        return None if value is None else "bool"
    return "tensor" if isinstance(value, (torch.Tensor, TensorArg, fx.Proxy)) else "other"


def _float_mask(mask: Any, call: LayerCall, name: str, like: Any) -> Any:
    """torch's ``F._canonical_mask``: a bool mask (True: not attended) becomes 0 / -inf
    in ``like``'s dtype; a float mask is kept."""
    kind = call[name]
    if mask is None or not (isinstance(kind, TensorArg) and kind.is_bool):
        return mask
    # ``.to(device)`` first: a mask held by the model (a real tensor while tracing) then
    # becomes a graph node, not a constant of -inf (which export takes for divergence)
    return torch.where(mask.to(like.device), float("-inf"), 0.0).to(like.dtype)


class _Inlined:
    """The call seen on the example inputs; a traced call unlike it runs torch's forward
    (which torch.fx cannot trace: the tracer's fallback then keeps the module whole)."""

    s2h_call: LayerCall

    def _bound(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        b = bind(_TORCH_CLASS[type(self)], args, kwargs)
        why = call_reason(self.s2h_call, b)
        if why is not None:
            log.info("%s: %s; running torch's forward", type(self).__name__, why)
            return None
        return b


class InlinedTransformerEncoderLayer(_Inlined, nn.TransformerEncoderLayer):
    """torch's slow path (see the module doc), traced through."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        b = self._bound(args, kwargs)
        if b is None:
            return super().forward(*args, **kwargs)
        x, causal = b["src"], b["is_causal"]
        mask = _float_mask(b["src_mask"], self.s2h_call, "src_mask", x)
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), mask, None, is_causal=causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, mask, None, is_causal=causal))
        return self.norm2(x + self._ff_block(x))


class InlinedTransformerDecoderLayer(_Inlined, nn.TransformerDecoderLayer):
    """torch's forward is plain ops already: only its torch.nn class made it a leaf."""


class InlinedTransformerEncoder(_Inlined, nn.TransformerEncoder):
    """Its layers in turn and its norm; no nested tensors, no causal-mask detection."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        b = self._bound(args, kwargs)
        if b is None:
            return super().forward(*args, **kwargs)
        out = b["src"]
        mask = _float_mask(b["mask"], self.s2h_call, "mask", out)
        for layer in self.layers:
            out = layer(out, src_mask=mask, is_causal=b["is_causal"] is True,
                        src_key_padding_mask=None)
        return out if self.norm is None else self.norm(out)


class InlinedTransformerDecoder(_Inlined, nn.TransformerDecoder):
    """Its layers in turn and its norm; no causal-mask detection."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        b = self._bound(args, kwargs)
        if b is None:
            return super().forward(*args, **kwargs)
        out, causal = b["tgt"], b["tgt_is_causal"] is True
        for layer in self.layers:
            out = layer(out, b["memory"], tgt_mask=b["tgt_mask"], memory_mask=b["memory_mask"],
                        tgt_key_padding_mask=None, memory_key_padding_mask=None,
                        tgt_is_causal=causal, memory_is_causal=b["memory_is_causal"])
        return out if self.norm is None else self.norm(out)


class InlinedTransformer(_Inlined, nn.Transformer):
    """Its encoder, then its decoder (the batch and width checks of torch's forward left
    out: they ran on the example inputs)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        b = self._bound(args, kwargs)
        if b is None:
            return super().forward(*args, **kwargs)
        memory = self.encoder(b["src"], mask=b["src_mask"], src_key_padding_mask=None,
                              is_causal=b["src_is_causal"])
        return self.decoder(b["tgt"], memory, tgt_mask=b["tgt_mask"],
                            memory_mask=b["memory_mask"], tgt_key_padding_mask=None,
                            memory_key_padding_mask=None, tgt_is_causal=b["tgt_is_causal"],
                            memory_is_causal=b["memory_is_causal"])


INLINED: dict[type[nn.Module], type[nn.Module]] = {
    nn.TransformerEncoderLayer: InlinedTransformerEncoderLayer,
    nn.TransformerDecoderLayer: InlinedTransformerDecoderLayer,
    nn.TransformerEncoder: InlinedTransformerEncoder,
    nn.TransformerDecoder: InlinedTransformerDecoder,
    nn.Transformer: InlinedTransformer,
}
_TORCH_CLASS: dict[type, type[nn.Module]] = {v: k for k, v in INLINED.items()}


def prepare(model: nn.Module, observed: Observed,
            attention: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Get ``model`` (the tracer's working copy, modified in place) ready to trace its
    transformer modules: each one that can be traced exactly gets its ``Inlined`` class.
    ``attention`` is the record of the ``nn.MultiheadAttention`` calls (``observe_calls``); returned with each
    ``nn.MultiheadAttention`` inside a module kept whole marked so (it stays torch's).
    Returns the reason of each module that stays a leaf, and that record."""
    leaves: dict[str, str] = {}
    attention = dict(attention)
    whole: list[str] = []  # qualnames kept whole; named_modules lists parents first
    for name, m in model.named_modules():
        outer = next((w for w in whole if name.startswith(w + ".")), None)
        if outer is not None:
            if isinstance(m, nn.MultiheadAttention):
                attention[name] = f"inside {outer}, kept whole"
            continue
        if type(m) not in INLINED:
            continue
        why = observed_reason(observed.get(name))
        if why is not None:
            leaves[name] = leaf_reason(type(m), why)
            whole.append(name)
            continue
        m.__class__ = INLINED[type(m)]
        cast(_Inlined, m).s2h_call = cast(LayerCall, observed[name])
    if leaves:
        log.info("transformer modules kept whole: %s",
                 "; ".join(f"{k}: {v}" for k, v in leaves.items()))
    return leaves, attention


def leaf_reason(cls: type[nn.Module], why: str) -> str:
    return (f"nn.{cls.__name__} kept whole ({why}): its feed-forward width, head width and "
            "embedding are not pruned")
