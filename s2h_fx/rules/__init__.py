"""Coupling rules: which ops move, couple or freeze channels. Extend with
:func:`register_rule`."""

from s2h_fx.rules import (  # noqa: F401  (registers the built-ins)
    elementwise,
    layers,
    shape,
    timm_functions,
    torchvision_functions,
)
from s2h_fx.rules.base import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    RuleContext,
    lookup_rule,
    register_rule,
)

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "RuleContext", "lookup_rule",
           "register_rule"]
