"""Budget kinds: FLOPs (a number), parameters ({"params": x}) and latency
({"latency": x, "runtime": R, "batch": B}); their validation, the params budget met
on real networks, and the CLI's --budget-kind / --runtime / --batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import s2h_fx
from s2h_fx import deploy
from s2h_fx.cli import main
from s2h_fx.config import PruneConfig
from s2h_fx.errors import BudgetError, DeployError

from toy_zoo import cbr

TOL = 0.005  # S2HConfig().tolerance: export() never returns a network above budget + it


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SmallCNN(nn.Module):
    """Three conv-bn-relu blocks and a linear head: every conv's weight, every BN's
    affine pair and the head's weight depend on the widths; the head's bias does not."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = cbr(3, 32), cbr(32, 64), cbr(64, 48)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(self.b(self.a(x))).mean((2, 3)))


# ---- configuration -------------------------------------------------------------
def test_budget_kinds_parsed() -> None:
    assert PruneConfig(0.5).kind == "flops"
    c = PruneConfig({"params": 0.4})
    assert (c.kind, c.budget, c.runtime) == ("params", 0.4, None)
    c = PruneConfig({"latency": 0.5, "runtime": "onnxruntime", "batch": 4, "threads": 2})
    assert (c.kind, c.budget, c.runtime, c.batch, c.threads) == (
        "latency", 0.5, "onnxruntime", 4, 2)


