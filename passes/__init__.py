"""Graph passes of s2h-fx, installed as ``s2h_fx.passes``.

The pipeline, in order (each a pure function over a GraphModule):
"""

from s2h_fx.passes.trace_model import trace_model  # noqa: I001  1. torch.fx trace + shapes + per-node FLOPs
from s2h_fx.passes.find_channel_groups import find_channel_groups  # 2. coupled channel groups
from s2h_fx.passes.build_flops_model import build_flops_model  # FLOPs as a function of widths
from s2h_fx.passes.insert_masks import insert_masks  # 3. one ChannelMask per group at mixing sites
from s2h_fx.passes.plan_surgery import plan_surgery  # 5a. printable plan of what to slice
from s2h_fx.passes.emit_pruned import emit_pruned  # 5b. the physically smaller GraphModule

PREPARE_PASSES = (trace_model, find_channel_groups, build_flops_model, insert_masks)
EXPORT_PASSES = (plan_surgery, emit_pruned)

__all__ = ["PREPARE_PASSES", "EXPORT_PASSES", "build_flops_model", "emit_pruned",
           "find_channel_groups", "insert_masks", "plan_surgery", "trace_model"]
