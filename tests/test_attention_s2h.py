"""S2H training steps on a tiny timm ViT, head width, whole heads and both at once: the
decoupled gradient split holds exactly, and the attention masks move toward the budget."""

from __future__ import annotations

import pytest
import torch
from test_s2h import _loop as s2h_loop

import s2h_fx

from helpers import rel_err

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=10)


def attention_groups(pruner: s2h_fx.Pruner) -> list[int]:
    return [g.index for g in pruner.grouping.prunable
            if any(m.endswith("attn.qkv:out") for m in g.members)]


@pytest.mark.parametrize("attention", ["width", "heads", "both"])
def test_decoupled_gradient_split_on_a_vit(attention: str) -> None:
    model, x = tiny_vit(), torch.randn(4, 3, 32, 32)
    pruner = s2h_fx.prune_graph(model, 0.4, example_inputs=(x,), attention=attention,
                                divisor=1 if attention == "heads" else 8)
    # both: each block's heads and its head width
    assert len(attention_groups(pruner)) == (4 if attention == "both" else 2)
    pruner.train()
    torch.manual_seed(1)
    for mask in pruner.masks().values():  # inside the full width, not saturated
        mask.reset_full_width()
        with torch.no_grad():
            mask.logits.add_(torch.randn_like(mask.logits) * 0.5)
    out = pruner(x)
    y = torch.randint(0, 10, (4,))
    losses = pruner.losses(out, y)
    theta, u = pruner.weight_parameters(), pruner.mask_parameters()
    # S2H: theta gets G_task + G_kd_hard (hard branch), u gets G_task + G_kd_soft + G_R
    ref_theta = torch.autograd.grad(losses["task"] + losses["kd_hard"], theta,
                                    retain_graph=True, allow_unused=True)
    ref_u = torch.autograd.grad(losses["task"] + losses["kd_soft"] + losses["resource"], u,
                                retain_graph=True, allow_unused=True)
    pruner.backward(losses)
    for p, r in zip(theta, ref_theta):
        expected = torch.zeros_like(p) if r is None else r
        got = torch.zeros_like(p) if p.grad is None else p.grad
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    heads = set(attention_groups(pruner))
    for g, p, r in zip(pruner.masks(), u, ref_u):
        assert r is not None and torch.allclose(p.grad, r, rtol=1e-4, atol=1e-7)
        if g in heads:
            assert float(p.grad.abs().sum()) > 0  # the attention masks learn


@pytest.mark.parametrize("attention", ["width", "heads", "both"])
def test_s2h_steps_move_attention_masks_toward_the_budget(attention: str) -> None:
    model, x = tiny_vit(), torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), attention=attention,
                                divisor=1 if attention == "heads" else 8)
    pruner.reset_masks()  # start the search at full width
    heads = attention_groups(pruner)
    start = {g: float(pruner.masks()[g].expected_width().detach()) for g in heads}
    ratios = s2h_loop(pruner, x, y, steps=40)  # SGD lr 0.01, momentum 0.9, a mask step each
    assert ratios[0] > 0.9 and ratios[-1] < ratios[0] - 0.2  # descending to 0.5
    moved = {g for g in heads if float(pruner.masks()[g].expected_width().detach()) < start[g] - 1e-3}
    assert moved
    if attention == "both":  # whole heads and head widths both shrink
        inner = pruner.grouping.inner_from
        assert any(g < inner for g in moved) and any(g >= inner for g in moved), moved
    pruner.eval()
    exported = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < 1e-5
