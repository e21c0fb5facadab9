"""The S2H training options of S2HConfig (off by default): mask momentum and
Nesterov, a mask step size that follows the weights' schedule, and settling epochs
at the end of ``fit`` with the architecture fixed."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import s2h_fx
from s2h_fx.config import S2HConfig
from s2h_fx.mask_optim import MaskOptimizer
from s2h_fx.masks import ChannelMask

BATCHES, BATCH = 4, 8


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)).mean((2, 3)))


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * BATCH, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def pruner(config: S2HConfig | None = None, budget: float = 0.4) -> s2h_fx.Pruner:
    torch.manual_seed(0)
    p = s2h_fx.prune_graph(Tiny(), budget, example_inputs=(torch.randn(1, 3, 8, 8),),
                           divisor=4, config=config)
    p.mask_optimizer.configure(p.s2h)  # the pruner builds it without the momentum options
    return p


def legacy_step(self: MaskOptimizer, task: list[torch.Tensor], resource: list[torch.Tensor],
                gap: float) -> None:
    """The mask step as it was before the options (the reference of 'today')."""
    with torch.no_grad():
        gt = torch.cat([t.flatten() for t in task])
        gr = torch.cat([r.flatten() for r in resource])
        if not (torch.isfinite(gt).all() and torch.isfinite(gr).all()):
            return
        nt, nr = gt.norm(), gr.norm()
        balance = min(abs(gap) / self.tolerance, self.cap)
        self.last_balance = balance
        direction = torch.zeros_like(gt)
        if nt > 0:
            direction += gt / nt
        if nr > 0:
            direction += balance * gr / nr
        offset = 0
        for mask in self.masks:
            k = mask.logits.numel()
            mask.logits.sub_(self.lr * direction[offset : offset + k].to(mask.logits.dtype))
            mask.logits.sub_(mask.logits.mean())
            offset += k
        self.steps += 1


def snapshot(p: s2h_fx.Pruner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in p.state_dict().items()
            if isinstance(v, torch.Tensor)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- defaults -----------------------------------------------------------------------
OFF = dict(mask_lr=0.05, mask_momentum=0.0, mask_nesterov=False,
           mask_lr_follows_schedule=False, settle_epochs=0, descent_epochs=0.0)


def test_default_phases_are_shares_of_the_epochs() -> None:
    c = S2HConfig()
    assert c.phases(10) == (3.0, 6)  # descent over 30 % of the epochs, settling 60 %
    assert c.phases(30) == (9.0, 18)
    assert c.phases(1) == (0.3, 0)  # one epoch: all of it learns the architecture
    # the default is the 3-epoch descent that benchmarks/quality.py measured at E1 = 10
    assert c.phases(10) == S2HConfig(descent_epochs=3).phases(10)
    assert c.phases(2) == (0.6, 1)
    assert S2HConfig(settle_epochs=2, descent_epochs=0.0).phases(10) == (0.0, 2)
    assert (c.mask_momentum, c.mask_nesterov, c.mask_lr_follows_schedule, c.settle_mode) == (
        0.9, True, True, "hard")


def test_options_off_fit_is_bit_identical_to_the_mask_step_before_the_options(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option off: the mask step is the one from before the options existed."""
    a = pruner(S2HConfig(**OFF))
    a.fit(data(), 1, progress=False, finish=False)
    with monkeypatch.context() as m:
        m.setattr(MaskOptimizer, "step", legacy_step)
        ref = pruner(S2HConfig(**OFF))
        ref.fit(data(), 1, progress=False, finish=False)
    assert a.mask_optimizer.steps == BATCHES and a.mask_optimizer.buffers == []
    assert same(snapshot(a), snapshot(ref))
    # the masks did move (so equality above says something)
    assert not torch.equal(a.mask_parameters()[0], pruner().mask_parameters()[0])


# ---- momentum -----------------------------------------------------------------------
def _optimizer(momentum: float, nesterov: bool) -> MaskOptimizer:
    masks = [ChannelMask(0, 16, divisor=4), ChannelMask(1, 8, divisor=4)]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in masks:
            m.logits.copy_(torch.randn(m.logits.shape, generator=gen))
            m.logits.sub_(m.logits.mean())  # centred, as after any step
    return MaskOptimizer(masks, lr=0.1, tolerance=0.005, cap=10.0, momentum=momentum,
                         nesterov=nesterov)


