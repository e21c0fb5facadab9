"""Pass 5b: emit the physically pruned graph from a SurgeryPlan.

Reads: the masked GraphModule (insert_masks) and a SurgeryPlan (plan_surgery).
Returns: a new ``GraphModule`` (the input is not changed): mask nodes and mask
modules dropped, every planned parameter/buffer sliced, every module's width
attributes updated through the surgery registry, planned arguments rewritten.
Postcondition: linted, recompiled; running it on its own output with an empty
plan changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
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
    gm: fx.GraphModule, plan: SurgeryPlan, *,
    overrides: dict[str, torch.Tensor] | None = None,
) -> fx.GraphModule:
    """Build the pruned graph, a module of its own (no tensor shared with ``gm``).
    ``overrides`` replaces named buffers of ``gm`` (full width) before slicing."""
    memo: dict[int, Any] = {}
    # tensors about to be sliced (or dropped with the masks) are not copied whole
    for path in list(plan.params) + list(overrides or {}):
        t = _lookup(gm, path)
        if isinstance(t, torch.Tensor):
            memo[id(t)] = t
    for name, mod in gm.named_children():
        if name.startswith("s2h_mask_g"):
            for t in list(mod.parameters()) + list(mod.buffers()):
                memo[id(t)] = t
    new = copy_module(gm, memo, recompile=False)  # recompiled below, once edited
    _edit_graph(new.graph, plan)
    for name in [n for n, _ in new.named_children() if n.startswith("s2h_mask_g")]:
        delattr(new, name)
    for path, value in (overrides or {}).items():
        owner_path, _, attr = path.rpartition(".")
        owner = new.get_submodule(owner_path) if owner_path else new
        owner._buffers[attr] = value.detach().clone()

    def sliced(old: torch.Tensor, cuts: Cuts) -> torch.Tensor:
        with torch.no_grad():  # index_select makes a new tensor; uncut ones are cloned
            return slice_tensor(old, cuts) if cuts else old.clone()

    touched = _place_tensors(new, plan, tensor_aliases(gm), sliced)
    _unshare(new, gm)
    _finish(new, gm, plan, touched)
    return new


def emit_skeleton(gm: fx.GraphModule, plan: SurgeryPlan) -> fx.GraphModule:
    """The pruned graph with no tensors of its own (see :class:`SkeletonEmitter`)."""
    return SkeletonEmitter(gm)(plan)


class SkeletonEmitter:
    """Emits skeletons of ``gm``: the pruned graph's code and modules without tensors of
    their own, for ``functional_call`` (the training step's hard branch passes every
    tensor, sliced). Built whenever the widths change, so built cheaply:

    * the code depends only on the rewritten arguments (reshape sizes and the like):
      one *template* per distinct set of rewrites holds the edited graph, compiled
      once, with ``gm``'s own module objects (a CNN, with no rewrites, has one);
    * a skeleton is a shallow copy of its template: modules whose width attributes
      do not change stay shared, the others are shallow copies (surgery assigns
      their new attributes; a surgery must assign new values, not mutate shared
      ones), and every sliced tensor is an empty meta tensor of its pruned shape
      (what surgery reads), never a copy of data.
    """

    def __init__(self, gm: fx.GraphModule, templates_kept: int = 16) -> None:
        self.gm, self.templates_kept = gm, templates_kept
        self.aliases = tensor_aliases(gm)
        self._templates: dict[str, fx.GraphModule] = {}
        self.templates_built = 0

    def template(self, plan: SurgeryPlan) -> fx.GraphModule:
        key = repr(sorted(plan.rewrites.items()))
        found = self._templates.pop(key, None)
        if found is None:
            graph = copy.deepcopy(self.gm.graph)  # nodes' meta dicts copied, values shared
            _edit_graph(graph, plan)
            # gm's module tree (shared), masks left out, under a class of its own (a
            # GraphModule's class holds its compiled code)
            found = _shallow_copy(self.gm, type("GraphModuleImpl", (fx.GraphModule,), {}))
            for name in [n for n in found._modules if n.startswith("s2h_mask_g")]:
                del found._modules[name]
            found.graph = graph  # owns it and compiles it
            drop_dead_code(graph)
            graph.lint()
            found.recompile()
            self.templates_built += 1
            while len(self._templates) >= self.templates_kept:
                self._templates.pop(next(iter(self._templates)))
        self._templates[key] = found  # most recently used last
        return found

    def __call__(self, plan: SurgeryPlan) -> fx.GraphModule:
        template = self.template(plan)
        new = _shallow_copy(template)
        owned = {id(new)}

        def hollow(old: torch.Tensor, cuts: Cuts) -> torch.Tensor:
            shape = list(old.shape)
            for axis, index in cuts:
                shape[axis] = len(index)
            return torch.empty(shape, dtype=old.dtype, device="meta")

        def private(path: str) -> nn.Module | None:
            return _private(new, path, owned)

        touched = _place_tensors(new, plan, self.aliases, hollow, private)
        _surgery(new, self.gm, plan, touched, private)
        # the skeleton's own modules beside the full network's (see mirror_modes)
        full = dict(self.gm.named_modules(remove_duplicate=False))  # every path of each
        new.s2h_copies = tuple((m, full[n]) for n, m in new.named_modules(remove_duplicate=False)
                               if n in full and m is not full[n])
        return new


def mirror_modes(skeleton: nn.Module, training: bool) -> None:
    """Put a skeleton in the full network's train/eval modes, module by module: its
    own (copied) modules take their originals' flags; the modules it shares with the
    full network already have them (``skeleton.train()`` would set the full network's
    too, undoing a module the user put in eval mode). A network without that record
    (emitted whole) is set to ``training`` throughout."""
    copies = getattr(skeleton, "s2h_copies", None)
    if copies is None:
        skeleton.train(training)
        return
    for mine, theirs in copies:
        mine.training = theirs.training


Cuts = tuple[tuple[int, torch.Tensor], ...]


def _edit_graph(graph: fx.Graph, plan: SurgeryPlan) -> None:
    """Drop the analysis' metadata and the mask calls; rewrite the planned arguments."""
    for node in graph.nodes:  # the analysis' meta stays behind (it is the unpruned net's)
        if _ANALYSIS_META & node.meta.keys():
            node.meta = {k: v for k, v in node.meta.items() if k not in _ANALYSIS_META}
    for node in list(graph.nodes):
        if S2H_MASK_SITE in node.meta:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    by_name = {n.name: n for n in graph.nodes}
    for name, (target, args, kwargs) in plan.rewrites.items():
        node = by_name[name]
        remap = lambda n: by_name[n.name]  # noqa: E731  (plan nodes -> this graph's nodes)
        node.target = target
        node.args, node.kwargs = fx.map_arg(args, remap), fx.map_arg(kwargs, remap)


