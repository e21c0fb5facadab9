"""torchvision's Swin attention (``swin_t``, ``swin_s``, ``swin_b``), traced as its ops.

torchvision computes a window attention in ``shifted_window_attention``, a function it
marks as not traceable (``torch.fx.wrap``): its padding and shift decisions are Python
control flow on the feature map's size, and it reads the head width from the input's
channel count (``C // num_heads``). Kept as one call it has no coupling rule, so its
attention and the embedding it reads keep all their channels.

The example inputs fix the feature map's size at each block, so the tracer's working
copy (as for ``nn.MultiheadAttention``, :mod:`s2h_fx.mha`) gets each
``ShiftedWindowAttention`` swapped for :class:`InlinedShiftedWindowAttention`, whose
forward is the same computation with those decisions taken in Python for the size seen
on the example inputs (its padding, whether it shifts, the shifted windows' mask as a
constant) and with the head width and the attention width written as constants
(``-1`` where a size follows the pruned channels), so the rules see the attention. The
softmax keeps its original scale. Called on a feature map of another size it falls
back to torchvision's function (the traced graph is specialised to the example size,
as every traced graph's shapes are). ``ShiftedWindowAttentionV2`` (cosine attention
with a log-spaced position MLP) is not inlined.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2h_fx.observe import DIFFERING, Recorder

log = logging.getLogger(__name__)


def _attention_type() -> type[nn.Module] | None:
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
    except ImportError:  # torchvision without Swin
        return None
    return ShiftedWindowAttention


def _select(m: nn.Module) -> bool:
    cls = _attention_type()
    return cls is not None and type(m) is cls


def _describe(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0] if args else kwargs.get("x")
    return tuple(int(s) for s in x.shape[1:3]) if isinstance(x, torch.Tensor) and x.ndim == 4 else None


RECORDER: Recorder = (_select, _describe)


def _windows(size: tuple[int, int], window: list[int], shift: list[int]) -> dict[str, Any]:
    """What torchvision's function decides from the feature map's size, decided once."""
    h, w = size
    pad_b, pad_r = (window[0] - h % window[0]) % window[0], (window[1] - w % window[1]) % window[1]
    ph, pw = h + pad_b, w + pad_r
    shift = [0 if window[0] >= ph else shift[0], 0 if window[1] >= pw else shift[1]]
    mask = None
    if sum(shift) > 0:
        ids = torch.zeros(ph, pw)
        count = 0
        for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
            for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
                ids[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        ids = ids.view(ph // window[0], window[0], pw // window[1], window[1])
        ids = ids.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
        diff = ids.unsqueeze(1) - ids.unsqueeze(2)
        mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
    return {"size": (h, w), "pad": (pad_b, pad_r), "padded": (ph, pw), "shift": shift,
            "mask": mask}


class InlinedShiftedWindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` computed as plain ops for the feature-map
    size seen on the example inputs (``s2h_windows``); the same parameters and
    buffers, plus the shifted windows' mask as a buffer (``s2h_mask``) and its two
    dropouts as ``nn.Dropout`` modules."""

    s2h_windows: dict[str, Any]
    s2h_mask: torch.Tensor
    s2h_attn_drop: nn.Dropout
    s2h_proj_drop: nn.Dropout
    window_size: list[int]
    shift_size: list[int]
    num_heads: int
    attention_dropout: float
    dropout: float
    qkv: nn.Linear
    proj: nn.Linear
    relative_position_bias_table: nn.Parameter
    relative_position_index: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        win = self.s2h_windows
        if not isinstance(x, torch.fx.Proxy) and tuple(x.shape[1:3]) != win["size"]:
            from torchvision.models.swin_transformer import shifted_window_attention
            return shifted_window_attention(
                x, self.qkv.weight, self.proj.weight, self._bias(), self.window_size,
                self.num_heads, shift_size=self.shift_size, attention_dropout=self.attention_dropout,
                dropout=self.dropout, qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
                training=self.training)
        (h, w), (pad_b, pad_r), (ph, pw), shift = win["size"], win["pad"], win["padded"], win["shift"]
        wh, ww = self.window_size
        heads, head_dim = self.num_heads, self.qkv.out_features // 3 // self.num_heads
        b = x.shape[0]
        y = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        if sum(shift) > 0:
            y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        n_win, tokens = (ph // wh) * (pw // ww), wh * ww
        y = y.view(b, ph // wh, wh, pw // ww, ww, -1).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(b * n_win, tokens, -1)
        qkv = self.qkv(y).reshape(b * n_win, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1)) + self._bias()
        if win["mask"] is not None:
            attn = attn.view(b, n_win, heads, tokens, tokens) + self.s2h_mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(b * n_win, heads, tokens, tokens)
        attn = self.s2h_attn_drop(F.softmax(attn, dim=-1))
        y = attn.matmul(v).transpose(1, 2).reshape(b * n_win, tokens, -1)
        y = self.s2h_proj_drop(self.proj(y))
        y = y.view(b, ph // wh, pw // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
        if sum(shift) > 0:
            y = torch.roll(y, shifts=(shift[0], shift[1]), dims=(1, 2))
        return y[:, :h, :w, :].contiguous()

    def _bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.relative_position_bias_table[self.relative_position_index]
        return table.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


def prepare(model: nn.Module, observed: dict[str, Any]) -> dict[str, str]:
    """Swap each torchvision ``ShiftedWindowAttention`` of ``model`` (the tracer's
    working copy) that ran on one feature-map size for
    :class:`InlinedShiftedWindowAttention`. Returns the reason of each one kept whole."""
    leaves: dict[str, str] = {}
    for name, m in model.named_modules():
        if not _select(m):
            continue
        size = observed.get(name)
        if size is None or size == DIFFERING:
            leaves[name] = ("torchvision's shifted_window_attention kept whole ("
                            + ("called on feature maps of differing sizes" if size == DIFFERING
                               else "not called on the example inputs") + ")")
            continue
        windows = _windows(size, list(m.window_size), list(m.shift_size))
        # dropout as modules: F.dropout(training=self.training) would be traced (in eval
        # mode) as a constant and never drop in training
        m.add_module("s2h_attn_drop", nn.Dropout(m.attention_dropout))
        m.add_module("s2h_proj_drop", nn.Dropout(m.dropout))
        m.__class__ = InlinedShiftedWindowAttention
        m.s2h_windows = windows
        if windows["mask"] is not None:  # in the attention's dtype and on its device
            m.register_buffer("s2h_mask", windows["mask"].to(m.qkv.weight), persistent=False)
    if leaves:
        log.info("Swin attention kept whole: %s", "; ".join(f"{k}: {v}" for k, v in leaves.items()))
    return leaves