@pytest.mark.parametrize(("nesterov", "ratio"), [(False, 1.9), (True, (1 + 0.9 + 0.81) / 1.9)])
def test_momentum_with_a_constant_gradient(nesterov: bool, ratio: float) -> None:
    # the logits after a step are l - lr s - mean(l - lr s) = l - lr (s - mean s) for a
    # centred l: a step moves them by -lr times the centred step direction s. With a
    # constant direction d: plain momentum s1 = d, s2 = 0.9 d + d = 1.9 d; Nesterov
    # s1 = d + 0.9 d = 1.9 d, s2 = d + 0.9 (1.9 d) = 2.71 d.
    opt = _optimizer(0.9, nesterov)
    gen = torch.Generator().manual_seed(4)
    task = [torch.randn(m.logits.shape, generator=gen) for m in opt.masks]
    resource = [torch.randn(m.logits.shape, generator=gen) for m in opt.masks]
    before = [m.logits.detach().clone() for m in opt.masks]
    opt.step(task, resource, gap=0.01)
    mid = [m.logits.detach().clone() for m in opt.masks]
    opt.step(task, resource, gap=0.01)
    for b, m, mk in zip(before, mid, opt.masks):
        first, second = m - b, mk.logits.detach() - m
        assert first.abs().max() > 1e-3
        torch.testing.assert_close(second, ratio * first, rtol=1e-5, atol=1e-6)


def test_no_momentum_steps_are_equal_with_a_constant_gradient() -> None:
    opt = _optimizer(0.0, False)
    task = [torch.ones(m.logits.shape) * torch.arange(m.logits.numel()) for m in opt.masks]
    resource = [torch.zeros(m.logits.shape) for m in opt.masks]
    l0 = opt.masks[0].logits.detach().clone()
    opt.step(task, resource, gap=0.0)
    l1 = opt.masks[0].logits.detach().clone()
    opt.step(task, resource, gap=0.0)
    torch.testing.assert_close(opt.masks[0].logits.detach() - l1, l1 - l0)


def _s2h_steps(p: s2h_fx.Pruner, batches: list[Any]) -> None:
    opt = torch.optim.SGD(p.weight_parameters(), lr=0.01)
    p.train()
    for x, y in batches:
        opt.zero_grad()
        losses = p.losses(p(x), y)
        assert p.backward(losses)
        opt.step()
        p.mask_step()


def test_momentum_state_round_trips_through_the_pruner_state_dict() -> None:
    cfg = S2HConfig(mask_momentum=0.9, mask_nesterov=True, fix_importance=True)
    batches = data()
    a = pruner(cfg)
    a.reset_masks()
    _s2h_steps(a, batches[:3])
    assert len(a.mask_optimizer.buffers) == len(a.mask_parameters())
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = pruner(cfg)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for x, y in zip(a.mask_optimizer.buffers, b.mask_optimizer.buffers):
        assert torch.equal(x, y)
    assert same(snapshot(a), snapshot(b))
    _s2h_steps(a, batches[3:])
    _s2h_steps(b, batches[3:])
    assert same(snapshot(a), snapshot(b))
    # without the buffers the next step differs: the round trip carried them
    c = pruner(cfg)
    buf.seek(0)
    c.load_state_dict(torch.load(buf, weights_only=True))
    c.mask_optimizer.buffers = []
    _s2h_steps(c, batches[3:])
    assert not torch.equal(c.mask_parameters()[0], a.mask_parameters()[0])


def test_a_state_without_the_momentum_keys_loads_as_no_momentum() -> None:
    opt = _optimizer(0.9, False)
    old = {"lr": 0.2, "tolerance": 0.01, "cap": 5.0, "steps": 7, "last_balance": 1.0}
    opt.load_state_dict(old)
    assert (opt.momentum, opt.nesterov, opt.lr_scale, opt.buffers) == (0.0, False, 1.0, [])
    assert opt.steps == 7 and opt.lr == 0.2


