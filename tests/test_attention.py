"""Attention head width on a real model: a small timm ViT (random weights, no download).

The toy attention blocks of tests/toy_zoo.py go through the whole numerical
ladder (tests/test_ladder.py); this checks that the rules meet timm's own
Attention (fused qkv, reshape to (3, heads, head_dim), unbind, SDPA) and its class
token (expand + cat), and that the exported network is the hard network.
"""

from __future__ import annotations

import pytest
import torch

import s2h_fx

from helpers import count_flops, rel_err

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=10).eval()


def test_timm_vit_prunes_head_width_and_embedding() -> None:
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), attention="width")
    members = {m for g in pruner.grouping.prunable for m in g.members}
    # each block's qkv output (head width, 64 = 192 / 3 heads) and the embedding
    # (192: patch projection, class token, position embedding) are prunable
    assert {"blocks.0.attn.qkv:out", "blocks.1.attn.qkv:out", "patch_embed.proj:out"} <= members
    head_width = [g for g in pruner.grouping.prunable if "blocks.0.attn.qkv:out" in g.members]
    assert [g.size for g in head_width] == [64]
    pruned = pruner.eval().export()
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < 1e-5
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
    assert float(pruner.flops_ratio()) <= 0.5 + 0.005
    attn = pruned.get_submodule("blocks.0.attn.qkv")
    width = pruner.widths[head_width[0].index]
    assert attn.out_features == 3 * 3 * width  # q, k, v for each of the 3 heads


def test_timm_vit_head_width_at_full_width_is_the_model() -> None:
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    pruner = s2h_fx.prune_graph(model, 1.0, example_inputs=(x,)).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < 1e-5
        assert rel_err(pruner.soft_forward(x), model(x)) < 1e-5


def test_timm_beit_computed_qkv_bias_prunes_head_width() -> None:
    """BEiT adds ``cat((q_bias, k_zeros, v_bias))`` as the fused qkv's bias through
    ``F.linear``: the bias follows the output channels, so the head width is pruned
    (it was frozen as a weighted op with weights computed in the graph)."""
    torch.manual_seed(0)
    model = timm.create_model("beitv2_base_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=96, depth=2, num_heads=3,
                              num_classes=10).eval()
    with torch.no_grad():  # random q/v biases, so slicing them wrongly would show
        for name, p in model.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_()
    x = torch.randn(2, 3, 32, 32)
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), attention="width")
    head_width = [g for g in pruner.grouping.prunable if "blocks.0.attn.qkv.weight[0]" in g.members
                  or "blocks.0.attn.qkv:out" in g.members]
    assert [g.size for g in head_width] == [32]  # 96 / 3 heads, one set per head
    assert not pruner.grouping.unknown_ops
    # narrow the head width explicitly (the one-shot widths may prefer the MLPs)
    pruner.set_widths({**pruner.widths, head_width[0].index: 16})
    pruned = pruner.eval().export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(pruned(x), pruner(x)) < 1e-5
    attn = pruned.get_submodule("blocks.0.attn")
    assert attn.q_bias.shape == (3 * 16,) and attn.v_bias.shape == (3 * 16,)
    assert pruned.get_submodule("blocks.0.attn.qkv").weight.shape[0] == 3 * 3 * 16
    assert count_flops(pruned, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)
