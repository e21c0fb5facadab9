"""``torch.einsum`` written as the matrix product it is, before the analysis.

Attention is often written with einsum (torchvision's MaxViT:
``einsum("BGHID,BGHJD->BGHIJ", q, k)`` then ``einsum("BGHIJ,BGHJD->BGHID", a, v)``).
The coupling rules know ``matmul`` (which channels it contracts, which it passes on,
how heads are kept whole); an einsum that is exactly a batched matrix product over the
same leading axes is rewritten into one, so the same rules apply:

- ``X i d, X j d -> X i j``: ``a @ b.transpose(-2, -1)``
- ``X i j, X j d -> X i d``: ``a @ b``

(X: the same leading letters, in the same order, in all three; no ellipsis, no
repeated letter). Any other einsum is left as it is: it has no rule, and the groups it
touches are frozen with that reason.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

log = logging.getLogger(__name__)


def _operands(node: fx.Node) -> tuple[str, fx.Node, fx.Node] | None:
    args = node.args
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args = (args[0], *args[1])
    if len(args) != 3 or node.kwargs or not isinstance(args[0], str):
        return None
    a, b = args[1], args[2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    return args[0].replace(" ", ""), a, b


def _form(equation: str) -> str | None:
    """"nt" (a @ bᵀ), "nn" (a @ b) or None."""
    if "..." in equation or "->" not in equation:
        return None
    lhs, out = equation.split("->")
    ins = lhs.split(",")
    if len(ins) != 2 or any(len(set(s)) != len(s) for s in (*ins, out)):
        return None
    (x, y), z = ins, out
    if not (len(x) == len(y) == len(z) >= 2 and x[:-2] == y[:-2] == z[:-2]):
        return None
    i, p, j, q = x[-2], x[-1], y[-2], y[-1]
    if len({i, p, j, q} - set(x[:-2])) != len({i, p, j, q}):
        return None
    if p == q and i != j and z[-2:] == i + j and p not in z:
        return "nt"
    if p == j and i != q and z[-2:] == i + q and p not in z:
        return "nn"
    return None


def einsums_as_matmul(gm: fx.GraphModule) -> int:
    """Rewrite each einsum of ``gm`` that is a batched matrix product (see module
    docstring) into ``torch.matmul``; returns how many. The graph is linted and
    recompiled when one was rewritten."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.einsum:
            continue
        found = _operands(node)
        form = _form(found[0]) if found else None
        if found is None or form is None:
            continue
        _, a, b = found
        with gm.graph.inserting_before(node):
            if form == "nt":
                b = gm.graph.call_method("transpose", (b, -2, -1))
                b.meta.update({k: node.meta[k] for k in ("stack_trace", "nn_module_stack")
                               if k in node.meta})
            new = gm.graph.call_function(torch.matmul, (a, b))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
        log.info("%d einsum(s) rewritten as matmul", done)
    return done
