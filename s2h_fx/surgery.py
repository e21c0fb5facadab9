"""Module surgery: after a module's parameters are sliced, update every
attribute that records a width. A registry keyed by module type; users add
entries for their own layers with :func:`register_surgery`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from torch import nn

if TYPE_CHECKING:  # private torch bases, named only in casts
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.conv import _ConvNd

# fn(module, new shape of its first input) -> None; parameters are already sliced
Surgery = Callable[[nn.Module, tuple[int, ...] | None], None]
SURGERY: dict[type, Surgery] = {}


def register_surgery(*types: type) -> Callable[[Surgery], Surgery]:
    def deco(fn: Surgery) -> Surgery:
        for t in types:
            SURGERY[t] = fn
        return fn

    return deco


def apply_surgery(module: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    for cls in type(module).__mro__:
        if cls in SURGERY:
            SURGERY[cls](module, in_shape)
            return


@register_surgery(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    m = cast("_ConvNd", m)
    old_out, old_groups = m.out_channels, m.groups
    new_out = m.weight.shape[0]
    if old_groups > 1 and in_shape is not None:  # whole groups pruned, or inside each group
        m.groups = in_shape[1] // m.weight.shape[1]
    elif old_groups > 1:  # whole groups were pruned; channels per group are unchanged
        m.groups = old_groups * new_out // old_out
    m.out_channels = new_out
    m.in_channels = m.weight.shape[1] * m.groups


@register_surgery(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_t(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    m = cast("_ConvNd", m)
    m.in_channels = m.weight.shape[0]
    m.out_channels = m.weight.shape[1] * m.groups


@register_surgery(nn.Linear)
def _linear(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    m = cast(nn.Linear, m)
    m.out_features, m.in_features = m.weight.shape


@register_surgery(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                  nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _batch_norm(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    m = cast("_NormBase", m)
    if m.weight is not None:
        m.num_features = m.weight.shape[0]
    elif m.running_mean is not None:
        m.num_features = m.running_mean.shape[0]
    elif in_shape is not None:
        m.num_features = in_shape[1]


@register_surgery(nn.LayerNorm, nn.RMSNorm)
def _layer_norm(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    m = cast(nn.LayerNorm, m)  # RMSNorm: the same two attributes
    n = len(m.normalized_shape)
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)
    elif in_shape is not None:
        m.normalized_shape = tuple(in_shape[-n:])


@register_surgery(nn.GroupNorm)
def _group_norm(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    m = cast(nn.GroupNorm, m)
    per_group = m.num_channels // m.num_groups
    new = m.weight.shape[0] if m.weight is not None else (in_shape or (0, m.num_channels))[1]
    # one group stays one group (its channels are pruned one by one, as LayerNorm's)
    m.num_channels, m.num_groups = new, 1 if m.num_groups == 1 else new // per_group


@register_surgery(nn.PReLU)
def _prelu(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    m = cast(nn.PReLU, m)
    m.num_parameters = m.weight.numel()


@register_surgery(nn.Embedding)
def _embedding(m: nn.Module, in_shape: tuple[int, ...] | None) -> None:
    m = cast(nn.Embedding, m)
    m.num_embeddings, m.embedding_dim = m.weight.shape
