"""einsum written as a batched matrix product is rewritten into torch.matmul before the
analysis (s2h_fx.einsum), so attention written with einsum (torchvision's MaxViT)
prunes as attention written with matmul does; other einsums stay, with no rule."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import s2h_fx
from s2h_fx.einsum import _form

from helpers import count_flops, random_keep, rel_err

TOL = 1e-5


@pytest.mark.parametrize(("equation", "form"), [
    ("bhid,bhjd->bhij", "nt"), ("B G H I D, B G H J D -> B G H I J", "nt"),
    ("bhij,bhjd->bhid", "nn"), ("id,jd->ij", "nt"), ("ij,jk->ik", "nn"),
    ("...id,...jd->...ij", None),  # ellipsis: left alone
    ("bhid,bhjd->bhji", None),  # output transposed
    ("bhid,bhjd->hbij", None),  # batch letters reordered
    ("bhid,bhjd->bhijd", None),  # nothing contracted
    ("bhii,bhjd->bhij", None),  # a repeated letter (a diagonal)
    ("bhid,bgjd->bhij", None),  # different batch letters
    ("bhid,bhjd,bhjd->bhij", None),  # three operands
])
def test_which_einsums_are_matrix_products(equation: str, form: str | None) -> None:
    assert _form(equation.replace(" ", "")) == form


class EinsumAttention(nn.Module):
    def __init__(self, matmul_form: bool = True) -> None:
        super().__init__()
        self.matmul_form = matmul_form
        self.embed, self.qkv = nn.Linear(10, 32), nn.Linear(32, 96)
        self.proj, self.head = nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        if self.matmul_form:
            a = torch.einsum("bhid,bhjd->bhij", q * 0.25, k).softmax(-1)
            o = torch.einsum("bhij,bhjd->bhid", a, v)
        else:  # a sum over both heads and width at once: not a matrix product
            a = torch.einsum("bhid,bhjd->bij", q * 0.25, k).softmax(-1)
            o = torch.einsum("bij,bhjd->bhid", a, v)
        return self.head(h + self.proj(o.transpose(1, 2).reshape(b, n, 32))).mean(1)


def test_einsum_attention_prunes_as_matmul() -> None:
    torch.manual_seed(0)
    model, x = EinsumAttention().eval(), torch.randn(2, 5, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    assert "einsum" not in pruner.graph_module.code
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    assert [g for g in pruner.grouping.prunable if "proj:in" in g.members]
    pruner.set_widths(*random_keep(pruner, 0))
    exported = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < TOL
    assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


def test_other_einsums_stay_and_freeze() -> None:
    torch.manual_seed(0)
    model, x = EinsumAttention(matmul_form=False).eval(), torch.randn(2, 5, 10)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    assert "einsum" in pruner.graph_module.code
    [g] = [g for g in pruner.grouping.groups if "qkv:out" in g.members]
    assert not g.prunable and any("no coupling rule at einsum" in r for r in g.frozen)


def test_torchvision_maxvit_prunes_its_attention() -> None:
    """MaxViT's block and grid attention (einsum) and everything else but the
    classifier's output prune; exported == hard, FLOPs model exact."""
    torch.manual_seed(0)
    model = torchvision.models.maxvit_t(num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    assert len(pruner.grouping.frozen) == 1
    assert pruner.grouping.attention == "both"  # the default: whole heads and their widths
    members = {m for g in pruner.grouping.prunable for m in g.members}
    assert "blocks.0.layers.0.layers.window_attention.attn_layer.1.to_qkv:out" in members
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    pruner.set_widths(*random_keep(pruner, 0))
    exported = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < TOL
    assert count_flops(exported, (x,)) == pytest.approx(float(pruner.flops()), rel=1e-9)


@pytest.mark.parametrize("form", ["input-other", "mat2", "roll-input", "roll-computed-dims"])
def test_named_operands_and_computed_dims(form: str) -> None:
    """torch.matmul(input=, other=), torch.mm(x, mat2=), torch.roll(input=...) and a
    roll over dims computed in the graph: handled or frozen, never a crash, exact."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
            self.w = nn.Parameter(torch.randn(16, 16) / 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if form == "input-other":
                h = torch.matmul(input=h, other=self.w)
            elif form == "mat2":
                h = torch.mm(h, mat2=self.w)
            elif form == "roll-input":
                h = torch.roll(input=h, shifts=1, dims=0)
            else:
                h = torch.roll(h, 1, h.ndim - 2)
            return self.c(torch.relu(self.b(torch.relu(h))))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 6)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    pruner.set_widths(*random_keep(pruner, 0))
    exported = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < TOL


def test_a_result_read_through_out_is_kept() -> None:
    """torch.matmul(a, w, out=o) then f(o): the call is not dead code (torch.fx sees
    no use of its return value); its channels freeze, the rest prunes, exactly."""

    class OutNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
            self.w = nn.Parameter(torch.randn(16, 16) / 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            o = torch.zeros(4, 16)
            torch.matmul(torch.relu(self.a(x)), self.w, out=o)
            return self.c(torch.relu(self.b(o)))

    torch.manual_seed(0)
    model, x = OutNet().eval(), torch.randn(4, 6)
    pruner = s2h_fx.prune_graph(model, 1.0, (x,)).eval()
    assert "matmul" in pruner.graph_module.code
    with torch.no_grad():
        assert rel_err(pruner(x), model(x)) < TOL
    [g] = pruner.grouping.prunable  # b's outputs; a's freeze at the matmul
    assert "b:out" in g.members
    pruner.set_widths({g.index: g.divisor})
    exported = pruner.export(enforce_budget=False)
    with torch.no_grad():
        assert rel_err(exported(x), pruner(x)) < TOL
        assert rel_err(exported(x), model(x)) > 1e-4  # something was pruned