def _place_tensors(new: fx.GraphModule, plan: SurgeryPlan, aliases_of: dict[str, str],
                   make: Callable[[torch.Tensor, Cuts], torch.Tensor],
                   private: Callable[[str], nn.Module | None] | None = None) -> set[str]:
    """Put ``make(old, cuts)`` at every planned path and its tied aliases; returns the
    owners' paths (``private(path)`` gives an owner that may be written to)."""
    touched: set[str] = set()
    aliases: dict[str, list[str]] = {}  # tied weights: the sliced tensor goes to every path
    for alias, first in aliases_of.items():
        aliases.setdefault(first, []).append(alias)
    for path, cuts in plan.params.items():
        old = _lookup(new, path)
        value = make(old, cuts)
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        for p in [path, *aliases.get(path, [])]:
            owner_path, _, attr = p.rpartition(".")
            if private is not None:
                found = private(owner_path)
                if found is None:  # an alias in a module the skeleton does not use
                    continue
                owner = found
            else:
                owner = new.get_submodule(owner_path) if owner_path else new
            if isinstance(value, nn.Parameter):
                owner._parameters[attr] = value
            elif attr in owner._buffers:
                owner._buffers[attr] = value
            else:
                setattr(owner, attr, value)
            touched.add(owner_path)
    return touched


def _finish(new: fx.GraphModule, gm: fx.GraphModule, plan: SurgeryPlan,
            touched: set[str]) -> None:
    """Module surgery on every module that changed width, then dead code, lint, recompile."""
    _surgery(new, gm, plan, touched)
    drop_dead_code(new.graph)
    new.graph.lint()
    new.recompile()


def _surgery(new: fx.GraphModule, gm: fx.GraphModule, plan: SurgeryPlan, touched: set[str],
             private: Callable[[str], nn.Module | None] | None = None) -> None:
    """Update the width attributes of every module that changed width."""
    graph = new.graph
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
            module = private(owner_path) if private is not None else new.get_submodule(owner_path)
            if module is not None:
                apply_surgery(module, plan.shapes.get(first_input.get(owner_path, "")))


def _private(new: nn.Module, path: str, owned: set[int]) -> nn.Module | None:
    """The module at ``path`` in ``new``, made ``new``'s own (``owned``: ids of the
    modules that are) where it or a module above it is shared: a shallow copy with
    dictionaries of its own. None where ``new`` has no module at ``path``."""
    owner = new
    for name in path.split(".") if path else ():
        child = owner._modules.get(name)
        if child is None:
            return None
        if id(child) not in owned:
            child = _shallow_copy(child)
            owned.add(id(child))
            owner._modules[name] = child
        owner = child
    return owner


def _shallow_copy(m: nn.Module, cls: type | None = None) -> Any:
    """A new object of the same class (a GraphModule's class holds its compiled code),
    or of ``cls``, with the same attributes and dictionaries of parameters, buffers and
    submodules of its own."""
    new: Any = object.__new__(cls or type(m))
    new.__dict__.update(m.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = type(m.__dict__[key])(m.__dict__[key])
    new.__dict__["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
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
