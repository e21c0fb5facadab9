"""Per-pass structural tests: each pass alone, on small graphs; every pass run twice
changes nothing; plans are printable."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import s2h_fx
from s2h_fx.channels import S2H_MASK_SITE
from s2h_fx.passes import (
    build_flops_model,
    emit_pruned,
    find_channel_groups,
    insert_masks,
    plan_surgery,
    trace_model,
)
from s2h_fx.passes.insert_masks import mask_name

from helpers import build, rel_err


def _prepared(name: str = "cat_split"):
    model, inputs = build(name)
    gm = trace_model(model.eval(), inputs)
    return model, inputs, gm


def test_trace_twice_changes_nothing() -> None:
    model, inputs, gm = _prepared()
    again = trace_model(gm, inputs)
    assert again.code == gm.code
    assert again is not gm
    assert rel_err(again(*inputs), model(*inputs)) == 0


def test_trace_keeps_nn_layers_as_leaves_and_records_flops() -> None:
    _, _, gm = _prepared("residual")
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {"stem.0", "stem.1", "stem.2", "head"} <= targets
    conv = next(n for n in gm.graph.nodes if n.target == "stem.0")
    assert conv.meta["s2h_flops"] > 0 and tuple(conv.meta["tensor_meta"].shape) == (2, 16, 16, 16)


def test_grouping_is_pure_and_repeatable() -> None:
    _, _, gm = _prepared()
    code = gm.code
    first = find_channel_groups(gm)
    second = find_channel_groups(gm)
    assert gm.code == code
    assert str(first) == str(second)
    assert np.array_equal(first.group_of_id, second.group_of_id)
    assert build_flops_model(gm, first) == build_flops_model(gm, second)


def test_insert_masks_places_one_module_per_group_before_mixing_ops() -> None:
    _, inputs, gm = _prepared()
    grouping = find_channel_groups(gm)
    out_before = gm(*inputs)
    masked = insert_masks(gm, grouping)
    masks = [n for n in masked.graph.nodes if S2H_MASK_SITE in n.meta]
    assert {n.target for n in masks} == {mask_name(g.index) for g in grouping.prunable}
    for n in masks:  # every mask feeds a conv/linear, directly or through another mask
        user = next(iter(n.users))
        while S2H_MASK_SITE in user.meta:
            user = next(iter(user.users))
        assert user.op == "call_module" and "conv" in type(masked.get_submodule(user.target)).__name__.lower()
    # c.0 reads the cat of a and b: two masks in front of it
    c_in = next(n for n in masked.graph.nodes if n.target == "c.0").args[0]
    assert S2H_MASK_SITE in c_in.meta and S2H_MASK_SITE in c_in.args[0].meta
    for g in grouping.prunable:  # all masks at 1: same function
        masked.get_submodule(mask_name(g.index)).use_fixed = True
    assert rel_err(masked(*inputs), out_before) == 0
    count = len(masks)
    insert_masks(masked, grouping)
    assert sum(S2H_MASK_SITE in n.meta for n in masked.graph.nodes) == count


def test_plan_is_printable_and_emission_drops_masks() -> None:
    _, inputs, gm = _prepared()
    grouping = find_channel_groups(gm)
    masked = insert_masks(gm, grouping)
    keep = {g.index: np.arange(g.divisor) for g in grouping.prunable}
    plan = plan_surgery(masked, grouping, keep)
    text = str(plan)
    assert "slice a.0.weight" in text and "keep 8 channels" in text
    emitted = emit_pruned(masked, plan)
    assert not any(S2H_MASK_SITE in n.meta for n in emitted.graph.nodes)
    assert not any(name.startswith("s2h_mask") for name, _ in emitted.named_modules())
    assert emitted.get_submodule("a.0").out_channels == 8
    assert emitted.get_submodule("c.0").in_channels == 16  # cat of a (8) and b (8)
    # the chunk of g became a split with the new halves
    # g keeps 8 classes of 2 channels each (i and i + 16): 16 channels, halves of 8
    assert ".split([8, 8], 1)" in emitted.code and ".chunk(" not in emitted.code
    assert masked.get_submodule("a.0").out_channels == 16  # the input graph is untouched


def test_pipeline_twice_changes_nothing() -> None:
    """Pruning an emitted graph again at budget 1 gives the same graph and outputs."""
    model, inputs = build("cat_split")
    pruner = s2h_fx.prune_graph(model.eval(), 0.7, example_inputs=inputs)
    first = pruner.export()
    again = s2h_fx.prune_graph(first, 1.0, example_inputs=inputs).export()
    assert again.code == first.code
    assert rel_err(again(*inputs), first(*inputs)) == 0
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in first.parameters())


def test_one_shot_widths_meet_budget_and_prefer_important_channels() -> None:
    model, inputs = build("residual")
    with torch.no_grad():  # make channels 0..7 of the stream far more important
        for conv in (model.stem[0], model.a[0], model.b[0], model.c[0]):
            conv.weight[8:] *= 0.01
    pruner = s2h_fx.prune_graph(model.eval(), 0.5, example_inputs=inputs)
    assert pruner.flops_ratio() <= 0.5
    assert pruner.widths == {0: 8}
    assert list(pruner.plan.keep[0]) == list(range(8))


def test_exported_graph_pickles_without_s2h_fx(tmp_path) -> None:
    model, inputs = build("residual")
    pruned = s2h_fx.prune_graph(model.eval(), 0.5, example_inputs=inputs).export()
    path = tmp_path / "pruned.pt"
    torch.save(pruned, path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        assert not any(b"s2h_fx" in z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    loaded = torch.load(path, weights_only=False)
    assert rel_err(loaded(*inputs), pruned(*inputs)) == 0


def test_export_shares_no_tensor_with_the_pruner() -> None:
    """emit_pruned keeps the tensors it will slice out of its deepcopy (they are not
    copied whole first); the emitted network must still own every tensor: training
    the pruner on after export() must not move the exported network."""
    for name in ("residual", "shared", "cat_split"):
        model, inputs = build(name)
        pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=inputs).eval()
        pruned = pruner.export()
        live = {t.data_ptr() for t in pruner.state_dict().values() if isinstance(t, torch.Tensor)}
        owned = [n for n, t in pruned.state_dict().items() if t.data_ptr() in live]
        assert not owned, f"{name}: {owned} alias the pruner's tensors"
        before = pruned(*inputs)
        with torch.no_grad():
            for p in pruner.parameters():
                p.add_(1.0)
        assert torch.equal(pruned(*inputs), before)


class TiedConvs(nn.Module):
    """Two conv modules holding one weight tensor (tied), in sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.b.weight = self.a.weight
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(F.relu(self.stem(x)))))))


