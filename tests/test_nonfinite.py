"""fit's non-finite guard: a NaN batch is skipped (weights, masks and optimiser state
untouched), counted and logged; too many in a row stop the run with a clear error."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import s2h_fx
from s2h_fx.config import S2HConfig
from s2h_fx.errors import NonFiniteError, S2HError

BATCH, BATCHES, EPOCHS, BUDGET = 8, 6, 3, 0.5


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)).mean((2, 3)))


def data(nan_batches: tuple[int, ...] = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * BATCHES, 3, 8, 8, generator=gen)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    batches = [(x[i:i + BATCH].clone(), y[i:i + BATCH]) for i in range(0, len(y), BATCH)]
    for b in nan_batches:
        batches[b][0][0, 0, 0, 0] = float("nan")
    return batches


def pruner() -> s2h_fx.Pruner:
    torch.manual_seed(0)
    return s2h_fx.prune_graph(Tiny(), BUDGET, example_inputs=(data()[0][0][:2],), divisor=2,
                              config=S2HConfig(mask_lr=0.2))


def finite(p: s2h_fx.Pruner) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in p.state_dict().values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def test_one_nan_batch_is_skipped_and_training_ends_as_a_clean_run(
        caplog: pytest.LogCaptureFixture) -> None:
    clean = pruner()
    clean_history = clean.fit(data(), EPOCHS, lr=0.05, progress=False, finish=False)
    p = pruner()
    with caplog.at_level(logging.WARNING, logger="s2h_fx"):
        history = p.fit(data(nan_batches=(2,)), EPOCHS, lr=0.05, progress=False, finish=False)
    # the NaN batch comes once per epoch (the same list every epoch)
    assert [h.skipped for h in history] == [1] * EPOCHS
    assert [h.skipped for h in clean_history] == [0] * EPOCHS
    assert [len(h.steps) for h in history] == [BATCHES - 1] * EPOCHS
    assert "non-finite loss" in caplog.text and "step skipped" in caplog.text
    assert finite(p)
    assert all(math.isfinite(v) for h in history for v in h.losses.values())
    # the masks moved into the budget band, as in the clean run (not stuck at 1.0)
    band = (BUDGET - 0.03, BUDGET + 0.005)
    assert band[0] <= clean_history[-1].flops_ratio <= band[1]
    assert band[0] <= history[-1].flops_ratio <= band[1]
    from s2h_fx.trainer import finish_training

    finish_training(p, data(), bn_batches=2)
    out = p.export()(data()[0][0])
    assert bool(torch.isfinite(out).all())


def test_a_skipped_step_leaves_weights_masks_and_momentum_untouched() -> None:
    p = pruner()
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(step: dict[str, float]) -> None:
        snapshots.append({k: v.clone() for k, v in p.state_dict().items()
                          if isinstance(v, torch.Tensor)})

    # batches 0, 1 clean, then NaN from batch 2 on: after 3 NaN steps in a row, stop
    with pytest.raises(NonFiniteError, match="3 training steps in a row had a non-finite loss"):
        p.fit(data(nan_batches=(2, 3, 4, 5)), 1, progress=False, max_nonfinite=3,
              on_step=snapshot)
    assert issubclass(NonFiniteError, S2HError)
    assert len(snapshots) == 4  # two steps, then three skipped (the third raised)
    after_clean = snapshots[1]
    for later in snapshots[2:] + [dict(p.state_dict())]:
        for key, value in after_clean.items():
            assert torch.equal(later[key], value), key


def test_training_with_a_nan_batch_equals_training_without_it() -> None:
    """Momentum, schedule and BatchNorm statistics untouched by the skipped step: the
    run is exactly the run over the same data without the NaN batch."""
    clean = data()
    with_nan = clean[:2] + [data(nan_batches=(2,))[2]] + clean[3:]
    without = clean[:2] + clean[3:]
    a, b = pruner(), pruner()
    # the same schedule length for both (the NaN batch's step is not taken)
    a.fit(with_nan, 2, progress=False, finish=False, steps_per_epoch=BATCHES - 1)
    b.fit(without, 2, progress=False, finish=False, steps_per_epoch=BATCHES - 1)
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in sb.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(sa[key], value), key


def test_a_non_finite_gradient_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    p = pruner()
    calls = {"n": 0}
    weight = p.graph_module.get_submodule("b.0").weight

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    weight.register_hook(poison)
    with caplog.at_level(logging.WARNING, logger="s2h_fx"):
        history = p.fit(data(), 1, progress=False, finish=False)
    assert history[0].skipped == 1
    assert "non-finite gradient" in caplog.text
    assert finite(p)


def test_max_nonfinite_none_never_stops() -> None:
    p = pruner()
    history = p.fit(data(nan_batches=(0, 1, 2, 3, 4, 5)), 1, progress=False, finish=False,
                    max_nonfinite=None)
    assert history[0].skipped == BATCHES and finite(p)
    with pytest.raises(ValueError, match="max_nonfinite must be a positive integer"):
        p.fit(data(), 1, progress=False, max_nonfinite=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nan_batch_under_amp_with_a_grad_scaler() -> None:
    p = pruner()
    history = p.fit(data(nan_batches=(2,)), 2, progress=False, device="cuda", amp=True,
                    bn_batches=2)
    assert [h.skipped for h in history] == [1, 1]
    assert finite(p)
    assert bool(torch.isfinite(p.export()(data()[0][0].cuda())).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_checks_every_element(dtype: torch.dtype) -> None:
    """The guard's check sums each tensor first: a NaN or infinity anywhere is found,
    and finite values whose sum overflows are still finite."""
    from s2h_fx.distill import all_finite

    big = torch.finfo(dtype).max
    finite = [torch.randn(50, 7).to(dtype), torch.zeros(0, dtype=dtype), torch.ones(3, dtype=dtype)]
    assert all_finite(finite) and all_finite([])
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.randn(50, 7).to(dtype)
        t[17, 3] = bad
        assert not all_finite([*finite, t]), bad
    both = torch.tensor([math.inf, -math.inf], dtype=dtype)  # sums to NaN
    assert not all_finite([both])
    overflow = torch.full((4,), big, dtype=dtype)  # every element finite, the sum not
    assert all_finite([overflow, -overflow]) and all_finite([overflow])
    z = torch.tensor([1 + 1j, complex(1, math.nan)])  # a complex tensor: both parts
    assert not all_finite([z]) and all_finite([z[:1]])
