"""The public entry point: :func:`prune_graph` and the :class:`Pruner` module."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from s2h_fx.channels import GroupingResult
from s2h_fx.config import PruneConfig, S2HConfig
from s2h_fx.errors import InputError, InvariantError, NoPrunableChannelsError
from s2h_fx.importance import Importance, keep_from_ranks, rank_with_first
from s2h_fx.mask_optim import MaskOptimizer
from s2h_fx.masks import ChannelMask
from s2h_fx.one_shot import choose_widths, grow_widths
from s2h_fx.passes import (  # noqa: I001
    build_flops_model,
    emit_pruned,
    find_channel_groups,
    insert_masks,
    plan_surgery,
    trace_model,
)
from s2h_fx.passes.build_flops_model import FlopsModel
from s2h_fx.passes.emit_pruned import slice_tensor
from s2h_fx.passes.insert_masks import mask_name
from s2h_fx.passes.plan_surgery import SurgeryPlan

log = logging.getLogger(__name__)


def prune_graph(
    model: nn.Module,
    budget: float,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    divisor: int = 8,
    strict: bool = False,
    config: S2HConfig | None = None,
) -> Pruner:
    """Trace ``model``, group its coupled channels, insert masks and choose widths.

    ``budget`` is the fraction of the whole network's FLOPs (as
    ``torch.utils.flop_counter`` counts them on ``example_inputs``) to keep.
    The user's model is not modified. ``config`` holds S2H training settings.
    """
    prune_config = PruneConfig(budget, divisor, strict)
    if example_inputs is None:
        raise InputError(
            "example_inputs is required to trace shapes, e.g. "
            "prune_graph(model, 0.5, example_inputs=(torch.randn(1, 3, 224, 224),))"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace_model(model, tuple(example_inputs))
    grouping = find_channel_groups(gm, divisor=prune_config.divisor, strict=prune_config.strict)
    if not grouping.prunable:
        raise NoPrunableChannelsError(
            f"{type(model).__name__} has no prunable channel group; why each is frozen:\n"
            + grouping.table()
        )
    flops = build_flops_model(gm, grouping)
    gm = insert_masks(gm, grouping)
    pruner = Pruner(gm, grouping, flops, prune_config, config or S2HConfig())
    pruner.train(model.training)
    return pruner


class Pruner(nn.Module):
    """The masked training graph, its masks, and the current hard network.

    ``eval()``: ``pruner(x)`` runs the hard network, exactly what :meth:`export`
    emits. ``train()``: ``soft, hard = pruner(x)``, both branches over the same
    weights, the hard widths read from the masks. One S2H step of a user's loop::

        soft, hard = pruner(x)
        losses = pruner.losses((soft, hard), y)
        pruner.backward(losses)
        opt.step(); pruner.mask_step()
    """

    def __init__(
        self, gm: fx.GraphModule, grouping: GroupingResult, flops: FlopsModel,
        config: PruneConfig, s2h: S2HConfig,
    ) -> None:
        super().__init__()
        self.graph_module = gm
        self.grouping = grouping
        self.flops_model = flops
        self.config = config
        self.s2h = s2h
        self._masks: dict[int, ChannelMask] = {
            g.index: gm.get_submodule(mask_name(g.index))  # type: ignore[misc]
            for g in grouping.prunable}
        for mask in self.masks().values():
            mask.temperature = s2h.temperature
        self.importance = Importance(grouping)
        self.mask_optimizer = MaskOptimizer(
            list(self.masks().values()), s2h.mask_lr, s2h.tolerance, s2h.balance_cap
        )
        # the hard network's own BatchNorm statistics (it sees other activations than
        # the soft network), full width; the hard branch updates its kept channels
        self.hard_stats = _HardStats(self.graph_module)
        self._skeletons: dict[tuple[int, ...], fx.GraphModule] = {}
        self._plan: SurgeryPlan | None = None
        self._mask_grads: dict[str, list[torch.Tensor]] | None = None
        scores = self.update_importance()
        widths = choose_widths(flops, grouping, {g: s.numpy() for g, s in scores.items()},
                               config.budget)
        self._set_plan(widths, keep_from_ranks(self._ranks(), widths))

    # ---- inspection ------------------------------------------------------
    @property
    def groups(self) -> _GroupTable:
        return _GroupTable(self.grouping, self.widths)

    @property
    def widths(self) -> dict[int, int]:
        return dict(self.plan.widths)

    @property
    def plan(self) -> SurgeryPlan:
        if self._plan is None:
            raise InvariantError("the pruner has no surgery plan")
        return self._plan

    def masks(self) -> dict[int, ChannelMask]:
        """The ChannelMask of each prunable group, by group index."""
        return dict(self._masks)

    def mask_parameters(self) -> list[nn.Parameter]:
        """The mask logits u, apart from the model's weights."""
        return [m.logits for m in self.masks().values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """The model's weights theta (everything but the mask logits)."""
        ids = {id(p) for p in self.mask_parameters()}
        return [p for p in self.graph_module.parameters() if id(p) not in ids]

    def flops(self, widths: dict[int, Any] | None = None) -> Any:
        """FLOPs of the hard network at ``widths`` (default: the current widths)."""
        return self.flops_model(self.widths if widths is None else widths)

    def flops_ratio(self, widths: dict[int, Any] | None = None) -> Any:
        return self.flops(widths) / self.flops_model.total

    # ---- widths ----------------------------------------------------------
    def _ranks(self) -> dict[int, torch.Tensor]:
        return {g: m.rank for g, m in self.masks().items()}

    def update_importance(self) -> dict[int, torch.Tensor]:
        """Recompute the L1 importance of every class and re-rank each mask's classes."""
        scores = self.importance.scores(self.graph_module)
        for g, rank in self.importance.ranks(scores).items():
            self._masks[g].rank.copy_(rank)
        return scores

    def set_widths(self, widths: dict[int, int], keep: dict[int, np.ndarray] | None = None) -> None:
        """Choose each group's width (and optionally which classes it keeps).

        The masks are set to these widths with full confidence, so that the
        training branches use the same sub-network.
        """
        full = {g.index: g.size for g in self.grouping.prunable}
        unknown = set(widths) - set(full)
        if unknown:
            raise ValueError(f"groups {sorted(unknown)} are not prunable groups")
        merged = {**full, **{g: int(w) for g, w in widths.items()}}
        for g, w in merged.items():
            grp = self.grouping.groups[g]
            if not grp.divisor <= w <= grp.size or w % grp.divisor:
                raise ValueError(
                    f"group {g}: width {w} is not a multiple of {grp.divisor} in "
                    f"[{grp.divisor}, {grp.size}]"
                )
        if keep is None:
            keep = keep_from_ranks(self._ranks(), merged)
        masks = self.masks()
        for g, w in merged.items():
            masks[g].set_width(w)
            masks[g].rank.copy_(rank_with_first(keep[g], masks[g].rank))
        self._set_plan(merged, keep)

    def mask_widths(self) -> dict[int, int]:
        """Hard widths n of the masks now."""
        with torch.no_grad():
            return {g: int(round(float(m.hard_width()))) for g, m in self.masks().items()}

    def sync_from_masks(self) -> None:
        """Make the hard network the masks' current sub-network."""
        widths = self.mask_widths()
        keep = keep_from_ranks(self._ranks(), widths)
        plan = self._plan
        if plan is not None and plan.widths == widths and all(
            np.array_equal(plan.keep[g], keep[g]) for g in widths
        ):
            return
        self._set_plan(widths, keep)

    def _set_plan(self, widths: dict[int, int], keep: dict[int, np.ndarray]) -> None:
        self._plan = plan_surgery(self.graph_module, self.grouping, keep)
        key = tuple(widths[g] for g in sorted(widths))
        if key not in self._skeletons:
            if len(self._skeletons) >= 8:
                self._skeletons.pop(next(iter(self._skeletons)))
            self._skeletons[key] = emit_pruned(self.graph_module, self._plan, share=True)
        self._skeleton_key = key

    # ---- running ---------------------------------------------------------
    def soft_forward(self, *args: Any) -> Any:
        """The full-width network with every channel scaled by its relaxed mask value."""
        return self.graph_module(*args)

    @contextlib.contextmanager
    def _fixed_masks(self) -> Iterator[None]:
        masks = self.masks()
        for g, m in masks.items():
            values = torch.zeros(m.size, device=m.fixed.device)
            values[torch.as_tensor(self.plan.keep[g], device=m.fixed.device)] = 1.0
            m.fixed.copy_(values)
            m.use_fixed = True
        try:
            yield
        finally:
            for m in masks.values():
                m.use_fixed = False

    def masked_forward(self, *args: Any) -> Any:
        """The full-width network with the hard network's dropped channels zeroed."""
        with self._fixed_masks():
            return self.graph_module(*args)

    def hard_forward(self, *args: Any) -> Any:
        """The sub-network at the current widths: weights sliced, only kept channels computed.

        Gradients reach the weights through the slicing; none reach the masks.
        """
        skeleton = self._skeletons[self._skeleton_key]
        tensors, stats = {}, {}
        for name, t in _named_tensors(self.graph_module):
            cuts = self.plan.params.get(name, ())
            if name in self.hard_stats.names:
                t = self.hard_stats.get(name)
                stats[name] = slice_tensor(t, cuts) if cuts else t
                tensors[name] = stats[name]
            else:
                tensors[name] = slice_tensor(t, cuts)
        skeleton.train(self.training)
        out = functional_call(skeleton, tensors, args)
        if self.training:  # keep the kept channels' running statistics
            with torch.no_grad():
                for name, updated in stats.items():
                    cuts = self.plan.params.get(name, ())
                    if cuts:
                        (axis, index), = cuts
                        full = self.hard_stats.get(name)
                        full.index_copy_(axis, index.to(full.device), updated)
        return out

    def forward(self, *args: Any) -> Any:
        if self.training:
            self.sync_from_masks()
            return self.soft_forward(*args), self.hard_forward(*args)
        return self.hard_forward(*args)

    # ---- S2H training steps ------------------------------------------------
    def resource_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda_R (F(n)/F - budget)^2, F(n)/F) with straight-through hard widths n."""
        widths = {g: m.hard_width() for g, m in self.masks().items()}
        ratio = self.flops_model.ratio(widths)
        return self.s2h.resource_weight * (ratio - self.config.budget) ** 2, ratio

    def losses(
        self, outputs: tuple[torch.Tensor, torch.Tensor], target: Any,
        task_loss: Any = F.cross_entropy, *, decoupled: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The four S2H terms, coefficients included: "task" L = task_loss(soft, target),
        "resource" R, "kd_hard" G_h = KL(sg(soft) || hard), "kd_soft" G_s = KL(sg(hard) || soft).

        ``decoupled=False`` (an ablation) drops the stop-gradients: both KL terms then
        reach everything, as with a plain ``sum(losses.values()).backward()``."""
        soft, hard = outputs
        if not isinstance(soft, torch.Tensor) or not isinstance(hard, torch.Tensor):
            raise TypeError("losses() needs logits tensors; for structured outputs compute the "
                            "terms yourself and pass them to backward()")
        log_s, log_h = F.log_softmax(soft.float(), -1), F.log_softmax(hard.float(), -1)
        sg = (lambda t: t.detach()) if decoupled else (lambda t: t)
        kd = self.s2h.kd_weight
        resource, _ = self.resource_loss()
        return {
            "task": task_loss(soft, target),
            "resource": resource,
            "kd_hard": kd * F.kl_div(log_h, sg(log_s), log_target=True, reduction="batchmean"),
            "kd_soft": kd * F.kl_div(log_s, sg(log_h), log_target=True, reduction="batchmean"),
        }

    def backward(
        self, losses: dict[str, torch.Tensor], grad_scaler: Any = None, *, decoupled: bool = True
    ) -> None:
        """Decoupled backward: theta.grad += d(L + G_h)/dtheta; u.grad += d(L + G_s + R)/du.

        G_s never reaches the weights and G_h never reaches the masks. With a
        ``torch.amp.GradScaler`` the weight gradients are scaled as usual.
        Under ``torch.distributed`` (e.g. the pruner wrapped in
        ``DistributedDataParallel`` under torchrun) the mask logits' task and
        distillation gradient is averaged over the ranks here, since the G_s pass
        runs outside DDP's reducer (averaging what DDP already averaged changes
        nothing); R is the same on every rank. The weights' gradients are DDP's
        to average, as usual.
        ``decoupled=False`` (an ablation): every term reaches everything.
        """
        missing = {"task", "resource", "kd_hard", "kd_soft"} - set(losses)
        if missing:
            raise InputError(f"backward() needs the four S2H terms as losses() returns them; "
                             f"missing {sorted(missing)}")
        scale = (lambda t: grad_scaler.scale(t)) if grad_scaler is not None else (lambda t: t)
        weights, logits = self.weight_parameters(), self.mask_parameters()
        before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in logits]
        first = losses["task"] + losses["kd_hard"]
        if not decoupled:
            first = first + losses["kd_soft"]
        torch.autograd.backward(scale(first), inputs=weights + logits, retain_graph=True)
        task = [(p.grad if p.grad is not None else torch.zeros_like(p)) - b
                for p, b in zip(logits, before)]
        if decoupled:
            extra: tuple[Any, ...] = torch.autograd.grad(
                scale(losses["kd_soft"]), logits, allow_unused=True)
        else:
            extra = (None,) * len(logits)
        res_grads = torch.autograd.grad(losses["resource"], logits, allow_unused=True)
        inv = 1.0 / float(grad_scaler.get_scale()) if grad_scaler is not None else 1.0
        task = [(t + (e if e is not None else 0)) * inv for t, e in zip(task, extra)]
        task = _average_over_ranks(task)
        resource = [r if r is not None else torch.zeros_like(p) for r, p in zip(res_grads, logits)]
        for p, b, t, r in zip(logits, before, task, resource):
            p.grad = b + t + r
        if self._mask_grads is None:
            self._mask_grads = {"task": task, "resource": resource}
        else:  # gradient accumulation
            acc = self._mask_grads
            acc["task"] = [a + t for a, t in zip(acc["task"], task)]
            acc["resource"] = [a + r for a, r in zip(acc["resource"], resource)]

    def mask_step(self) -> None:
        """One step of the mask optimiser on the gradients gathered by :meth:`backward`,
        then re-rank channels by importance (unless ``fix_importance``)."""
        if self._mask_grads is not None:
            gap = float(self.flops_ratio(self.mask_widths())) - self.config.budget
            self.mask_optimizer.step(self._mask_grads["task"], self._mask_grads["resource"], gap)
        self._mask_grads = None
        for p in self.mask_parameters():
            p.grad = None
        if not self.s2h.fix_importance:
            self.update_importance()

    def fit(self, train_loader: Iterable[Any], epochs: int = 30, **kwargs: Any) -> Any:
        """S2H training with defaults; see :func:`s2h_fx.trainer.fit` for the options."""
        from s2h_fx.trainer import fit

        return fit(self, train_loader, epochs, **kwargs)

    # ---- finishing ---------------------------------------------------------
    @torch.no_grad()
    def recalibrate_bn(self, batches: Iterable[Any], num_batches: int = 20) -> int:
        """Re-estimate the hard network's BatchNorm statistics on training batches
        (training uses batch statistics); returns the number of batches used."""
        emitted = emit_pruned(self.graph_module, self.plan, overrides=self.hard_stats.tensors())
        norms = {n: m for n, m in emitted.named_modules()
                 if isinstance(m, _BatchNorm) and m.track_running_stats}
        if not norms:
            return 0
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        emitted.train()
        used = 0
        for batch in batches:
            if used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            emitted(x.to(_device_of(emitted)))
            used += 1
        for name, m in norms.items():
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                path = f"{name}.{buf}"
                live = self.hard_stats.get(path)
                cuts = self.plan.params.get(path, ())
                if cuts:
                    (axis, index), = cuts
                    live.index_copy_(axis, index.to(live.device), getattr(m, buf).to(live.dtype))
                else:
                    live.copy_(getattr(m, buf))
        return used

    def project(self, floor_margin: float = 0.03) -> bool:
        """Bring the hard network's FLOPs ratio into [budget - floor_margin, budget +
        tolerance]: above it, shrink the widths that cost least importance per FLOP;
        then (and when far below it) give back the channels that add most importance
        per FLOP while the FLOPs stay within the budget. Returns whether it changed."""
        ratio = float(self.flops_ratio())
        budget, tol = self.config.budget, self.s2h.tolerance
        if budget - floor_margin <= ratio <= budget + tol:
            return False
        scores = {g: s.numpy() for g, s in self.importance.scores(self.graph_module).items()}
        ranks = {g: r.cpu().numpy() for g, r in self._ranks().items()}
        widths = self.widths
        if ratio > budget + tol:
            widths = choose_widths(self.flops_model, self.grouping, scores, budget,
                                   start=widths)
        # one divisor step of a wide group can overshoot far below the budget: give
        # back what still fits (below the budget: the whole way up to it)
        widths = grow_widths(self.flops_model, self.grouping, scores, ranks, budget,
                             start=widths)
        self.set_widths(widths, keep_from_ranks(self._ranks(), widths))
        after = float(self.flops_ratio())
        log.warning("hard network at %.4f of the FLOPs, budget %.4f: projected to %.4f%s",
                    ratio, budget, after,
                    "" if budget - floor_margin <= after <= budget + tol else
                    " (the groups' widths cannot land inside the band)")
        return True

    def export(self) -> fx.GraphModule:
        """The physically pruned network (a fresh GraphModule, in eval mode)."""
        pruned = emit_pruned(self.graph_module, self.plan, overrides=self.hard_stats.tensors())
        if any(n.startswith("s2h_mask") for n, _ in pruned.named_modules()):
            raise InvariantError("mask modules left in the emitted graph")
        return pruned.eval()

    # ---- state -------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"mask_optimizer": self.mask_optimizer.state_dict(),
                "widths": self.widths,
                "keep": {g: k.tolist() for g, k in self.plan.keep.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.mask_optimizer.load_state_dict(state["mask_optimizer"])
        keep = {int(g): np.asarray(k, dtype=np.int64) for g, k in state["keep"].items()}
        self._set_plan({int(g): int(w) for g, w in state["widths"].items()}, keep)


def _average_over_ranks(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean of ``grads`` over the ranks of the default process group (as is
    when torch.distributed is not initialised or has one rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return grads
    if not grads:
        return grads
    flat = torch.cat([g.detach().flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, offset = [], 0
    for g in grads:
        out.append(flat[offset : offset + g.numel()].view_as(g).to(g.dtype))
        offset += g.numel()
    return out


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _named_tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in gm.named_parameters() if not n.startswith("s2h_mask")
    ]
    out += [(n, b) for n, b in gm.named_buffers() if not n.startswith("s2h_mask")]
    return out


class _HardStats(nn.Module):
    """Buffers mirroring every BatchNorm running statistic of the graph, by path."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.names: dict[str, str] = {}
        for mname, m in gm.named_modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                for buf in ("running_mean", "running_var", "num_batches_tracked"):
                    t = getattr(m, buf, None)
                    if t is not None:
                        key = f"{mname}.{buf}".replace(".", "__")
                        self.register_buffer(key, t.detach().clone())
                        self.names[f"{mname}.{buf}"] = key

    def get(self, path: str) -> torch.Tensor:
        return getattr(self, self.names[path])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {path: self.get(path) for path in self.names}


class _GroupTable:
    """Printable view of the groups with the current widths."""

    def __init__(self, grouping: GroupingResult, widths: dict[int, int]) -> None:
        self.grouping, self.widths = grouping, widths

    def __iter__(self) -> Any:
        return iter(self.grouping.groups)

    def __len__(self) -> int:
        return len(self.grouping.groups)

    def __getitem__(self, i: int) -> Any:
        return self.grouping.groups[i]

    def __str__(self) -> str:
        return self.grouping.table(self.widths)

    __repr__ = __str__
