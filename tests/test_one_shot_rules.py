"""The one-shot rules (PruneConfig.one_shot): per-cost drops the least importance per
unit of cost saved, share the least importance against the rest of its own group."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import s2h_fx
from s2h_fx.config import PruneConfig
from s2h_fx.one_shot import step_worth

from helpers import build, prunable_group, rel_err


class TwoGroups(nn.Module):
    """Group a (conv a's 16 outputs) reads 64 channels: each of its channels costs
    64 + 16 MACs a pixel; group b (conv b's 16 outputs) costs 16 + 10."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(64, 16, 1, bias=False)
        self.b = nn.Conv2d(16, 16, 1, bias=False)
        self.head = nn.Conv2d(16, 10, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
        return y.mean(dim=(2, 3))


def _two_groups() -> tuple[nn.Module, tuple[torch.Tensor]]:
    model = TwoGroups().eval()
    with torch.no_grad():
        model.a.weight.fill_(0.1)  # a: every channel alike
        model.b.weight.fill_(0.1)
        model.b.weight[8:] = 0.05  # b: the second half half as important as the first
        model.head.weight.normal_()
    return model, (torch.randn(2, 64, 8, 8),)


@pytest.mark.parametrize("rule, dropped", [("per-cost", "a"), ("share", "b")])
def test_rules_disagree_as_documented(rule: str, dropped: str) -> None:
    """One step of 8 channels meets a budget of 0.9 from either group. Per-cost: a step
    of a saves 8 x 80 MACs for importance 8 (b: 8 x 26 for 8 x 2/3), so a goes. Share:
    a step of a drops half of a's importance, b's weaker half a third of b's: b goes,
    whatever a's channels cost."""
    model, x = _two_groups()
    pruner = s2h_fx.prune_graph(model, 0.9, x, divisor=8, one_shot=rule)
    a, b = prunable_group(pruner, "a:out"), prunable_group(pruner, "b:out")
    widths = {"a": pruner.widths[a.index], "b": pruner.widths[b.index]}
    assert widths == {"a": 16, "b": 16, dropped: 8}
    assert pruner.flops_ratio() <= 0.9
    if dropped == "b":  # the important half of b is what stays
        assert sorted(pruner.plan.keep[b.index].tolist()) == list(range(8))
    pruned = pruner.export()
    assert rel_err(pruned(*x), pruner.eval()(*x)) < 1e-6


@pytest.mark.parametrize("name, rule", [("flatten_head", "share"), ("shuffle", "share"),
                                        ("resnet18", "share"), ("resnet18", "per-cost")])
def test_one_shot_gives_back_what_still_fits(name: str, rule: str) -> None:
    """After the greedy shrinks, no group can grow by one step within the budget. The
    last steps of the share rule overshoot on these (shrinking alone left flatten_head
    at 0.202 and shuffle at 0.192 of the FLOPs for a budget of 0.3, resnet18 with 7
    groups that could grow): the channels that still fit are given back."""
    model, inputs = build(name)
    pruner = s2h_fx.prune_graph(model.eval(), 0.3, example_inputs=inputs, one_shot=rule)
    assert pruner.flops_ratio() <= 0.3
    widths = pruner.widths
    for g in pruner.grouping.prunable:
        if widths[g.index] < g.size:
            grown = {**widths, g.index: widths[g.index] + g.divisor}
            assert pruner.flops_ratio(grown) > 0.3, (g.index, widths)


def test_share_ignores_a_linear_cost() -> None:
    """For a cost linear in the width (carried / saved = kept / step) a share step is
    worth its importance over its group's kept mean, whatever the cost's scale."""
    for cost in (10.0, 1e6):
        carried, saved = cost * 16, cost * 4  # 16 channels kept, a step of 4
        assert step_worth("share", 2.0, 8.0, carried, saved) == pytest.approx(1.0)
    assert step_worth("per-cost", 2.0, 8.0, 160.0, 40.0) == pytest.approx(0.05)


def test_unknown_rule_is_a_clear_error() -> None:
    model, x = _two_groups()
    with pytest.raises(ValueError, match="one_shot must be one of 'per-cost', 'share'"):
        PruneConfig(0.5, one_shot="uniform")
    with pytest.raises(ValueError, match="one_shot must be one of"):
        s2h_fx.prune_graph(model, 0.5, x, one_shot="uniform")
    with pytest.raises(ValueError, match="one-shot rule must be one of"):
        step_worth("uniform", 1.0, 1.0, 1.0, 1.0)


def test_cli_one_shot_option() -> None:
    """`--one-shot` parses on export (inspect defaults to per-cost) and a bad value
    exits 2 naming the choices."""
    bad = subprocess.run([sys.executable, "-m", "s2h_fx", "export", "resnet18", "--budget",
                          "0.5", "--one-shot", "uniform", "-o", "x.pt2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "invalid choice: 'uniform'" in bad.stderr and "per-cost" in bad.stderr
    from s2h_fx import cli

    args = cli._build_parser().parse_args(["export", "resnet18", "--budget", "0.5",
                                           "--one-shot", "share", "-o", "x.pt2"])
    assert args.one_shot == "share"
    assert cli._build_parser().parse_args(["inspect", "resnet18"]).one_shot == "per-cost"


def test_cli_export_emits_the_rules_widths(tmp_path) -> None:  # noqa: ANN001
    """`export --one-shot RULE` writes the network prune_graph(..., one_shot=RULE) emits
    from the same seeded weights, and the two rules' networks differ."""
    import torchvision

    from s2h_fx import cli
    from s2h_fx.deploy import load_program

    def widths(module: nn.Module) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for k, t in module.state_dict().items()
                if k.endswith("weight") and t.dim() == 4]

    x = torch.randn(1, 3, 32, 32)
    written = {}
    for rule in ("per-cost", "share"):
        path = tmp_path / f"{rule}.pt2"
        assert cli.main(["export", "resnet18", "--budget", "0.4", "--input-size", "3,32,32",
                         "--one-shot", rule, "-o", str(path)]) == 0
        written[rule] = widths(load_program(path))
        torch.manual_seed(0)  # the CLI's default --seed
        model = torchvision.models.resnet18()
        assert written[rule] == widths(s2h_fx.prune_graph(model, 0.4, (x,),
                                                          one_shot=rule).export())
    assert written["per-cost"] != written["share"]
