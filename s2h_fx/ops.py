"""One registry entry per op: how it moves channels, and what changes when they go.

An op that s2h-fx does not know is a boundary: the channels it touches are frozen,
with the reason. Teaching it an op takes up to three functions, registered together
by :func:`register_op` (or one at a time with the three ``register_*`` below):

* ``rule(ctx, node)``: the coupling rule (:func:`s2h_fx.register_rule`) says which
  channel ids the op's output carries on which axes and which ids it couples;
* ``surgery(module, input_shape)`` (module types only,
  :func:`s2h_fx.register_surgery`): after the module's parameters are sliced, set
  every attribute that records a width (``in_channels``, ``num_heads``, ...);
* ``rewrite(node, ctx)`` (:func:`s2h_fx.passes.plan_surgery.register_rewrite`): the
  node's new ``(args, kwargs)`` when its arguments hold channel counts (reshape
  sizes, split sizes, slice bounds); ``ctx.shape(node)`` is its pruned output shape.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from s2h_fx.passes.plan_surgery import Rewrite, register_rewrite
from s2h_fx.rules.base import Rule, register_rule
from s2h_fx.surgery import Surgery, register_surgery


def register_op(*targets: Any, rule: Rule | None = None, surgery: Surgery | None = None,
                rewrite: Rewrite | None = None) -> None:
    """Register an op's rule, module surgery and argument rewrite in one call.

    ``targets``: module types, functions (wrap your own with ``torch.fx.wrap`` so
    tracing keeps them as one node) or method names. Entries replace earlier ones
    for the same target, the built-in ones included.

    >>> register_op(my_pool_to, rule=my_pool_to_rule,
    ...             rewrite=lambda node, ctx: ((node.args[0], ctx.shape(node)[1]), {}))
    """
    if not targets:
        raise TypeError("register_op needs at least one target")
    if rule is None and surgery is None and rewrite is None:
        raise TypeError("register_op needs a rule, a surgery or a rewrite")
    if surgery is not None:
        bad = [t for t in targets if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if bad:
            raise TypeError(f"a surgery updates module attributes: {bad} are not module types")
        register_surgery(*targets)(surgery)
    if rule is not None:
        register_rule(*targets)(rule)
    if rewrite is not None:
        register_rewrite(*targets)(rewrite)


__all__ = ["register_op", "register_rewrite", "register_rule", "register_surgery"]
