"""Pass 5b: emit the physically pruned graph from a SurgeryPlan.

Reads: the masked GraphModule (insert_masks) and a SurgeryPlan (plan_surgery).
Returns: a new ``GraphModule`` (the input is not changed): mask nodes and mask
modules dropped, every planned parameter/buffer sliced, every module's width
attributes updated through the surgery registry, planned arguments rewritten.
Postcondition: linted, recompiled; running it on its own output with an empty
plan changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from s2h_fx.channels import S2H_LAYOUT, S2H_MASK_SITE
from s2h_fx.copying import copy_module
from s2h_fx.passes.find_channel_groups import S2H_FLOP_REFS, S2H_MIXING
from s2h_fx.passes.plan_surgery import SurgeryPlan  # noqa: I001
from s2h_fx.passes.trace_model import drop_dead_code
from s2h_fx.rules.base import tensor_aliases
from s2h_fx.rules.sizes import S2H_SIZE_DEPS
from s2h_fx.surgery import apply_surgery

# node.meta written by find_channel_groups: large (channel ids) and about the unpruned graph
_ANALYSIS_META = frozenset({S2H_LAYOUT, S2H_FLOP_REFS, S2H_MIXING, S2H_SIZE_DEPS})


def slice_tensor(t: torch.Tensor, cuts: tuple[tuple[int, torch.Tensor], ...]) -> torch.Tensor:
    for axis, index in cuts:
        t = t.index_select(axis, index.to(t.device))
    return t


def emit_pruned(
    gm: fx.GraphModule, plan: SurgeryPlan, *, share: bool = False,
    overrides: dict[str, torch.Tensor] | None = None,
) -> fx.GraphModule:
    """Build the pruned graph. With ``share=True`` untouched tensors are shared with
    ``gm`` instead of copied (for a skeleton run through ``functional_call``).
    ``overrides`` replaces named buffers of ``gm`` (full width) before slicing."""
    memo: dict[int, Any] = {}
    if share:
        for t in list(gm.parameters()) + list(gm.buffers()):
            memo[id(t)] = t
    else:  # tensors about to be sliced (or dropped with the masks) are not copied whole
        for path in list(plan.params) + list(overrides or {}):
            t = _lookup(gm, path)
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t
        for name, mod in gm.named_children():
            if name.startswith("s2h_mask_g"):
                for t in list(mod.parameters()) + list(mod.buffers()):
                    memo[id(t)] = t
    new = copy_module(gm, memo, recompile=False)  # recompiled below, once edited
    graph = new.graph
    for node in graph.nodes:  # the analysis' meta stays behind (it is the unpruned net's)
        for key in _ANALYSIS_META & node.meta.keys():
            del node.meta[key]
    for node in list(graph.nodes):
        if S2H_MASK_SITE in node.meta:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for name in [n for n, _ in new.named_children() if n.startswith("s2h_mask_g")]:
        delattr(new, name)
    for path, value in (overrides or {}).items():
        owner_path, _, attr = path.rpartition(".")
        owner = new.get_submodule(owner_path) if owner_path else new
        owner._buffers[attr] = value.detach().clone()
    by_name = {n.name: n for n in graph.nodes}
    for name, (target, args, kwargs) in plan.rewrites.items():
        node = by_name[name]
        remap = lambda n: by_name[n.name]  # noqa: E731  (plan nodes -> this graph's nodes)
        node.target = target
        node.args, node.kwargs = fx.map_arg(args, remap), fx.map_arg(kwargs, remap)
    touched: set[str] = set()
    aliases: dict[str, list[str]] = {}  # tied weights: the sliced tensor goes to every path
    for alias, first in tensor_aliases(gm).items():
        aliases.setdefault(first, []).append(alias)
    for path, cuts in plan.params.items():
        old = _lookup(new, path)
        with torch.no_grad():  # index_select makes a new tensor; uncut ones are cloned
            value = slice_tensor(old, cuts) if cuts else old.clone()
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        for p in [path, *aliases.get(path, [])]:
            owner_path, _, attr = p.rpartition(".")
            owner = new.get_submodule(owner_path) if owner_path else new
            if isinstance(value, nn.Parameter):
                owner._parameters[attr] = value
            elif attr in owner._buffers:
                owner._buffers[attr] = value
            else:
                setattr(owner, attr, value)
            touched.add(owner_path)
    if not share:
        _unshare(new, gm)
    first_input = _first_inputs(graph)
    # a module with no sliced tensor of its own whose input narrows (LayerNorm or
    # RMSNorm without affine parameters) still needs its sizes updated
    inputs = set(first_input.values())
    old_shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
                  if n.name in inputs and _has_shape(n)}
    touched.update(path for path, arg in first_input.items()
                   if arg in old_shapes and plan.shapes.get(arg, old_shapes[arg]) != old_shapes[arg])
    for owner_path in sorted(touched):
        if owner_path:
            apply_surgery(new.get_submodule(owner_path), plan.shapes.get(first_input.get(owner_path, "")))
    drop_dead_code(graph)
    graph.lint()
    new.recompile()
    return new


def _unshare(new: nn.Module, old: nn.Module) -> None:
    """Copy any tensor ``new`` still shares with ``old`` (one that the memo kept back
    from the deepcopy and that was not sliced: a weight tied to a sliced one)."""
    shared = {id(t) for _, t in old.named_parameters(remove_duplicate=False)}
    shared |= {id(t) for _, t in old.named_buffers(remove_duplicate=False)}
    for mod in new.modules():
        stores: tuple[dict[str, Any], ...] = (mod._parameters, mod._buffers)
        for store in stores:
            for attr, t in store.items():
                if t is not None and id(t) in shared:
                    with torch.no_grad():
                        copy_ = t.detach().clone()
                    store[attr] = (nn.Parameter(copy_, requires_grad=t.requires_grad)
                                   if isinstance(t, nn.Parameter) else copy_)


def _lookup(module: nn.Module, path: str) -> Any:
    owner_path, _, attr = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    return getattr(owner, attr, None)


def _has_shape(node: fx.Node) -> bool:
    return hasattr(node.meta.get("tensor_meta"), "shape")


def _first_inputs(graph: fx.Graph) -> dict[str, str]:
    """Module path -> name of the node that feeds its first call."""
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node):
            out.setdefault(str(node.target), node.args[0].name)
    return out