def test_tied_weights_are_one_tensor_in_every_network() -> None:
    """a.weight is b.weight: a's input, a's output (b's input) and b's output are the
    same channels of one tensor, so they form one group; the hard network and the
    emitted one slice it once and keep it tied. (Keyed by path, a and b once made
    three groups and the hard network fed b a weight sliced for a.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pruner = s2h_fx.prune_graph(TiedConvs().eval(), 0.6, (x,)).eval()
    (group,) = pruner.grouping.prunable
    assert group.size == 16
    pruned = pruner.export()
    assert pruned.a.weight is pruned.b.weight
    w = pruner.widths[group.index]
    assert w < 16 and tuple(pruned.a.weight.shape[:2]) == (w, w)
    assert rel_err(pruner(x), pruned(x)) < 1e-5
    assert rel_err(pruner.masked_forward(x), pruned(x)) < 1e-5


def test_one_shot_greedy_meets_a_budget_of_a_scaled_cost_model() -> None:
    """A latency model is ``constant + scale * sum(terms)``: the greedy's running cost
    must fall by scale times a step's terms, or it shrinks far past the budget. It
    lands where the same greedy does on the unscaled terms with the budget moved to
    the same absolute cost, i.e. the widths agree."""
    import dataclasses

    import numpy as np
    import torchvision

    from s2h_fx.one_shot import choose_widths
    from s2h_fx.passes.build_flops_model import build_flops_model

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    gm = trace_model(torchvision.models.resnet18().eval(), (x,))
    grouping = find_channel_groups(gm)
    flops = build_flops_model(gm, grouping)

    @dataclasses.dataclass(frozen=True)
    class Scaled:
        terms: tuple
        sizes: dict
        constant: float
        scale: float

        @property
        def total(self) -> float:
            return self.constant + self.scale * sum(t.base for t in self.terms)

        def __call__(self, widths: dict) -> float:
            w = {**self.sizes, **widths}
            return self.constant + self.scale * sum(t.at(w, self.sizes) for t in self.terms)

        def ratio(self, widths: dict) -> float:
            return self(widths) / self.total

    rng = np.random.default_rng(0)
    importance = {g.index: rng.random(g.size) for g in grouping.prunable}
    for scale in (0.5, 1.035, 2.0):
        scaled = Scaled(flops.terms, flops.sizes, flops.constant, scale)
        for budget in (0.3, 0.5, 0.7):
            widths = choose_widths(scaled, grouping, importance, budget)
            assert scaled.ratio(widths) <= budget
            # the same absolute cost on the plain model
            plain_budget = (flops.constant + (budget * scaled.total - scaled.constant) / scale
                            ) / flops.total
            assert widths == choose_widths(flops, grouping, importance, plain_budget)


def test_flops_model_of_tensor_widths_is_the_term_by_term_sum() -> None:
    """The vectorised evaluation (tensor widths, as the resource loss passes them) gives
    the value and the gradients of the plain sum of its terms, at random widths."""
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    pruner = s2h_fx.prune_graph(torchvision.models.resnet18(num_classes=10), 0.5,
                                example_inputs=(x,))
    model = pruner.flops_model
    assert len({len(t.axes) for t in model.terms}) > 1  # terms of different arity
    rng = np.random.default_rng(0)
    for _ in range(3):
        ints = {g: int(rng.integers(1, s + 1)) for g, s in model.sizes.items()}
        leaves = {g: torch.tensor(float(w), requires_grad=True) for g, w in ints.items()}
        vec = model(leaves)
        loop = model.constant + sum(t.at({**model.sizes, **leaves}, model.sizes)
                                    for t in model.terms)
        assert torch.isclose(vec, loop, rtol=1e-5) and abs(vec.detach().item() / model(ints) - 1) < 1e-5
        grads = torch.autograd.grad(vec, list(leaves.values()))
        expected = torch.autograd.grad(loop, list(leaves.values()))
        for a, b in zip(grads, expected):
            assert torch.isclose(a, b, rtol=1e-4, atol=1e-7 * model.total)
    half = {g: torch.tensor(s / 2.0) for g, s in model.sizes.items()}  # float64 widths too
    assert abs(float(model({g: v.double() for g, v in half.items()}))
               - model({g: s / 2.0 for g, s in model.sizes.items()})) < 1e-6 * model.total


def test_flops_model_under_autocast_keeps_float32() -> None:
    """fit's amp computes the resource loss under autocast: the vectorised FLOPs model
    runs no op in bfloat16 there (widths that are not powers of two would round)."""
    import torchvision

    torch.manual_seed(0)
    pruner = s2h_fx.prune_graph(torchvision.models.mobilenet_v3_small(num_classes=10), 0.5,
                                example_inputs=(torch.randn(1, 3, 32, 32),))
    model = pruner.flops_model
    assert any(s & (s - 1) for s in model.sizes.values())  # a size not a power of two
    rng = np.random.default_rng(0)
    widths = {g: torch.tensor(float(rng.integers(1, s + 1)), requires_grad=True)
              for g, s in model.sizes.items()}
    plain = model(widths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = model(widths)
    assert cast.dtype == torch.float32 and torch.isclose(cast, plain, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(cast, list(widths.values())),
                    torch.autograd.grad(plain, list(widths.values()))):
        assert torch.isclose(a, b, rtol=1e-5, atol=1e-9 * model.total)
