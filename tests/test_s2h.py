"""S2H training: the mask parameterisation, the decoupled gradient split, the hard
branch equal to the export after training steps, the mask optimiser reaching the
budget, and the state_dict round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import s2h_fx
from s2h_fx.masks import ChannelMask
from s2h_fx.one_shot import choose_widths

from helpers import build, rel_err


def test_mask_parameterisation() -> None:
    m = ChannelMask(0, 32, divisor=8)
    m.rank.copy_(torch.tensor(list(range(31, -1, -1))))  # class 31 most important
    # initial hard width is the full width: the last width has probability
    # 1 - d / (2C) = 7/8, the three others 1/24 each: E = 28 + (8 + 16 + 24) / 24 = 30
    assert float(m.hard_width().detach()) == 32
    assert float(m.probabilities()[-1].detach()) == pytest.approx(7 / 8)
    assert float(m.expected_width().detach()) == pytest.approx(30.0)
    w = m.width_values()
    w = w.detach()
    assert torch.all(w[:-1] >= w[1:]) and float(w[0]) == pytest.approx(1.0)
    vals = m.soft_values()  # the 8 most important classes get w_1 = 1
    assert torch.allclose(vals[24:], torch.ones(8))
    assert torch.allclose(vals[:8], w[3].expand(8))
    m.set_width(16)
    assert float(m.hard_width()) == 16
    assert list(m.kept(16)) == list(range(16, 32))
    # the hard width is the nearest multiple of d, so the smallest width is reachable
    two = ChannelMask(1, 16, divisor=8)
    for p_narrow, expected in ((0.6, 8), (0.9, 8), (0.4, 16), (0.5, 16)):  # E = 16 - 8 p
        with torch.no_grad():
            two.logits.copy_(torch.log(torch.tensor([p_narrow, 1 - p_narrow])))
        assert float(two.hard_width().detach()) == expected, p_narrow
    # straight-through: dn/dE = 1
    e = m.expected_width()
    (g_n,) = torch.autograd.grad(m.hard_width(), m.logits)
    (g_e,) = torch.autograd.grad(e, m.logits)
    assert torch.allclose(g_n, g_e)


def _step_inputs(name: str):
    if name == "resnet18":
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        x = torch.randn(4, 3, 32, 32)
    else:
        model, (x,) = build(name)
    return model, x


@pytest.mark.parametrize("name", ["resnet18", "cat_split"])
def test_decoupled_gradient_split(name: str) -> None:
    model, x = _step_inputs(name)
    pruner = s2h_fx.prune_graph(model, 0.4, example_inputs=(x,))
    pruner.train()
    # a sub-network strictly inside the full width, masks not saturated
    for mask in pruner.masks().values():
        mask.reset_full_width()
        with torch.no_grad():
            mask.logits.add_(torch.randn_like(mask.logits) * 0.5)
    out = pruner(x)
    soft = out[0]
    y = torch.randint(0, soft.shape[-1], (soft.shape[0],)) if soft.dim() == 2 else None
    if y is None:  # dense outputs: use a per-pixel argmax target over the last axis
        y = soft.detach().argmax(-1)
    losses = pruner.losses(out, y, task_loss=lambda s, t: torch.nn.functional.cross_entropy(
        s.flatten(0, -2), t.flatten()))
    theta, u = pruner.weight_parameters(), pruner.mask_parameters()
    ref_theta = torch.autograd.grad(losses["task"] + losses["kd_hard"], theta, retain_graph=True,
                                    allow_unused=True)
    ref_u = torch.autograd.grad(losses["task"] + losses["kd_soft"] + losses["resource"], u,
                                retain_graph=True, allow_unused=True)
    leak = torch.autograd.grad(losses["kd_soft"], theta, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in leak)  # G_s would reach theta
    assert all(g is None for g in torch.autograd.grad(losses["kd_hard"], u, retain_graph=True,
                                                       allow_unused=True))
    pruner.backward(losses)
    for p, r in zip(theta, ref_theta):
        expected = torch.zeros_like(p) if r is None else r
        got = torch.zeros_like(p) if p.grad is None else p.grad
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    for p, r in zip(u, ref_u):
        assert r is not None and torch.allclose(p.grad, r, rtol=1e-4, atol=1e-7)


def _loop(pruner: s2h_fx.Pruner, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.01):
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=lr, momentum=0.9)
    pruner.train()
    ratios = []
    for _ in range(steps):
        out = pruner(x)
        losses = pruner.losses(out, y)
        opt.zero_grad()
        pruner.backward(losses)
        opt.step()
        pruner.mask_step()
        ratios.append(float(pruner.flops_ratio(pruner.mask_widths())))
    return ratios


def test_hard_branch_equals_export_after_training_steps() -> None:
    model, (x,) = build("squeeze_excite")
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    y = torch.randint(0, 5, (x.shape[0],))
    _loop(pruner, x, y, steps=5)
    assert pruner.widths != {g.index: g.size for g in pruner.grouping.prunable}
    pruner.eval()
    exported = pruner.export()
    assert rel_err(pruner(x), exported(x)) < 1e-5
    assert rel_err(pruner.masked_forward(x), exported(x)) < 1e-4
    pruner.train()  # a train-mode forward follows the masks, which the last step moved
    _, hard = pruner(x)
    assert rel_err(hard, pruner.export().train()(x)) < 1e-5


def test_soft_at_full_width_is_the_original_model() -> None:
    model, x = _step_inputs("resnet18")
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    pruner.set_widths({g.index: g.size for g in pruner.grouping.prunable})
    model.eval()
    pruner.eval()
    with torch.no_grad():
        assert rel_err(pruner.soft_forward(x), model(x)) < 1e-5
        assert rel_err(pruner(x), model(x)) < 1e-5


def test_mask_optimiser_reaches_the_budget() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    pruner = s2h_fx.prune_graph(model, 0.3, example_inputs=(x[:2],))
    assert abs(float(pruner.flops_ratio()) - 0.3) < 0.03  # the one-shot widths ...
    pruner.reset_masks()  # ... until a loop starts training from full width, as fit() does
    ratios = _loop(pruner, x, y, steps=60)
    assert ratios[0] > 0.9  # training starts from full width
    assert min(abs(r - 0.3) for r in ratios) < 0.01  # reaches the budget ...
    assert all(abs(r - 0.3) < 0.03 for r in ratios[-10:])  # ... and stays there


def test_state_dict_round_trip() -> None:
    model, (x,) = build("cat_split")
    y = torch.randint(0, 3, (x.shape[0], 16, 16))
    pruner = s2h_fx.prune_graph(model, 0.6, example_inputs=(x,))
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.01)
    pruner.train()
    for _ in range(4):
        soft, hard = pruner(x)
        losses = pruner.losses((soft.permute(0, 2, 3, 1), hard.permute(0, 2, 3, 1)), y,
                               task_loss=lambda s, t: torch.nn.functional.cross_entropy(
                                   s.flatten(0, -2), t.flatten()))
        opt.zero_grad()
        pruner.backward(losses)
        opt.step()
        pruner.mask_step()
    state = pruner.state_dict()
    fresh = s2h_fx.prune_graph(build("cat_split")[0], 0.6, example_inputs=(x,))
    fresh.load_state_dict(state)
    for g, mask in pruner.masks().items():
        other = fresh.masks()[g]
        assert torch.equal(mask.logits, other.logits) and torch.equal(mask.rank, other.rank)
    a, b = fresh.mask_optimizer.state_dict(), pruner.mask_optimizer.state_dict()
    buffers_a, buffers_b = a.pop("buffers"), b.pop("buffers")  # the momentum buffers
    assert a == b and len(buffers_a) == len(buffers_b) == len(pruner.masks())
    assert all(torch.equal(u, v) for u, v in zip(buffers_a, buffers_b))
    assert fresh.widths == pruner.widths
    assert all(np.array_equal(fresh.plan.keep[g], pruner.plan.keep[g]) for g in pruner.widths)
    pruner.eval()
    fresh.eval()
    assert rel_err(fresh(x), pruner(x)) == 0


@pytest.mark.parametrize("start", ["above", "below"])
def test_projection_brings_flops_into_the_band(start: str) -> None:
    model, x = _step_inputs("resnet18")
    model.eval()
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    full = {g.index: g.size for g in pruner.grouping.prunable}
    low = {g.index: g.divisor for g in pruner.grouping.prunable}
    pruner.set_widths(full if start == "above" else low)
    assert pruner.project()
    assert 0.5 - 0.03 <= pruner.flops_ratio() <= 0.5 + 0.005
    assert not pruner.project()  # already inside: nothing changes
    pruner.eval()
    assert rel_err(pruner(x), pruner.export()(x)) < 1e-5


@pytest.mark.parametrize("rule", ["per-cost", "share"])
def test_projection_from_just_above_keeps_all_that_fits(rule: str) -> None:
    """Shrinking by whole divisor steps can land far below the budget; the projection
    then gives back channels: afterwards no group can grow by one step within it.
    (These widths make the per-cost rule's shrinking overshoot; the share rule's
    lands nearer, and the projection must keep all that fits for both.)"""
    model, x = _step_inputs("resnet18")
    model.eval()
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,), one_shot=rule)
    rng = np.random.default_rng(0)  # widths as training may leave them: uneven, above
    above = {g.index: int(rng.integers(g.size // g.divisor // 2, g.size // g.divisor + 1))
             * g.divisor for g in pruner.grouping.prunable}
    pruner.set_widths(above)
    assert pruner.flops_ratio() > 0.505
    scores = {g: s.numpy() for g, s in pruner.importance.scores(pruner.graph_module).items()}
    shrunk = choose_widths(pruner.flops_model, pruner.grouping, scores, 0.5, start=above,
                           rule=rule)
    assert pruner.flops_ratio(shrunk) <= 0.5
    if rule == "per-cost":
        assert pruner.flops_ratio(shrunk) < 0.49  # shrinking alone overshoots here
    assert pruner.project()
    widths = pruner.widths
    assert 0.5 - 0.03 <= pruner.flops_ratio() <= 0.5
    for g in pruner.grouping.prunable:
        if widths[g.index] < g.size:
            grown = {**widths, g.index: widths[g.index] + g.divisor}
            assert pruner.flops_ratio(grown) > 0.5 or pruner.flops(grown) <= pruner.flops(), g
    pruner.eval()
    assert rel_err(pruner(x), pruner.export()(x)) < 1e-5


def test_fit_meets_the_budget_and_exports_the_hard_network() -> None:
    torch.manual_seed(0)
    model, (x,) = build("squeeze_excite")
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(6)]
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    history = pruner.fit(data, epochs=2, val_loader=data[:2], lr=0.01, progress=False)
    assert len(history) == 2 and history[-1].val_hard_acc is not None
    assert all(np.isfinite(v) for v in history[-1].losses.values())
    assert not pruner.training
    assert 0.5 - 0.03 <= pruner.flops_ratio() <= 0.5 + 0.005
    exported = pruner.export()
    assert rel_err(pruner(x), exported(x)) < 1e-5
    from helpers import count_flops

    assert count_flops(exported, (x,)) / pruner.flops_model.total == pytest.approx(
        pruner.flops_ratio(), rel=1e-9)


def test_user_loop_under_autocast() -> None:
    model, (x,) = build("residual")
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.01)
    pruner.train()
    y = torch.randint(0, 4, (x.shape[0],))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pruner(x)
        losses = pruner.losses(out, y)
    pruner.backward(losses)
    opt.step()
    pruner.mask_step()
    assert all(torch.isfinite(p.grad).all() for p in pruner.mask_parameters() if p.grad is not None) \
        or all(p.grad is None for p in pruner.mask_parameters())
    assert all(torch.isfinite(m.logits).all() for m in pruner.masks().values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda() -> None:
    model, (x,) = build("squeeze_excite")
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(4)]
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    pruner.fit(data, epochs=1, lr=0.01, progress=False, device="cuda", amp=True)
    exported = pruner.export()
    xc = x.cuda()
    assert rel_err(pruner(xc), exported(xc)) < 1e-4


def test_hard_network_keeps_its_own_batchnorm_statistics() -> None:
    model, (x,) = build("squeeze_excite")
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    soft_bn = pruner.graph_module.get_submodule("stem.1")
    before_soft = soft_bn.running_mean.clone()
    pruner.train()
    pruner(x)  # both branches in train mode
    assert not torch.equal(soft_bn.running_mean, before_soft)  # the soft branch updated it ...
    hard_mean = pruner.hard_stats.get("stem.1.running_mean").clone()
    used = pruner.recalibrate_bn([(torch.randn(4, 3, 16, 16), None)] * 3, num_batches=3)
    assert used == 3
    after = pruner.hard_stats.get("stem.1.running_mean")
    kept = torch.as_tensor(pruner.plan.keep[0])
    assert not torch.equal(after[kept], hard_mean[kept])  # ... recalibration moved the hard one
    snapshot = soft_bn.running_mean.clone()
    pruner.recalibrate_bn([(torch.randn(4, 3, 16, 16), None)] * 2, num_batches=2)
    assert torch.equal(soft_bn.running_mean, snapshot)  # and never the soft network's
    pruner.eval()
    assert rel_err(pruner(x), pruner.export()(x)) < 1e-5
