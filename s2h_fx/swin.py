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
as every traced graph's shapes are).

``ShiftedWindowAttentionV2`` (``swin_v2_t``/``_s``/``_b``) is inlined the same way as
:class:`InlinedShiftedWindowAttentionV2`: cosine attention (q and k L2-normalised over
the head width, which a pruned head width leaves exact: a zeroed channel adds nothing
to a norm), a learned per-head logit scale, the position bias from a small MLP over a
constant table (its outputs are per head), and the key's bias held at zero as
torchvision does (a constant 0/1 buffer over the qkv outputs, sliced with them).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2h_fx.observe import DIFFERING, Recorder

log = logging.getLogger(__name__)


def _attention_types() -> tuple[type[nn.Module], ...]:
    """torchvision's window attention classes (V1, V2), where torchvision has them."""
    try:
        from torchvision.models.swin_transformer import (
            ShiftedWindowAttention,
            ShiftedWindowAttentionV2,
        )
    except ImportError:  # torchvision without Swin
        return ()
    return ShiftedWindowAttention, ShiftedWindowAttentionV2


def _select(m: nn.Module) -> bool:
    return type(m) in _attention_types()


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
    s2h_version: int
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
            # another size: torchvision's own forward (it calls get_relative_position_bias)
            return _attention_types()[self.s2h_version].forward(self, x)
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
        attn, v = self._attend(y, b * n_win, tokens, heads, head_dim)
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

    def _attend(self, y: torch.Tensor, windows: Any, tokens: int, heads: int, head_dim: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention logits of the windows' tokens ``y`` (scaled dot products plus the
        position bias) and the values."""
        qkv = self.qkv(y).reshape(windows, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return (q * head_dim ** -0.5).matmul(k.transpose(-2, -1)) + self.get_relative_position_bias(), v

    def get_relative_position_bias(self) -> torch.Tensor:
        return _gather_bias(self.relative_position_bias_table, self.relative_position_index,
                            self.window_size)


def _gather_bias(table: torch.Tensor, index: torch.Tensor, window: list[int]) -> torch.Tensor:
    """(1, heads, n, n) bias of each token pair from a table over relative positions."""
    n = window[0] * window[1]
    return table[index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


class InlinedShiftedWindowAttentionV2(InlinedShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttentionV2`` as plain ops: as
    :class:`InlinedShiftedWindowAttention`, with cosine attention scaled by the learned
    per-head ``logit_scale`` and the position bias from ``cpb_mlp``; the key's bias is
    multiplied by ``s2h_qkv_keep`` (0 over the keys, 1 elsewhere), as torchvision zeroes
    it at every call."""

    s2h_qkv_keep: torch.Tensor
    logit_scale: nn.Parameter
    cpb_mlp: nn.Sequential
    relative_coords_table: torch.Tensor

    def _attend(self, y: torch.Tensor, windows: Any, tokens: int, heads: int, head_dim: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        bias: torch.Tensor | None = self.qkv.bias
        if bias is not None:
            bias = bias * self.s2h_qkv_keep
        qkv = F.linear(y, self.qkv.weight, bias)
        qkv = qkv.reshape(windows, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.normalize(q, dim=-1).matmul(F.normalize(k, dim=-1).transpose(-2, -1))
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return attn + self.get_relative_position_bias(), v

    def get_relative_position_bias(self) -> torch.Tensor:
        table = self.cpb_mlp(self.relative_coords_table)
        table = table.view(-1, table.shape[-1])  # (relative positions, heads)
        return 16 * torch.sigmoid(_gather_bias(table, self.relative_position_index,
                                               self.window_size))


def prepare(model: nn.Module, observed: dict[str, Any]) -> dict[str, str]:
    """Swap each torchvision ``ShiftedWindowAttention`` (V1 or V2) of ``model`` (the tracer's
    working copy) that ran on one feature-map size for
    :class:`InlinedShiftedWindowAttention` (or its V2). Returns the reason of each one kept whole."""
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
        version = _attention_types().index(type(m))
        if version == 1 and m.qkv.bias is not None:
            keep = torch.ones_like(m.qkv.bias, requires_grad=False)
            keep[m.qkv.out_features // 3: 2 * m.qkv.out_features // 3] = 0
            m.register_buffer("s2h_qkv_keep", keep.detach(), persistent=False)
        m.__class__ = (InlinedShiftedWindowAttention, InlinedShiftedWindowAttentionV2)[version]
        m.s2h_version = version
        m.s2h_windows = windows
        if windows["mask"] is not None:  # in the attention's dtype and on its device
            m.register_buffer("s2h_mask", windows["mask"].to(m.qkv.weight), persistent=False)
    if leaves:
        log.info("Swin attention kept whole: %s", "; ".join(f"{k}: {v}" for k, v in leaves.items()))
    return leaves
