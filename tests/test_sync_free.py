"""The training step without host synchronisation: structures (plan + skeleton) are
built once per widths tuple, never because the kept channels change; the kept
positions are computed on the device; the widths are read once per search step
and not at all while the architecture is fixed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

import s2h_fx
from s2h_fx.config import S2HConfig
from s2h_fx.passes.plan_surgery import plan_surgery

from helpers import rel_err


class TinyResNet(nn.Module):
    """A stem, one BasicBlock at 16 channels, one downsampling BasicBlock to 32."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2, downsample=nn.Sequential(
            nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32)))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _pruner(mask_lr: float = 0.15, device: str = "cpu") -> tuple[s2h_fx.Pruner, torch.Tensor,
                                                                 torch.Tensor]:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    pruner = s2h_fx.prune_graph(TinyResNet(), 0.5, example_inputs=(x[:2],), divisor=4,
                                config=S2HConfig(mask_lr=mask_lr))
    with torch.no_grad():  # the one-shot widths with little confidence: the masks move
        for p in pruner.mask_parameters():
            p.mul_(0.05)
    return pruner.to(device).train(), x.to(device), y.to(device)


def _s2h_step(pruner: s2h_fx.Pruner, opt: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor) -> None:
    soft, hard = pruner(x)
    losses = pruner.losses((soft, hard), y)
    opt.zero_grad(set_to_none=True)
    assert pruner.backward(losses)
    opt.step()
    pruner.mask_step()


def _key(widths: dict[int, int]) -> tuple[int, ...]:
    return tuple(widths[g] for g in sorted(widths))


def test_fifty_moving_steps_build_once_per_widths_tuple() -> None:
    pruner, x, y = _pruner()
    state = pruner.state
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    assert state.plan_builds == state.skeleton_builds == 0  # nothing planned before a step
    seen, keeps = [], []
    for _ in range(50):
        seen.append(_key(pruner.widths))  # the widths this step's hard branch runs at
        keeps.append(pruner.state.selection().key()[1])
        _s2h_step(pruner, opt, x, y)
    distinct = set(seen)
    changes = sum(a != b for a, b in zip(seen, seen[1:]))
    assert changes >= 3 and 3 <= len(distinct) <= 64, (changes, distinct)  # 64: cache size
    assert state.plan_builds == len(distinct)
    assert state.skeleton_builds == len(distinct)
    keep_changes = sum(a != b for a, b in zip(keeps, keeps[1:]))
    assert keep_changes > changes  # re-ranking moved kept channels at fixed widths too
    # one batched read per step (after each mask step), none more
    assert state.width_reads <= 50 + 1
    pruner.eval()
    with torch.no_grad():
        hard = pruner(x)
        exported = pruner.export(enforce_budget=False)(x)
    assert rel_err(hard, exported) < 1e-5


