"""ChannelMask: one module per prunable group, called wherever the group's
channels enter an op that sums over channels (conv, linear, matmul)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ChannelMask(nn.Module):
    """Scales each channel of a group by its mask value.

    ``values`` holds one value per class of the group (1 = fully kept). Each call
    site has a buffer ``site{k}`` of class indices laid out to broadcast against
    the input (-1 where the position belongs to another group: left unscaled).
    """

    values: torch.Tensor

    def __init__(self, group: int, size: int) -> None:
        super().__init__()
        self.group = group
        self.size = size
        self.num_sites = 0
        self.register_buffer("values", torch.ones(size))

    def add_site(self, class_index: np.ndarray) -> int:
        site = self.num_sites
        self.register_buffer(f"site{site}", torch.as_tensor(class_index, dtype=torch.long))
        self.num_sites += 1
        return site

    def site_index(self, site: int) -> torch.Tensor:
        return getattr(self, f"site{site}")

    def forward(self, x: torch.Tensor, site: int) -> torch.Tensor:
        vals = torch.cat([self.values, self.values.new_ones(1)])
        return x * vals[self.site_index(site)].to(x.dtype)

    def extra_repr(self) -> str:
        return f"group={self.group}, size={self.size}, sites={self.num_sites}"