@pytest.mark.parametrize("budget, message", [
    ({"paramz": 0.4}, "exactly one kind"),
    ({"params": 0.4, "flops": 0.5}, "exactly one kind"),
    ({"latency": 0.5}, "needs a runtime"),
    ({"latency": 0.5, "runtime": "eager", "batch": 0}, "batch must be a positive"),
    ({"latency": 0.5, "runtime": "eager", "threads": -1}, "threads must be"),
    ({"latency": 0.5, "runtime": "eager", "batchsize": 1}, "unknown key"),
    ({"params": 0.4, "runtime": "eager"}, "unknown key"),
    ({"params": 0.0}, r"fraction of parameters kept"),
    ({"latency": 1.5, "runtime": "eager"}, r"fraction of latency kept"),
    ({"params": "0.4"}, "must be a number"),
])
def test_bad_budget_kinds(budget: dict[str, object], message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        PruneConfig(budget)  # type: ignore[arg-type]


def test_flops_budget_uses_the_flops_model_itself() -> None:
    pruner = s2h_fx.prune_graph(SmallCNN(), 0.5, example_inputs=(torch.randn(1, 3, 16, 16),))
    assert pruner.cost_model is pruner.flops_model
    assert float(pruner.cost_ratio()) == float(pruner.flops_ratio())


# ---- a params budget -------------------------------------------------------------
@pytest.mark.parametrize("make, size", [(SmallCNN, 16), (torchvision.models.resnet18, 32)])
@pytest.mark.parametrize("budget", [0.4, 0.7])
def test_params_budget_met(make: type[nn.Module], size: int, budget: float) -> None:
    torch.manual_seed(0)
    model = make().eval()
    pruner = s2h_fx.prune_graph(model, {"params": budget},
                                example_inputs=(torch.randn(1, 3, size, size),))
    one_shot = float(pruner.cost_ratio())  # the one-shot widths meet it before export()
    assert budget - 0.1 < one_shot <= budget + TOL
    pruned = pruner.export()
    ratio = n_params(pruned) / n_params(model)
    assert ratio <= budget + TOL
    # the one-shot chooser stops as soon as it is under: one divisor step below at most
    assert ratio > budget - 0.1
    # the params model counts exactly what the emitted network holds
    assert float(pruner.cost_ratio()) == pytest.approx(ratio, rel=1e-9)
    # a params budget is not a FLOPs budget: the FLOPs ratio is another number
    assert abs(float(pruner.flops_ratio()) - ratio) > 1e-3


def test_params_model_by_hand() -> None:
    """SmallCNN with a at 8, b at 16, c at 24 (of 32, 64, 48)."""
    model = SmallCNN()
    pruner = s2h_fx.prune_graph(model, {"params": 1.0}, example_inputs=(torch.randn(1, 3, 8, 8),))
    groups = {pruner.grouping.groups[g].size: g for g in pruner.widths}
    widths = {groups[32]: 8, groups[64]: 16, groups[48]: 24}
    # conv weights (no bias), BN weight + bias, head weight + bias
    expected = (3 * 8 * 9 + 2 * 8) + (8 * 16 * 9 + 2 * 16) + (16 * 24 * 9 + 2 * 24) + 24 * 10 + 10
    assert float(pruner.cost_model(widths)) == pytest.approx(expected)
    assert pruner.cost_model.total == n_params(model)


def test_resource_loss_reaches_masks_under_params_budget() -> None:
    pruner = s2h_fx.prune_graph(SmallCNN(), {"params": 0.4},
                                example_inputs=(torch.randn(1, 3, 16, 16),))
    # the resource loss counts parameters (at the one-shot widths, not the FLOPs ratio)
    _, at_one_shot = pruner.resource_loss()
    assert float(at_one_shot.detach()) == pytest.approx(float(pruner.cost_ratio()))
    assert abs(float(at_one_shot.detach()) - float(pruner.flops_ratio())) > 1e-3
    pruner.reset_masks()  # full width: the resource loss is far from zero
    pruner.train()
    loss, ratio = pruner.resource_loss()
    assert float(ratio.detach()) == pytest.approx(1.0)
    assert float(loss.detach()) == pytest.approx((1.0 - 0.4) ** 2)
    loss.backward()
    grads = [p.grad for p in pruner.mask_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads)  # type: ignore[union-attr]


# ---- the command line --------------------------------------------------------------
def _export(tmp_path: Path, *extra: str) -> list[str]:
    return ["export", "resnet18", "--input-size", "3,32,32", "--budget", "0.5",
            "-o", str(tmp_path / "out.pt2"), *extra]


@pytest.mark.parametrize("extra, message", [
    (("--budget-kind", "speed"), "exactly one kind"),
    (("--budget-kind", "latency"), "needs a runtime"),
    (("--budget-kind", "latency", "--runtime", "nope"), "unknown runtime 'nope'"),
    (("--budget-kind", "params", "--runtime", "eager"), "unknown key"),
])
def test_cli_bad_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        extra: tuple[str, ...], message: str) -> None:
    assert main(_export(tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.pt2").exists()


def test_cli_runtime_not_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise DeployError("runtime 'onnxruntime' needs onnxruntime (No module named "
                          "'onnxruntime'): pip install 's2h-fx[onnx]'")

    monkeypatch.setattr(deploy, "_import_onnxruntime", missing)
    code = main(_export(tmp_path, "--budget-kind", "latency", "--runtime", "onnxruntime"))
    assert code == 2
    assert "pip install 's2h-fx[onnx]'" in capsys.readouterr().err


def test_cli_prune_bad_budget_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prune", "resnet18", "--budget", "0.5", "--budget-kind", "latency",
                 "--fashion-mnist", str(tmp_path), "-o", str(tmp_path / "out.pt2")])
    assert code == 2
    assert "needs a runtime" in capsys.readouterr().err


def test_cli_export_params_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_export(tmp_path, "--budget-kind", "params")) == 0
    out = capsys.readouterr().out
    ratio = next(float(line.split()[-1]) for line in out.splitlines()
                 if line.startswith("M params"))
    assert ratio <= 0.5 + TOL


def test_latency_budget_on_an_unknown_runtime() -> None:
    with pytest.raises(DeployError, match="unknown runtime 'nope'"):
        s2h_fx.prune_graph(SmallCNN(), {"latency": 0.5, "runtime": "nope"},
                           example_inputs=(torch.randn(1, 3, 8, 8),))


class Scaled(SmallCNN):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * scale


def test_latency_budget_needs_one_tensor_input() -> None:
    with pytest.raises(s2h_fx.InputError, match="one example input tensor"):
        s2h_fx.prune_graph(Scaled(), {"latency": 0.5, "runtime": "eager"},
                           example_inputs=(torch.randn(1, 3, 8, 8), torch.ones(1)))
