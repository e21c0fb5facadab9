"""Models by name for the command line: torchvision's classification models, or timm's
as ``timm:NAME`` (``timm:vit_small_patch16_224``, ``timm:convnext_tiny``), with random
weights (or a checkpoint the caller loads afterwards), in eval mode.

timm is an optional extra (``pip install 's2h-fx[timm]'``), imported only for a
``timm:`` name. A timm model's default input size is its own (``pretrained_cfg``:
``timm:mobilenetv5_base`` takes 256x256); a torchvision model's is 3x224x224. Given an
image size, a timm model that takes one (ViTs, Swins: their patch grid and position
tables are built for it) is built for that size, so ``s2h-fx prune timm:... --cifar10``
trains a ViT at 32x32; models without the option are size-free anyway.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from s2h_fx.errors import InputError

TIMM_PREFIX = "timm:"
TORCHVISION_INPUT_SIZE = (3, 224, 224)


def _unknown(name: str, names: list[str], where: str, listing: str) -> InputError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return InputError(f"unknown model {name!r}: not a {where}{hint} (all {len(names)} names: "
                      f"{listing})")


def is_timm(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def load_model(name: str, *, num_classes: int | None = None,
               image_size: tuple[int, int] | None = None) -> nn.Module:
    """The model called ``name`` with random weights, in eval mode. ``num_classes``
    replaces the classifier's width; ``image_size`` (H, W) builds a timm model that takes
    a size for it (ignored by models that do not). Unknown names, a missing timm and a
    model that cannot be built raise :class:`InputError` saying what to do."""
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if is_timm(name):
        return _load_timm(name[len(TIMM_PREFIX):], image_size, kwargs)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise _unknown(name, names, "torchvision classification model (a timm model is "
                       "named timm:NAME)", "torchvision.models.list_models(module="
                       "torchvision.models)")
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _no_timm(name: str) -> InputError:
    return InputError(f"timm:{name} needs timm, an optional extra: pip install 's2h-fx[timm]'")


def _load_timm(name: str, image_size: tuple[int, int] | None,
               kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise _no_timm(name) from exc
    if not timm.is_model(name):  # takes a pretrained tag too: resnet18.a1_in1k
        raise _unknown(name, timm.list_models(), "timm model", "timm.list_models()")
    try:
        if image_size is not None:
            try:
                return timm.create_model(name, pretrained=False, img_size=image_size,
                                         **kwargs).eval()
            except TypeError as exc:  # a model without the option: size-free
                if "img_size" not in str(exc):
                    raise
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    except Exception as exc:  # timm's own checks (a size its patches do not divide, ...)
        size = "" if image_size is None else f" at {image_size[0]}x{image_size[1]}"
        raise InputError(f"timm could not build {name}{size}: {type(exc).__name__}: "
                         f"{exc}") from exc


def default_input_size(name: str) -> tuple[int, ...]:
    """(C, H, W) the model is made for: a timm model's pretrained configuration's input
    size (read without building the model), else 3x224x224."""
    if is_timm(name):
        try:
            from timm.models import get_pretrained_cfg
        except ImportError as exc:
            raise _no_timm(name[len(TIMM_PREFIX):]) from exc
        cfg = get_pretrained_cfg(name[len(TIMM_PREFIX):])
        if cfg is not None and cfg.input_size:
            return tuple(int(s) for s in cfg.input_size)
    return TORCHVISION_INPUT_SIZE
