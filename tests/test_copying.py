"""copy_module makes the copy copy.deepcopy makes, faster."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from s2h_fx.copying import copy_module


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("scale", torch.ones(4))
        self.sizes = [4, 4]  # a mutable plain attribute
        self.plain = torch.arange(3.0)  # a tensor that is not a parameter or buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * self.scale.view(1, -1, 1, 1)


class CustomCopy(nn.Linear):
    """Copies itself its own way: copy_module must defer to it."""

    def __deepcopy__(self, memo: dict[int, object]) -> CustomCopy:
        new = CustomCopy(self.in_features, self.out_features)
        new.copied_by_hook = True
        memo[id(self)] = new
        return new


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *m.buffers()]


def test_copy_is_independent_and_equal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.ReLU(), nn.Conv2d(4, 4, 1))
    model[0].bn.running_mean.normal_()
    hook_calls: list[int] = []
    model[1].register_forward_hook(lambda *a: hook_calls.append(1))
    new = copy_module(model)
    x = torch.randn(2, 3, 5, 5)
    model.eval()
    new.eval()
    torch.testing.assert_close(new(x), model(x), rtol=0, atol=0)
    assert len(hook_calls) == 2  # the hook came along (a deepcopy keeps hooks)
    for a, b in zip(_tensors(model), _tensors(new)):
        assert a is not b and a.data_ptr() != b.data_ptr()
        assert type(a) is type(b) and a.requires_grad == b.requires_grad
    assert new[0].sizes == [4, 4] and new[0].sizes is not model[0].sizes
    assert new[0].plain is not model[0].plain
    assert new[0] is not model[0] and new[0].conv is not model[0].conv
    with torch.no_grad():
        new[0].conv.weight.zero_()
    assert model[0].conv.weight.abs().sum() > 0


def test_shared_objects_stay_shared_and_memo_is_honoured() -> None:
    conv = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # one module under two names
    model.register_parameter("tied", conv.weight)
    keep = model[0].bias
    new = copy_module(model, {id(keep): keep})
    assert new[0] is new[2]
    assert new.tied is new[0].weight and new.tied is not conv.weight
    assert new[0].bias is keep  # the memo said: share this one


def test_graph_module_copy_has_its_own_forward() -> None:
    gm = fx.symbolic_trace(Block())
    new = copy_module(gm)
    assert type(new) is not type(gm)  # GraphModule instances each own their class
    assert new.graph is not gm.graph and new.graph.owning_module is new
    x = torch.randn(1, 3, 4, 4)
    before = gm(x)
    for node in new.graph.nodes:  # edit the copy: the original must not change
        if node.op == "output":
            with new.graph.inserting_before(node):
                neg = new.graph.call_function(torch.neg, (node.args[0],))
            node.args = (neg,)
    new.recompile()
    torch.testing.assert_close(new(x), -before)
    torch.testing.assert_close(gm(x), before)


def test_classes_with_their_own_copy_defer_to_it() -> None:
    model = nn.Sequential(CustomCopy(2, 3))
    new = copy_module(model)
    assert getattr(new[0], "copied_by_hook", False)
    # and copy.deepcopy agrees on what that module's copy is
    assert getattr(copy.deepcopy(model)[0], "copied_by_hook", False)


def test_shared_empty_dict_stays_shared() -> None:
    cache: dict[str, int] = {}
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].cache, model[1].cache = cache, cache  # one lazy cache, two users
    new = copy_module(model)
    assert new[0].cache is new[1].cache and new[0].cache is not cache
    deep = copy.deepcopy(model)
    assert deep[0].cache is deep[1].cache  # what deepcopy does


def test_graph_module_drops_call_hooks_and_runs_deepcopy_hooks_as_deepcopy_does() -> None:
    gm = fx.symbolic_trace(Block())
    calls: list[str] = []
    gm.register_forward_hook(lambda *a: calls.append("hook"))
    seen: list[object] = []
    gm._register_deepcopy_hook(seen.append)
    x = torch.randn(1, 3, 4, 4)
    for make in (copy.deepcopy, copy_module):
        copy_ = make(gm)
        calls.clear()
        copy_(x)
        assert calls == []  # forward hooks do not come along
        assert seen[-1] is copy_  # the deepcopy hooks ran on the copy
