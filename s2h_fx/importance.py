"""Channel importance: the L1 norm of each class's producer weights, each producer
normalised to mean 1 and averaged over the group's producers; and the rank order
that the hard network keeps (whole atoms, most important first)."""

from __future__ import annotations

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
        self.producers: dict[int, list[_Producer]] = {}
        for g in grouping.prunable:
            items = []
            for path, axis in g.producers:  # a producer may feed several groups
                ids = grouping.slots[(path, axis)]
                pos = np.flatnonzero(grouping.group_of_id[ids] == g.index)
                cls = grouping.class_of_id[ids[pos]]
                mult = np.bincount(cls, minlength=g.size)[cls]
                items.append(_Producer(path, axis, torch.as_tensor(pos), torch.as_tensor(cls),
                                       torch.as_tensor(1.0 / mult, dtype=torch.float32)))
            self.producers[g.index] = items

    @torch.no_grad()
    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        out = {}
        for g in self.grouping.prunable:
            acc = torch.zeros(g.size)
            for p in self.producers[g.index]:
                w = _get_attr(model, p.path).detach().float().abs()
                l1 = w.sum(dim=[d for d in range(w.dim()) if d != p.axis]).cpu()[p.positions]
                l1 = l1 / (l1.mean() + 1e-12)
                acc.index_add_(0, p.classes, l1 * p.weight)
            out[g.index] = acc / max(len(self.producers[g.index]), 1)
        return out

    def ranks(self, scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Rank of each class: atoms ordered by total importance, classes of an atom together."""
        out = {}
        for g in self.grouping.prunable:
            atom_of = torch.as_tensor(self.grouping.atom_of_class[g.index])
            atom_score = torch.zeros(int(atom_of.max()) + 1).index_add_(0, atom_of, scores[g.index])
            order = torch.argsort(-atom_score, stable=True)  # atoms, most important first
            position = torch.empty_like(order)
            position[order] = torch.arange(len(order))
            key = position[atom_of] * g.size + torch.arange(g.size)  # by atom, then class
            rank = torch.empty(g.size, dtype=torch.long)
            rank[torch.argsort(key)] = torch.arange(g.size)
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
