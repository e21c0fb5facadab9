"""One state of the widths across the life cycle (prepare -> train -> export), the
budget guard of export(), the non-finite policy of backward(), and oracles that
leave no trace."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import s2h_fx
from s2h_fx.errors import InvariantError, NonFiniteError

from helpers import build, count_flops, rel_err


def _resnet18() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)


def _bn_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in module.named_buffers() if "running" in n]


def test_train_mode_forward_keeps_the_one_shot_widths() -> None:
    model, x = _resnet18()
    assert model.training  # torchvision builds models in train mode; the pruner keeps it
    dense = count_flops(model.eval(), (x,))
    model.train()
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    assert pruner.training
    before = pruner.widths
    assert 0.47 <= float(pruner.flops_ratio()) <= 0.505
    with torch.no_grad():
        pruner(x)  # a train-mode forward reads the widths from the masks: the same ones
    assert pruner.widths == before
    pruned = pruner.export()
    assert count_flops(pruned, (x,)) / dense <= 0.505  # not the full network
    pruner.eval()
    with torch.no_grad():
        assert rel_err(pruner(x), pruned(x)) < 1e-5


def test_every_view_follows_the_masks() -> None:
    model, (x,) = build("residual")
    pruner = s2h_fx.prune_graph(model.eval(), 0.5, example_inputs=(x,))
    pruner.eval()
    g, mask = next(iter(pruner.masks().items()))
    mask.reset_full_width()  # move one mask by hand: nothing else is told
    size = pruner.grouping.groups[g].size
    assert pruner.widths[g] == size
    assert pruner.plan.widths[g] == size
    assert len(pruner.plan.keep[g]) == size
    exported = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(pruner(x), exported(x)) < 1e-5
        assert rel_err(pruner.masked_forward(x), exported(x)) < 1e-4
    assert pruner.flops() == pytest.approx(count_flops(exported, (x,)), rel=1e-9)
    builds = pruner.state.plan_builds
    for _ in range(3):
        pruner.plan  # noqa: B018  (unchanged masks: the cached plan)
    assert pruner.state.plan_builds == builds


def test_export_projects_a_network_above_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    model, x = _resnet18()
    model.eval()
    dense = count_flops(model, (x,))
    pruner = s2h_fx.prune_graph(model, 0.4, example_inputs=(x,))
    pruner.set_widths({g.index: g.size for g in pruner.grouping.prunable})
    full = pruner.export(enforce_budget=False)  # asked for: the network as it is
    assert count_flops(full, (x,)) == pytest.approx(dense)
    with caplog.at_level(logging.WARNING):
        pruned = pruner.export()
    assert "projecting" in caplog.text
    ratio = count_flops(pruned, (x,)) / dense
    assert 0.37 <= ratio <= 0.4 + pruner.s2h.tolerance
    assert float(pruner.flops_ratio()) == pytest.approx(ratio)  # the pruner moved with it
    pruner.eval()
    with torch.no_grad():
        assert rel_err(pruner(x), pruned(x)) < 1e-5


def test_masked_forward_leaves_running_statistics_alone() -> None:
    model, (x,) = build("residual")
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    pruner.train()
    before = _bn_buffers(pruner)
    assert before, "the toy has BatchNorm"
    with torch.no_grad():
        pruner.masked_forward(x)
    for a, b in zip(before, _bn_buffers(pruner)):
        assert torch.equal(a, b)


def _step(pruner: s2h_fx.Pruner, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> bool:
    pruner.train()
    losses = pruner.losses(pruner(x), y)
    opt.zero_grad()
    ok = pruner.backward(losses)
    opt.step()
    pruner.mask_step()
    return ok


def test_a_non_finite_step_is_skipped_without_a_trace() -> None:
    model, (x,) = build("residual")
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    pruner.reset_masks()
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    y = torch.zeros(x.shape[0], dtype=torch.long)
    assert _step(pruner, opt, x, y)  # a finite step first: momentum buffers exist
    weights = [p.detach().clone() for p in pruner.weight_parameters()]
    momenta = [opt.state[p]["momentum_buffer"].clone() for p in pruner.weight_parameters()]
    logits = [p.detach().clone() for p in pruner.mask_parameters()]
    stats = _bn_buffers(pruner)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert not _step(pruner, opt, bad, y)
    assert pruner.skipped_steps == 1
    for p, w, m in zip(pruner.weight_parameters(), weights, momenta):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], m)
    for p, u in zip(pruner.mask_parameters(), logits):
        assert torch.equal(p, u)
    for a, b in zip(stats, _bn_buffers(pruner)):
        assert torch.equal(a, b)  # soft and hard running statistics put back
    assert _step(pruner, opt, x, y)  # and training goes on
    assert any(not torch.equal(p, w) for p, w in zip(pruner.weight_parameters(), weights))
    pruner.eval()
    with torch.no_grad():
        assert torch.isfinite(pruner.export()(x)).all()


def test_export_refuses_non_finite_weights() -> None:
    model, (x,) = build("residual")
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    with torch.no_grad():
        pruner.weight_parameters()[0].fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        pruner.export()


class MaskedTokens(torch.nn.Module):
    """Holds an additive causal mask (-inf above the diagonal) as a buffer, as models
    built with ``nn.Transformer.generate_square_subsequent_mask`` do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.norm = torch.nn.BatchNorm1d(16)
        self.register_buffer("mask", torch.triu(torch.full((5, 5), float("-inf")), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # (B, 5, 16)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        attn = (h @ h.transpose(1, 2) + self.mask).softmax(-1)
        return self.b(attn @ h).mean(1)


def test_export_keeps_a_constant_minus_inf_mask_but_not_inf_statistics_or_nan() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    pruner = s2h_fx.prune_graph(MaskedTokens().eval(), 0.6, example_inputs=(x,))
    pruned = pruner.eval().export()  # a -inf constant is the model, not a divergence
    with torch.no_grad():
        assert torch.isfinite(pruned(x)).all()
    with torch.no_grad():  # a running statistic is written by training: inf is a fault
        for t in pruner.hard_stats.buffers():  # the hard network's own statistics
            if t.is_floating_point():
                t.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="norm.running_"):
        pruner.export()
    pruner = s2h_fx.prune_graph(MaskedTokens().eval(), 0.6, example_inputs=(x,))
    with torch.no_grad():  # NaN in any buffer is never meant
        pruner.graph_module.mask[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="mask"):
        pruner.export()


def test_loaded_state_is_checked_against_the_masks() -> None:
    model, (x,) = build("cat_split")
    first = s2h_fx.prune_graph(model, 0.5, example_inputs=(x,))
    second = s2h_fx.prune_graph(model, 0.9, example_inputs=(x,))
    assert first.widths != second.widths
    second.load_state_dict(first.state_dict())
    assert second.widths == first.widths
    assert all(np.array_equal(first.plan.keep[g], second.plan.keep[g]) for g in first.widths)
    state = first.state_dict()
    extra = state["_extra_state"]
    g = next(iter(extra["widths"]))
    extra["widths"] = {**extra["widths"], g: extra["widths"][g] + 1}
    with pytest.raises(InvariantError, match="do not give the saved widths"):
        second.load_state_dict(state)


def test_export_refuses_inf_in_any_norms_running_statistics() -> None:
    """InstanceNorm with track_running_stats writes running statistics as BatchNorm does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.InstanceNorm2d(
        16, affine=True, track_running_stats=True), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(model.eval(), 0.6, example_inputs=(x,))
    pruner.export()  # finite: fine
    with torch.no_grad():
        pruner.graph_module.get_submodule("1").running_var.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="running_var"):
        pruner.export()
