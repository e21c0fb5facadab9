"""s2h-fx: prune PyTorch networks as a torch.fx compiler pass (S2HPruner)."""

from s2h_fx.channels import ChannelGroup, GroupingResult
from s2h_fx.config import PruneConfig
from s2h_fx.errors import (
    BudgetError,
    CheckpointError,
    InputError,
    InvariantError,
    NonFiniteError,
    NoPrunableChannelsError,
    S2HError,
    TraceError,
    UnsupportedOpError,
)
from s2h_fx.ops import register_op, register_rewrite
from s2h_fx.pruner import Pruner, prune_graph
from s2h_fx.rules import register_rule
from s2h_fx.surgery import register_surgery

__version__ = "0.1.0"

__all__ = [
    "BudgetError", "CheckpointError", "ChannelGroup", "GroupingResult", "InputError", "InvariantError",
    "NoPrunableChannelsError", "NonFiniteError", "PruneConfig", "Pruner", "S2HError", "TraceError",
    "UnsupportedOpError", "prune_graph", "register_op", "register_rewrite", "register_rule",
    "register_surgery",
]