def _random_keep(pruner: s2h_fx.Pruner, widths: dict[int, int], seed: int
                 ) -> dict[int, np.ndarray]:
    """Random whole atoms to keep at ``widths``."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in pruner.grouping.prunable:
        atom_of = pruner.grouping.atom_of_class[g.index]
        chosen = rng.choice(atom_of.max() + 1, size=widths[g.index] // g.atom, replace=False)
        keep[g.index] = np.flatnonzero(np.isin(atom_of, chosen))
    return keep


def test_kept_channels_change_at_fixed_widths_without_rebuilds() -> None:
    pruner, x, _ = _pruner()
    widths = {g.index: g.size // 2 for g in pruner.grouping.prunable}
    pruner.set_widths(widths)
    pruner.eval()
    with torch.no_grad():
        pruner(x)
    plans, skeletons = pruner.state.plan_builds, pruner.state.skeleton_builds
    for seed in range(1, 6):
        keep = _random_keep(pruner, widths, seed)
        pruner.set_widths(widths, keep)
        with torch.no_grad():
            hard = pruner(x)
        # the device-computed kept positions are the planner's for this keep
        reference = plan_surgery(pruner.graph_module, pruner.grouping, keep)
        got = pruner.state.cuts(pruner.state.structure())
        assert set(got) == set(reference.params)
        for path, cuts in reference.params.items():
            assert [(a, i.tolist()) for a, i in got[path]] == [(a, i.tolist()) for a, i in cuts]
        assert rel_err(hard, pruner.export(enforce_budget=False)(x)) < 1e-5
    assert pruner.state.plan_builds == plans and pruner.state.skeleton_builds == skeletons


def test_fixed_architecture_reads_no_width() -> None:
    """A settling step (masks not stepped) neither reads the widths nor rebuilds."""
    pruner, x, y = _pruner()
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    _s2h_step(pruner, opt, x, y)
    pruner.widths  # noqa: B018  (the widths the mask step left)
    state = pruner.state
    reads, plans = state.width_reads, state.plan_builds
    for _ in range(5):  # fit's settling step of the hard network alone
        loss = F.cross_entropy(pruner.hard_forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pruner.drop_mask_grads()
        soft, hard = pruner(x)  # and the distillation mode's forward
        pruner.losses((soft, hard), y)
    assert state.width_reads == reads and state.plan_builds <= plans + 1
    with torch.no_grad():
        pruner.mask_parameters()[0].add_(1.0)  # a changed logit is seen
    pruner.widths  # noqa: B018
    assert state.width_reads == reads + 1


def test_fit_settling_epochs_read_no_width() -> None:
    pruner, x, y = _pruner(mask_lr=0.05)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in (0, 4)]
    reads: list[int] = []
    history = pruner.fit(batches, epochs=3, device="cpu", progress=False, bn_batches=1,
                         on_step=lambda m: reads.append(pruner.state.width_reads),
                         finish=False)
    assert [r.settling for r in history] == [False, True, True]  # default share: 0.6 of 3
    settling = reads[2:]
    assert len(settling) == 4 and len(set(settling)) == 1, reads


def _settling_steps(pruner: Any, opt: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor, n: int) -> None:
    for _ in range(n):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(pruner.hard_forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pruner.drop_mask_grads()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            soft, hard = pruner(x)
            pruner.losses((soft, hard), y)


@pytest.mark.gpu
def test_settling_step_on_cuda_does_not_synchronise() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: no GPU on this machine")
    pruner, x, y = _pruner(device="cuda")
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9, foreach=True)
    _s2h_step(pruner, opt, x, y)  # a search step (it reads the widths once)
    pruner.widths  # noqa: B018  (the architecture is fixed from here, as in settling)
    _settling_steps(pruner, opt, x, y, 2)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _settling_steps(pruner, opt, x, y, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__")


class _HostReads:
    """Counts calls of the tensor methods that read device data on the host (a CPU
    stand-in for ``torch.cuda.set_sync_debug_mode("error")``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in _READS:
            original = getattr(torch.Tensor, name)

            def counted(t: torch.Tensor, *args: Any, _f: Any = original, _n: str = name,
                        **kwargs: Any) -> Any:
                self.calls.append(_n)
                return _f(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_host_reads_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A settling step of the pruner reads nothing on the host; a search step reads
    twice: the widths (one batched read) and the decoupled backward's finite check."""
    pruner, x, y = _pruner()
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):  # warm-up: structures built, index tensors on the device
        _s2h_step(pruner, opt, x, y)
    with torch.no_grad():
        pruner.hard_forward(x)  # the structure of the widths the last mask step left
    builds = pruner.state.plan_builds
    with monkeypatch.context() as m:
        reads = _HostReads(m)
        loss = F.cross_entropy(pruner.hard_forward(x), y)  # settling: the hard network
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pruner.drop_mask_grads()
        soft, hard = pruner(x)  # settling in distillation mode: the forward and losses
        pruner.losses((soft, hard), y)
        settling = list(reads.calls)
        reads.calls.clear()
        _s2h_step(pruner, opt, x, y)  # a search step, and the widths it leaves
        pruner.widths  # noqa: B018
        search = list(reads.calls)
    assert settling == []
    # a new widths tuple also reads the ranks once to plan its structure (cpu, numpy)
    new_structure = pruner.state.plan_builds > builds
    planning = [c for c in search if c in ("cpu", "numpy")]
    assert bool(planning) == new_structure, (search, new_structure)
    assert sorted(c for c in search if c not in planning) == ["__bool__", "tolist"], search


def test_skeletons_share_code_and_leave_the_full_network_alone() -> None:
    """A new widths tuple costs no compile and no data copy: a CNN (no argument
    rewrites) has one compiled template; each skeleton's sliced tensors are empty meta
    tensors of the pruned shapes; the full-width graph's modules keep their widths."""
    pruner, x, y = _pruner()
    gm = pruner.graph_module
    widths_before = {n: (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d)
                     else m.num_features for n, m in gm.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    tensors_before = {n: t for n, t in gm.state_dict(keep_vars=True).items()}
    opt = torch.optim.SGD(pruner.weight_parameters(), lr=0.05, momentum=0.9)
    for _ in range(20):
        _s2h_step(pruner, opt, x, y)
    state = pruner.state
    assert state.skeleton_builds >= 3
    assert state._emitter is not None and state._emitter.templates_built == 1
    structures = list(state._structures.values())
    for structure in structures:
        skeleton = structure.skeleton
        assert skeleton is not None
        for path, cuts in structure.plan.params.items():
            t = skeleton.get_parameter(path) if path in dict(skeleton.named_parameters()) \
                else skeleton.get_buffer(path)
            assert t.is_meta and [t.shape[a] for a, _ in cuts] == [len(i) for _, i in cuts]
        convs = [m for m in skeleton.modules() if isinstance(m, nn.Conv2d)]
        assert all(m.out_channels == m.weight.shape[0] for m in convs)
    now = {n: (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else m.num_features
           for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    assert now == widths_before
    assert all(t is tensors_before[n] for n, t in gm.state_dict(keep_vars=True).items())
    pruner.eval()
    with torch.no_grad():  # every cached skeleton computes its exported network
        for structure in structures[-3:]:
            pruner.set_widths(dict(zip(state.order, structure.widths)))
            assert rel_err(pruner(x), pruner.export(enforce_budget=False)(x)) < 1e-5


class _Frozen(nn.Module):
    """A pruned BatchNorm (b1) and one the output's channels keep whole (b2), and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_hard_branch_keeps_the_full_networks_module_modes() -> None:
    """Modules the user put in eval mode (a frozen BatchNorm, dropout off) stay so
    through the hard branch, which shares the full network's modules, and the hard
    branch runs them in those modes: its own copy of a pruned BatchNorm too."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    pruner = s2h_fx.prune_graph(_Frozen(), 0.5, example_inputs=(x[:2],), divisor=4).train()
    gm = pruner.graph_module
    gm.b1.eval(), gm.b2.eval(), gm.drop.eval()
    kept = gm.b2.running_mean.clone()
    _, hard_a = pruner(x)
    _, hard_b = pruner(x)
    assert not (gm.b1.training or gm.b2.training or gm.drop.training)
    assert torch.equal(hard_a, hard_b)  # no dropout and no batch statistics in the hard branch
    skeleton = pruner.state.skeleton(pruner.state.structure())
    assert skeleton.get_submodule("b1") is not gm.b1 and not skeleton.get_submodule("b1").training
    with torch.no_grad():
        full_a, full_b = gm(x), gm(x)
    assert torch.equal(full_a, full_b) and torch.equal(kept, gm.b2.running_mean)
    gm.train()  # and back: the hard branch follows
    pruner(x)
    assert skeleton.get_submodule("b1").training and skeleton.get_submodule("drop").training


class _PlainScale(nn.Module):
    """A pruned conv whose output is scaled by a plain tensor attribute of the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c1.scale = torch.rand(1, 16, 1, 1) + 0.5  # neither parameter nor buffer
        self.c2 = nn.Conv2d(16, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x) * self.c1.scale)
        return F.adaptive_avg_pool2d(self.c2(x), 1).flatten(1)


def test_plain_tensor_attribute_is_sliced_in_the_hard_branch() -> None:
    """A tensor the graph reads from a plain attribute is sliced with its channels in
    the hard branch as in the exported network (it is a non-persistent buffer of the
    traced copy; the user's module and the state dict are left as they were)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = _PlainScale()
    pruner = s2h_fx.prune_graph(model, 0.5, example_inputs=(x[:2],), divisor=4)
    assert "c1.scale" in pruner.plan.params and "scale" in model.c1.__dict__
    pruner.train()
    for _ in range(2):
        pruner(x)
    pruner.eval()
    exported = pruner.export(enforce_budget=False).eval()
    with torch.no_grad():
        assert rel_err(pruner(x), exported(x)) < 1e-6
    assert exported.c1.scale.shape[1] == exported.c1.out_channels < 16
    assert "c1.scale" not in exported.state_dict()