# ---- mask lr following the schedule ---------------------------------------------------
def test_lr_scale_scales_the_step() -> None:
    a, b = _optimizer(0.0, False), _optimizer(0.0, False)
    b.lr_scale = 0.25
    grads = [torch.linspace(-1, 1, m.logits.numel()) for m in a.masks]
    la = [m.logits.detach().clone() for m in a.masks]
    a.step(grads, grads, gap=0.003)
    b.step(grads, grads, gap=0.003)
    for l0, ma, mb in zip(la, a.masks, b.masks):
        torch.testing.assert_close(mb.logits.detach() - l0, 0.25 * (ma.logits.detach() - l0))


@pytest.mark.parametrize("follows", [False, True])
def test_fit_sets_the_mask_step_size_from_the_cosine_schedule(
        follows: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    epochs = 2
    p = pruner(S2HConfig(mask_lr_follows_schedule=follows, settle_epochs=0, mask_momentum=0.0,
                         mask_nesterov=False))
    scales: list[float] = []
    changes: list[float] = []
    step = MaskOptimizer.step

    def spy(self: MaskOptimizer, *args: Any) -> None:
        scales.append(self.lr_scale)
        before = torch.cat([m.logits.detach().clone() for m in self.masks])
        step(self, *args)
        changes.append(float((torch.cat([m.logits.detach() for m in self.masks])
                              - before).norm()))

    monkeypatch.setattr(MaskOptimizer, "step", spy)
    p.fit(data(), epochs, lr=0.05, progress=False, finish=False)
    total = epochs * BATCHES
    # the weights' lr at optimiser step t is 0.05 (1 + cos(pi t / T)) / 2
    expected = [0.5 * (1 + math.cos(math.pi * t / total)) if follows else 1.0
                for t in range(total)]
    assert scales == pytest.approx(expected, rel=1e-12)
    if follows:  # the late steps are much shorter than the early ones
        assert max(changes[-2:]) < 0.3 * min(changes[:2])


# ---- settling -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["distill", "hard"])
def test_settle_epochs_fix_the_architecture_while_the_weights_train(mode: str) -> None:
    epochs, settle = 3, 2
    p = pruner(S2HConfig(settle_epochs=settle, settle_mode=mode))
    seen: list[dict[str, Any]] = []

    def record(metrics: dict[str, float]) -> None:
        seen.append({"logits": [u.detach().clone() for u in p.mask_parameters()],
                     "ranks": [m.rank.clone() for m in p.masks().values()],
                     "widths": p.widths, "flops": metrics["flops"],
                     "weights": [w.detach().clone() for w in p.weight_parameters()]})

    history = p.fit(data(), epochs, progress=False, finish=False, on_step=record)
    assert len(seen) == epochs * BATCHES and len(history) == epochs
    learn = seen[: (epochs - settle) * BATCHES]
    settling = seen[(epochs - settle) * BATCHES :]  # (projected into the band first)
    # the architecture moved while it was learnt
    assert any(not torch.equal(a, b) for a, b in zip(learn[0]["logits"], learn[-1]["logits"]))
    first = settling[0]
    for s in settling[1:]:
        assert all(torch.equal(a, b) for a, b in zip(s["logits"], first["logits"]))
        assert all(torch.equal(a, b) for a, b in zip(s["ranks"], first["ranks"]))
        assert s["widths"] == first["widths"] and s["flops"] == first["flops"]
    for a, b in zip(settling, settling[1:]):  # every settling step trains the weights
        assert any(not torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert p.mask_optimizer.steps == (epochs - settle) * BATCHES
    assert all(u.grad is None for u in p.mask_parameters())
    assert history[-1].flops_ratio == first["flops"]


@pytest.mark.parametrize("mode", ["distill", "hard"])
def test_settling_starts_from_the_projected_architecture(mode: str) -> None:
    """The search ends above the budget (forced to full width at its last step): the
    settling epochs train an architecture within the budget band, and finishing has
    nothing left to project, so the exported network is the one they trained."""
    epochs, settle, budget = 2, 1, 0.4
    p = pruner(S2HConfig(settle_epochs=settle, settle_mode=mode), budget=budget)
    flops: list[float] = []

    def record(metrics: dict[str, float]) -> None:
        flops.append(metrics["flops"])
        if len(flops) == (epochs - settle) * BATCHES:
            p.set_widths({})  # every group at full width: far above the budget

    p.fit(data(), epochs, progress=False, finish=False, on_step=record)
    settling = flops[(epochs - settle) * BATCHES:]
    tol = p.s2h.tolerance
    # within the budget (Tiny's groups step in 4 channels: the band's floor may be
    # out of reach, the projection then stops at the widest fit under the budget)
    assert all(f <= budget + tol for f in settling) and len(set(settling)) == 1, settling
    widths = p.widths
    from s2h_fx.trainer import finish_training
    assert finish_training(p, data()) is False and p.widths == widths


def test_hard_settling_trains_the_hard_network_alone() -> None:
    """settle_mode="hard": the soft branch does not run (its BatchNorm statistics stay),
    the hard network's own statistics and the weights it uses move, the weights it
    does not use get no gradient, and the hard loss falls."""
    epochs, settle = 3, 2
    p = pruner(S2HConfig(settle_epochs=settle, settle_mode="hard"))
    soft_calls = 0
    inner = p.soft_forward

    def counting(*args: Any) -> Any:
        nonlocal soft_calls
        soft_calls += 1
        return inner(*args)

    p.soft_forward = counting  # type: ignore[method-assign]
    seen: list[dict[str, Any]] = []

    def record(metrics: dict[str, float]) -> None:
        seen.append({"soft_calls": soft_calls, "loss": metrics["task"],
                     "soft_bn": p.graph_module.get_submodule("a.1").running_mean.clone(),
                     "hard_bn": [b.clone() for b in p.hard_stats.buffers()]})

    history = p.fit(data() * 4, epochs, progress=False, finish=False, on_step=record)
    n_learn = (epochs - settle) * BATCHES * 4
    settling = seen[n_learn - 1:]
    assert all(s["soft_calls"] == settling[0]["soft_calls"] for s in settling)
    assert all(torch.equal(s["soft_bn"], settling[0]["soft_bn"]) for s in settling)
    assert any(not torch.equal(a, b) for a, b in zip(settling[0]["hard_bn"],
                                                     settling[-1]["hard_bn"]))
    losses = [s["loss"] for s in settling[1:]]
    assert sum(losses[-4:]) < sum(losses[:4])
    assert math.isnan(history[-1].soft_acc) and 0 <= history[-1].hard_acc <= 1


# ---- gradual descent --------------------------------------------------------------------
def test_descent_moves_the_target_from_full_to_the_budget() -> None:
    """descent_epochs=1 of 3: the first step aims at the full network, the target falls
    monotonically to the budget by the end of the first epoch and stays there; the
    resource loss measures the distance to the target, not to the budget."""
    budget = 0.4
    p = pruner(S2HConfig(descent_epochs=1.0, settle_epochs=0), budget=budget)
    targets: list[float] = []
    resources: list[float] = []

    def record(metrics: dict[str, float]) -> None:
        targets.append(metrics["target"])
        resources.append(metrics["resource"])

    p.fit(data(), 3, progress=False, finish=False, on_step=record)
    assert targets[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(targets, targets[1:]))
    assert targets[1] < 1.0 and targets[BATCHES - 1] > budget
    assert targets[BATCHES:] == [pytest.approx(budget)] * (2 * BATCHES)
    assert resources[0] < (1.0 - budget) ** 2 / 2  # at full width, next to the target 1.0
    assert p.target_ratio == budget  # fit leaves the budget as the target


def test_geometric_descent_cuts_the_cost_in_equal_ratios() -> None:
    """descent_shape="geometric": the same half cosine as the linear descent, in
    log(target): at every step log(target) / log(budget) is the share of the descent
    done, so the target never lies above the linear one and both end at the budget."""
    budget = 0.15

    def targets(shape: str) -> list[float]:
        got: list[float] = []
        p = pruner(S2HConfig(descent_epochs=1.0, settle_epochs=0, descent_shape=shape),
                   budget=budget)
        p.fit(data(), 2, progress=False, finish=False,
              on_step=lambda m: got.append(m["target"]))
        return got

    lin, geo = targets("linear"), targets("geometric")
    assert len(lin) == len(geo) == 2 * BATCHES
    for a, g in zip(lin, geo):
        done = 1.0 - (a - budget) / (1.0 - budget)  # share of the descent done
        assert math.log(g) / math.log(budget) == pytest.approx(done, abs=1e-9)
        assert budget - 1e-12 <= g <= a + 1e-12
    assert geo[0] == pytest.approx(1.0) and geo[BATCHES:] == [pytest.approx(budget)] * BATCHES
    assert any(g < a - 0.05 for a, g in zip(lin, geo))  # the shapes differ mid-descent


def test_an_interrupted_fit_leaves_the_budget_as_the_target() -> None:
    p = pruner(S2HConfig(descent_epochs=2.0, settle_epochs=0), budget=0.4)

    def stop(metrics: dict[str, float]) -> None:
        assert metrics["target"] > 0.4  # mid-descent
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        p.fit(data(), 3, progress=False, finish=False, on_step=stop)
    assert p.target_ratio == 0.4


def test_target_ratio_is_checked_and_reset() -> None:
    p = pruner(budget=0.4)
    assert p.target_ratio == 0.4
    for bad in (0.3, 1.1):
        with pytest.raises(ValueError, match="target ratio"):
            p.set_target_ratio(bad)
    p.set_target_ratio(0.7)
    r_far = float(p.resource_loss()[0].detach())
    p.set_target_ratio(None)
    assert p.target_ratio == 0.4 and float(p.resource_loss()[0].detach()) != r_far


def test_settle_epochs_must_leave_epochs_to_learn() -> None:
    p = pruner(S2HConfig(settle_epochs=2))
    with pytest.raises(ValueError, match="settle_epochs"):
        p.fit(data(), 2, progress=False)


def test_settling_run_resumes_exactly(tmp_path: Path) -> None:
    cfg = S2HConfig(settle_epochs=1, mask_momentum=0.9, mask_nesterov=True,
                    mask_lr_follows_schedule=True)
    whole = pruner(cfg)
    whole.fit(data(), 2, progress=False, finish=False)

    class Stop(Exception):
        pass

    count = 0

    def stop(_: dict[str, float]) -> None:
        nonlocal count
        count += 1
        if count == BATCHES + 2:  # 2 batches into the settling epoch
            raise Stop

    first = pruner(cfg)
    with pytest.raises(Stop):
        first.fit(data(), 2, progress=False, finish=False, checkpoint=tmp_path,
                  checkpoint_every=2, on_step=stop)
    resumed = pruner(cfg)
    resumed.fit(data(), 2, progress=False, finish=False, checkpoint=tmp_path, resume=True)
    assert same(snapshot(whole), snapshot(resumed))
    assert resumed.mask_optimizer.steps == BATCHES


# ---- validation -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"mask_momentum": -0.1}, {"mask_momentum": 1.0}, {"mask_momentum": float("nan")},
    {"mask_momentum": "0.9"}, {"mask_momentum": True},
    {"mask_nesterov": True, "mask_momentum": 0.0}, {"mask_nesterov": 1, "mask_momentum": 0.9},
    {"mask_lr_follows_schedule": "yes"},
    {"settle_epochs": -1}, {"settle_epochs": 1.5}, {"settle_epochs": True},
    {"settle_mode": "soft"}, {"settle_mode": None},
    {"descent_epochs": -1}, {"descent_epochs": float("nan")}, {"descent_epochs": "2"},
    {"descent_shape": "cosine"}, {"descent_shape": None},
])
def test_bad_option_values_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="S2HConfig"):
        S2HConfig(**kwargs)


def test_good_option_values() -> None:
    c = S2HConfig(mask_momentum=0.9, mask_nesterov=True, mask_lr_follows_schedule=True,
                  settle_epochs=3)
    opt = MaskOptimizer.from_config([ChannelMask(0, 8, divisor=4)], c)
    assert (opt.momentum, opt.nesterov, opt.lr) == (0.9, True, c.mask_lr)
