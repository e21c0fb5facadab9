"""ChannelMask: one module per prunable group, called wherever the group's
channels enter an op that sums over channels (conv, linear, matmul).

The mask is the S2HPruner parameterisation (a softmax over candidate widths). With C
classes and divisor d the candidate widths are c_k = k d, k = 1..K, K = C / d:

* p = softmax(u / T) over the K widths (``logits`` u);
* w_k = sum_{j >= k} p_j, the probability that the width is at least c_k,
  given to the d channels ranked k-th by importance (the relaxed mask);
* E = sum_k p_k c_k, the expected width;
* n = d round(E / d) (halves up), clamped to [d, C], the hard width, with a
  straight-through gradient. Rounding to the nearest width, not up: with ``d ceil(E /
  d)`` the smallest width d is out of reach (E > d whenever any other width has
  probability), so a group of two widths stays wide in the hard network while its
  soft mask is all but narrow; the resource loss then pushes the other groups too
  far (measured on a CIFAR-style ResNet-20: stage-1 groups at soft width 8.0x, hard 16).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class ChannelMask(nn.Module):
    """Scales each channel of a group by its mask value.

    ``rank[c]`` is the importance rank of class ``c`` (0 = most important); the
    hard network keeps the classes of rank < n. Each call site has a buffer
    ``site{k}`` of class indices laid out to broadcast against the input (-1 where
    the position belongs to another group: left unscaled).

    ``fixed`` (a buffer of per-class values) replaces the relaxed mask while
    ``use_fixed`` is set: the masked emulation of a chosen sub-network.
    """

    rank: torch.Tensor
    fixed: torch.Tensor

    def __init__(self, group: int, size: int, divisor: int = 1, temperature: float = 1.0) -> None:
        super().__init__()
        if size % divisor:
            raise ValueError(f"divisor {divisor} does not divide {size}")
        self.group, self.size, self.divisor = group, size, divisor
        self.temperature = temperature
        self.num_sites = 0
        self.use_fixed = False
        self.straight_through = False  # forward the hard keep, backward the relaxed mask
        self.logits = nn.Parameter(torch.zeros(size // divisor))
        self.register_buffer("rank", torch.arange(size))
        self.register_buffer("fixed", torch.ones(size))
        self.reset_full_width()

    @property
    def num_widths(self) -> int:
        return self.size // self.divisor

    @property
    def widths(self) -> torch.Tensor:
        """Candidate widths c_k = k d."""
        return torch.arange(1, self.num_widths + 1, device=self.logits.device) * self.divisor

    # ---- the parameterisation ---------------------------------------------
    @torch.no_grad()
    def reset_full_width(self) -> None:
        """Logits whose hard width is C: the last width has probability 1 - d / (2C),
        the others share the rest, so E = C - d / 4, a quarter width from the
        rounding boundary."""
        k = self.num_widths
        self.logits.zero_()
        if k > 1:
            p_last = 1 - self.divisor / (2 * self.size)
            self.logits[-1] = math.log(p_last * (k - 1) / (1 - p_last))

    @torch.no_grad()
    def set_width(self, width: int) -> None:
        """Logits that put (almost) all probability on one width."""
        if width % self.divisor or not self.divisor <= width <= self.size:
            raise ValueError(f"width {width} is not a multiple of {self.divisor} in "
                             f"[{self.divisor}, {self.size}]")
        self.logits.fill_(-30.0)
        self.logits[width // self.divisor - 1] = 0.0

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits / self.temperature, dim=0)

    def width_values(self) -> torch.Tensor:
        """w_k: probability that the width is at least c_k (reverse cumulative sum)."""
        p = self.probabilities()
        return torch.flip(torch.cumsum(torch.flip(p, [0]), 0), [0])

    def soft_values(self) -> torch.Tensor:
        """Per class: w of the width slot its importance rank falls in."""
        return self.width_values()[torch.div(self.rank, self.divisor, rounding_mode="floor")]

    def expected_width(self) -> torch.Tensor:
        return (self.probabilities() * self.widths.to(self.logits.dtype)).sum()

    def hard_width(self) -> torch.Tensor:
        """n = d round(E / d), halves up, in [d, C], as a float tensor, straight-through in E."""
        e = self.expected_width()
        hard = torch.clamp(torch.floor(e.detach() / self.divisor + 0.5) * self.divisor,
                           self.divisor, self.size)
        return e + (hard - e.detach())

    def hard_values(self) -> torch.Tensor:
        """1 for the classes the hard network keeps now (rank < n), else 0."""
        n = self.hard_width().detach()
        return (self.rank < n).to(self.logits.dtype)

    def values(self) -> torch.Tensor:
        if self.use_fixed:
            return self.fixed
        soft = self.soft_values()
        if self.straight_through:
            return self.hard_values() + (soft - soft.detach())
        return soft

    def kept(self, width: int) -> np.ndarray:
        """Sorted class indices of the ``width`` most important classes."""
        return np.flatnonzero(self.rank.cpu().numpy() < width)

    # ---- call sites ----------------------------------------------------------
    def add_site(self, class_index: np.ndarray) -> int:
        site = self.num_sites
        self.register_buffer(f"site{site}", torch.as_tensor(class_index, dtype=torch.long))
        self.num_sites += 1
        return site

    def site_index(self, site: int) -> torch.Tensor:
        return getattr(self, f"site{site}")

    def forward(self, x: torch.Tensor, site: int) -> torch.Tensor:
        vals = self.values()
        vals = torch.cat([vals, vals.new_ones(1)])
        return x * vals[self.site_index(site)].to(x.dtype)

    def extra_repr(self) -> str:
        return (f"group={self.group}, size={self.size}, divisor={self.divisor}, "
                f"sites={self.num_sites}")
