"""FLOPs of attention modules are counted in full, fast path or not.

In eval mode without gradients ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer`` take torch's fused fast path, whose attention
flop_counter does not see. Every FLOPs count in the project turns it off, so a dense
model, a leaf kept whole and the traced network all count the same work. The same
holds for ``F.scaled_dot_product_attention``'s fused CPU kernel (no FLOP formula in
torch): counts run its math path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
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
    """With gradients on, torch never takes the fast path, and SDPA's math kernel is
    counted as its two products: the full count."""
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return float(counter.get_total_flops())


def test_scaled_dot_product_attention_is_counted() -> None:
    """q·kᵀ and attn·v: 2·L·S·E + 2·L·S·Ev per batch and head, whichever kernel torch
    would pick (equal head widths take the fused CPU kernel, which torch's counter
    does not see; unequal ones the math path, which it does)."""
    b, h, n, s = 2, 3, 5, 7
    for e, ev in ((16, 16), (16, 8)):
        q, k, v = torch.randn(b, h, n, e), torch.randn(b, h, s, e), torch.randn(b, h, s, ev)
        assert count_flops(F.scaled_dot_product_attention, q, k, v) == 2 * b * h * n * s * (e + ev)


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
