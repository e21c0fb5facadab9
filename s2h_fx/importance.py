"""Channel importance: the L1 norm of each class's producer weights, each producer
normalised to mean 1 and averaged over the group's producers; and the rank order
that the hard network keeps (whole atoms, most important first).

Scores and ranks are computed on the weights' device with no host read (the
index tensors are moved there once and kept), so re-ranking after every mask
step does not stall a GPU."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from s2h_fx.channels import GroupingResult
from s2h_fx.rules.base import _get_attr


@dataclass(frozen=True)
class _Producer:
    path: str
    axis: int
    positions: torch.Tensor  # the positions on the axis that carry this group's channels
    classes: torch.Tensor  # class of each of those positions
    weight: torch.Tensor  # 1 / multiplicity of that class among the positions


class Importance:
    """Computes per-class importance of every prunable group from the live weights."""

    def __init__(self, grouping: GroupingResult) -> None:
        self.grouping = grouping
        self.device = torch.device("cpu")
        self.num_atoms = {g.index: int(np.max(grouping.atom_of_class[g.index])) + 1
                          for g in grouping.prunable}
        self.atom_of = {g.index: torch.as_tensor(grouping.atom_of_class[g.index],
                                                 dtype=torch.long) for g in grouping.prunable}
        self.producers: dict[int, list[_Producer]] = {}
        for g in grouping.prunable:
            items = []
            for path, axis in g.producers:  # a producer may feed several groups
                ids = grouping.slots[(path, axis)]
                group_of, class_of = grouping.labels(g.index)
                pos = np.flatnonzero(group_of[ids] == g.index)
                cls = class_of[ids[pos]]
                mult = np.bincount(cls, minlength=g.size)[cls]
                items.append(_Producer(path, axis, torch.as_tensor(pos), torch.as_tensor(cls),
                                       torch.as_tensor(1.0 / mult, dtype=torch.float32)))
            self.producers[g.index] = items

    def _to(self, device: torch.device) -> None:
        """Move the index tensors to ``device`` (once per device change)."""
        if device == self.device:
            return
        self.device = device
        self.atom_of = {g: a.to(device) for g, a in self.atom_of.items()}
        self.producers = {g: [dataclasses.replace(p, positions=p.positions.to(device),
                                                  classes=p.classes.to(device),
                                                  weight=p.weight.to(device)) for p in items]
                          for g, items in self.producers.items()}

    @torch.no_grad()
    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Importance of every class of every prunable group, float32 on the weights' device."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._to(device)
        out = {}
        norms: dict[tuple[str, int], torch.Tensor] = {}  # a producer may feed several groups
        for g in self.grouping.prunable:
            acc = torch.zeros(g.size, device=device)
            for p in self.producers[g.index]:
                if (p.path, p.axis) not in norms:
                    w = _get_attr(model, p.path).detach()
                    dims = [d for d in range(w.dim()) if d != p.axis]
                    wide = torch.promote_types(w.dtype, torch.float32)  # never narrower
                    # |w| summed: on the CPU 3-7x faster than vector_norm(w, 1) (measured
                    # on ResNet-50's convs, 2 threads); the temporary is one tensor's size
                    if not dims:
                        norms[p.path, p.axis] = w.float().abs()
                    elif p.axis == 0 and w.is_contiguous():
                        norms[p.path, p.axis] = w.reshape(w.shape[0], -1).abs().sum(
                            1, dtype=wide).float()
                    else:
                        norms[p.path, p.axis] = w.abs().sum(dims, dtype=wide).float()
                l1 = norms[p.path, p.axis][p.positions]
                l1 = l1 / (l1.mean() + 1e-12)
                acc.index_add_(0, p.classes, l1 * p.weight)
            out[g.index] = acc / max(len(self.producers[g.index]), 1)
        return out

    @torch.no_grad()
    def ranks(self, scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Rank of each class: atoms ordered by total importance, classes of an atom
        together (on the scores' device)."""
        out = {}
        for g in self.grouping.prunable:
            score = scores[g.index]
            self._to(score.device)
            atom_of = self.atom_of[g.index]
            atom_score = score.new_zeros(self.num_atoms[g.index]).index_add_(0, atom_of, score)
            order = torch.argsort(-atom_score, stable=True)  # atoms, most important first
            position = torch.empty_like(order)
            position[order] = torch.arange(len(order), device=order.device)
            arange = torch.arange(g.size, device=order.device)
            key = position[atom_of] * g.size + arange  # by atom, then class
            rank = torch.empty_like(arange)
            rank[torch.argsort(key)] = arange
            out[g.index] = rank
        return out


def rank_with_first(keep: np.ndarray, rank: torch.Tensor) -> torch.Tensor:
    """A rank that puts the ``keep`` classes first, otherwise in the order of ``rank``."""
    size = rank.numel()
    kept = torch.zeros(size, dtype=torch.bool)
    kept[torch.as_tensor(keep, dtype=torch.long)] = True
    key = (~kept).long() * size + rank.cpu()
    out = torch.empty(size, dtype=torch.long)
    out[torch.argsort(key)] = torch.arange(size)
    return out.to(rank.device)


def keep_from_ranks(ranks: dict[int, torch.Tensor], widths: dict[int, int]) -> dict[int, np.ndarray]:
    return {g: np.flatnonzero(ranks[g].cpu().numpy() < w) for g, w in widths.items()}
