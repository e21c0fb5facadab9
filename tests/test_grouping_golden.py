"""Golden grouping tables for the toy zoo: each group's channel count, members and
(for frozen groups) the reason. A change in grouping must show up here."""

from __future__ import annotations

import pytest

from s2h_fx.channels import GroupingResult
from s2h_fx.passes import find_channel_groups, trace_model

from helpers import build

OUT = "reaches a model output"
GOLDEN: dict[str, list[tuple[int, list[str], str | None]]] = {
    "residual": [
        (16, ["a.0:in", "a.0:out", "a.1", "b.0:in", "b.0:out", "b.1", "c.0:in", "c.0:out", "c.1",
              "head:in", "stem.0:out", "stem.1"], None),
        (4, ["head:out"], OUT),
    ],
    "squeeze_excite": [
        (32, ["fc1:in", "fc2:out", "head:in", "stem.0:out", "stem.1"], None),
        (16, ["fc1:out", "fc2:in"], None),
        (5, ["head:out"], OUT),
    ],
    "cat_split": [
        (16, ["a.0:in", "b.0:in", "g.0:in", "stem.0:out", "stem.1"], None),
        (16, ["a.0:out", "a.1", "c.0:in", "d.0:in"], None),
        (24, ["b.0:out", "b.1", "c.0:in", "e.0:in"], None),
        # g's two halves are multiplied: channel i and i + 16 are one class
        (16, ["c.0:out", "c.1", "d.0:out", "d.1", "e.0:out", "e.1", "g.0:out", "g.1", "head:in"],
         None),
        (3, ["head:out"], OUT),
    ],
    "grouped": [
        (32, ["dw.0:out", "dw.1", "pw.0:in", "stem.0:out", "stem.1"], None),
        (64, ["gc.0:out", "gc.1", "out:in", "pw.0:out", "pw.1"], None),
        (8, ["out:out"], OUT),
    ],
    "norms": [
        (32, ["conv1:out", "fc:in", "ln"], None),
        (32, ["conv2:in", "fc:out"], None),
        (32, ["act", "conv2:out", "gn", "head:in"], None),
        (6, ["head:out"], OUT),
    ],
    "flatten_head": [
        (16, ["f.0:out", "f.1", "fc2:in", "g.0:in"], None),
        (24, ["fc:in", "g.0:out", "g.1"], None),
        (32, ["fc2:out", "fc:out", "out:in"], None),
        (10, ["out:out"], OUT),
    ],
    "shuffle": [
        (32, ["a.0:in", "stem.0:out", "stem.1"], None),
        # the shuffle interleaves the two halves of a: channel i pairs with i + 16
        (16, ["a.0:out", "a.1", "b.0:in"], None),
        (32, ["b.0:out", "b.1", "head:in"], None),
        (4, ["head:out"], OUT),
    ],
    "bare_params": [
        (24, ["b1[0]", "gamma[0]", "w1:out", "w2[1]"], None),
        (16, ["out:in", "w2:out"], None),
        (3, ["out:out"], OUT),
    ],
    "shared": [
        (16, ["head:in", "shared:in", "shared:out", "stem.0:out", "stem.1"], None),
        (4, ["head:out"], OUT),
    ],
    "multi_output": [
        (16, ["body.0:out", "body.1", "mid.0:in"], None),
        (16, ["cls:in", "mid.0:out", "mid.1"], OUT),
        (5, ["cls:out"], OUT),
    ],
    "layers_1d": [
        (16, ["c1:in", "emb:out"], None),
        (24, ["bn", "c1:out", "ct:in"], None),
        (16, ["ct:out", "fc:in"], None),
        (7, ["fc:out"], OUT),
    ],
    "conv3d": [
        (16, ["a:out", "b:in", "bn"], None),
        (3, ["b:out"], OUT),
    ],
    "unknown_op": [
        (16, ["a.0:out", "a.1"], "op has no coupling rule"),
        (16, ["b.0:out", "b.1", "c:in"], None),
        (4, ["c:out"], OUT),
    ],
    # attention: the 96 qkv outputs are (3, 2 heads, 16): one set of 16 head-width
    # channels for q, k and v and both heads (SDPA couples q, k and v); the residual
    # stream of 32 is its own group
    "attention_sdpa": [
        (32, ["embed:out", "head:in", "proj:out", "qkv:in"], None),
        (16, ["proj:in", "qkv:out"], None),
        (5, ["head:out"], OUT),
    ],
    "attention_matmul": [
        (32, ["embed:out", "head:in", "proj:out", "qkv:in"], None),
        (16, ["proj:in", "qkv:out"], None),  # the fused view ties q, k and v here too
        (5, ["head:out"], OUT),
    ],
    # chunked: q and k are contracted together (one width), v goes on to proj (another)
    "attention_chunk": [
        (32, ["embed:out", "head:in", "proj:out", "qkv:in"], None),
        (16, ["qkv:out"], None),
        (16, ["proj:in", "qkv:out"], None),
        (5, ["head:out"], OUT),
    ],
    "attention_separate": [
        (32, ["embed:out", "head:in", "k:in", "proj:out", "q:in", "v:in"], None),
        # SDPA: q and k share the contracted width; v's width is the output's, read by
        # proj (separate projections: the two widths prune apart)
        (16, ["k:out", "q:out"], None),
        (16, ["proj:in", "v:out"], None),
        (5, ["head:out"], OUT),
    ],
}
# the default (attention="auto") on the attention toys prunes both kinds: whole heads
# (2 heads x 16: q, k and v of a head, proj's columns for it) and, after the groups of
# the whole-heads analysis, each head-width group inside them (as in width mode)
_EMBED = (32, ["embed:out", "head:in", "proj:out", "qkv:in"], None)
_HEADS = (32, ["proj:in", "qkv:out"], None)
GOLDEN_AUTO: dict[str, list[tuple[int, list[str], str | None]]] = {
    "attention_sdpa": [_EMBED, _HEADS, (5, ["head:out"], OUT), (16, ["proj:in", "qkv:out"], None)],
    "attention_matmul": [_EMBED, _HEADS, (5, ["head:out"], OUT),
                         (16, ["proj:in", "qkv:out"], None)],
    "attention_chunk": [_EMBED, _HEADS, (5, ["head:out"], OUT), (16, ["qkv:out"], None),
                        (16, ["proj:in", "qkv:out"], None)],
    "attention_separate": [
        (32, ["embed:out", "head:in", "k:in", "proj:out", "q:in", "v:in"], None),
        (32, ["k:out", "proj:in", "q:out", "v:out"], None), (5, ["head:out"], OUT),
        (16, ["k:out", "q:out"], None), (16, ["proj:in", "v:out"], None)],
}
DIVISORS = {("grouped", 1): 16, ("norms", 2): 8}  # atoms: conv groups of 16, GN groups of 8


def _table(name: str,
           attention: str) -> tuple[GroupingResult, list[tuple[int, list[str], str | None]]]:
    model, inputs = build(name)
    result = find_channel_groups(trace_model(model, inputs), attention=attention)
    got = []
    for g in result.groups:
        reason = None if g.prunable else g.frozen[0].split(" at ")[0]
        got.append((g.size, sorted(g.members), reason))
    return result, got


@pytest.mark.parametrize("name", sorted(GOLDEN_AUTO))
def test_golden_groups_of_attention_by_default(name: str) -> None:
    result, got = _table(name, "auto")
    assert got == GOLDEN_AUTO[name]
    assert result.attention == "both"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_groups(name: str) -> None:
    """In width mode (the default where no attention is computed: the same tables)."""
    result, got = _table(name, "width")
    assert got == GOLDEN[name]
    if not name.startswith("attention"):
        assert _table(name, "auto")[1] == got
    for (model_name, index), divisor in DIVISORS.items():
        if model_name == name:
            assert result.groups[index].divisor == divisor
    printed = str(result)
    assert "prunable" in printed and all(f"{g.index} " in printed for g in result.groups)
