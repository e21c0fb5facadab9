"""FLOPs of attention modules are counted in full, fast path or not.

In eval mode without gradients ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` take torch's fused fast path, whose attention
flop_counter does not see. Every FLOPs count in the project turns it off, so a dense
model, a leaf kept whole and the traced network all count the same work.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import s2h_fx
from s2h_fx.measure import count_flops


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return self.head(self.layer(h)).mean(1)


def slow_path_flops(model: nn.Module, *inputs: torch.Tensor) -> float:
    """With gradients on, torch never takes the fast path: the full count."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return float(counter.get_total_flops())


def test_dense_count_includes_the_attention() -> None:
    model, x = Encoder().eval(), torch.randn(2, 10, 8)
    full = slow_path_flops(model, x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # what was counted
        model(x)
    assert counter.get_total_flops() < full  # the fast path hides work from the counter
    assert count_flops(model, x) == full
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(x,))
    assert pruner.flops_model.total == pytest.approx(full, rel=1e-9)


def test_a_leaf_attention_is_counted_in_full() -> None:
    model = Encoder().eval()
    x, pad = torch.randn(2, 10, 8), torch.zeros(2, 10, dtype=torch.bool)
    pad[:, -2:] = True  # a key padding mask keeps the attention a leaf
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(x, pad))
    assert any("key_padding_mask" in str(v) for v in pruner.graph_module.meta["s2h_trace"]
               ["leaves"].values())
    assert pruner.flops_model.total == pytest.approx(slow_path_flops(model, x, pad), rel=1e-9)
