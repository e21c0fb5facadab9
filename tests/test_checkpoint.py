"""Checkpoint and resume: a run killed with SIGKILL mid-epoch and resumed in a new
process ends exactly where an uninterrupted run ends; a damaged newest checkpoint
falls back to the previous one; files are written atomically and load with
``weights_only=True``.

This file also runs as a script (the training process the tests start and kill):
``python test_checkpoint.py CKPT_DIR kill|resume OUT [KILL_AT]``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import s2h_fx
from s2h_fx.checkpoint import CheckpointStore
from s2h_fx.config import S2HConfig
from s2h_fx.errors import CheckpointError

BATCH, SAMPLES, EPOCHS, EVERY, KILL_AT = 8, 48, 3, 4, 11  # 6 batches an epoch, 18 in all
# checkpoints after batches 4, 6 (end of epoch 1), 8, ...; killed after batch 11: the
# newest is batch 8 = epoch 2, 2 batches into it (a mid-epoch resume)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.drop = nn.Dropout(0.2)  # training itself draws from torch's generator
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.b(self.a(x)).mean((2, 3))))


class Noisy(Dataset):
    """Augmentation that draws from torch's, numpy's and Python's generators."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(SAMPLES, 3, 8, 8, generator=gen)
        self.y = (self.x[:, 0].mean((1, 2)) > 0).long() + 2 * (self.x[:, 1].mean((1, 2)) > 0).long()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.1 * torch.randn(3, 8, 8) + float(np.random.randn()) * 0.1 + random.random() * 0.1
        return self.x[i] + noise, self.y[i]


def train(ckpt: Path | None, resume: bool = False, kill_at: int | None = None
          ) -> tuple[s2h_fx.Pruner, list[Any]]:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(0)
    pruner = s2h_fx.prune_graph(Tiny(), 0.5, example_inputs=(torch.zeros(2, 3, 8, 8),),
                                divisor=2, config=S2HConfig(mask_lr=0.2))
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    done = [0]

    def on_step(step: dict[str, float]) -> None:
        done[0] += 1
        if kill_at is not None and done[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    history = pruner.fit(loader, EPOCHS, lr=0.05, progress=False, bn_batches=2,
                         checkpoint=ckpt, checkpoint_every=EVERY, resume=resume,
                         on_step=on_step)
    return pruner, history


def result(pruner: s2h_fx.Pruner, history: list[Any]) -> dict[str, Any]:
    probe = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = pruner.export()(probe)
    return {"state": {k: v.detach().clone() for k, v in pruner.state_dict().items()
                      if isinstance(v, torch.Tensor)},
            "widths": pruner.widths, "out": out,
            "flops": [h.flops_ratio for h in history], "skipped": [h.skipped for h in history]}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["widths"] == b["widths"]
    assert a["flops"] == pytest.approx(b["flops"], abs=1e-6)
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        other = b["state"][key]
        if value.is_floating_point():
            assert torch.allclose(value, other, rtol=0, atol=1e-6), key
        else:
            assert torch.equal(value, other), key
    assert torch.allclose(a["out"], b["out"], rtol=0, atol=1e-6)


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return result(*train(None))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoints a run killed with SIGKILL after batch 11 left behind."""
    ckpt = tmp_path_factory.mktemp("killed") / "ckpt"
    proc = run_script(str(ckpt), "kill", str(ckpt.parent / "unused.pt"), str(KILL_AT))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return ckpt


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_killed_run_resumes_in_a_new_process_to_the_same_end(
        killed: Path, reference: dict[str, Any], tmp_path: Path) -> None:
    ckpt = shutil.copytree(killed, tmp_path / "ckpt")
    assert names(ckpt) == ["ckpt-00000004.pt", "ckpt-00000006.pt", "ckpt-00000008.pt"]
    out = tmp_path / "resumed.pt"
    proc = run_script(str(ckpt), "resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "ckpt-00000008.pt" in proc.stderr
    resumed = torch.load(out, weights_only=False)
    assert resumed["skipped"] == [0, 0, 0]
    assert_same(resumed, reference)
    # after batches 12 (every 4 and end of epoch 2), 16, 18 (end): the newest three kept
    assert names(ckpt) == ["ckpt-00000012.pt", "ckpt-00000016.pt", "ckpt-00000018.pt"]


def test_truncated_newest_checkpoint_falls_back_to_the_previous(
        killed: Path, reference: dict[str, Any], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    ckpt = shutil.copytree(killed, tmp_path / "ckpt")
    newest = ckpt / "ckpt-00000008.pt"
    with newest.open("r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.INFO, logger="s2h_fx"):
            got = result(*train(ckpt, resume=True))
    finally:
        torch.set_num_threads(threads)
    assert "ckpt-00000008.pt cannot be read" in caplog.text
    assert "falling back to the previous one" in caplog.text
    assert "resuming from" in caplog.text and "ckpt-00000006.pt" in caplog.text
    assert_same(got, reference)  # from the end of epoch 1, exactly the same run


def test_checkpoint_loads_with_weights_only_and_holds_the_run(killed: Path) -> None:
    state = torch.load(killed / "ckpt-00000008.pt", weights_only=True)
    assert {"model", "optimizer", "schedule", "scaler", "rng", "run", "meta"} <= set(state)
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python", "loader"}
    assert len(state["rng"]["loader"]) == 1  # the DataLoader's seeded generator
    run = state["run"]
    assert (run["epoch"], run["step"], run["batches"]) == (1, 2, 8)  # epoch 2, 2 batches in
    assert len(run["history"]) == 1 and run["history"][0]["epoch"] == 1
    assert state["schedule"]["steps"] == 8 and state["schedule"]["steps_per_epoch"] == 6
    assert "_extra_state" in state["model"] and state["optimizer"]["state"]  # momentum
    # the default settling share of the epochs is part of the run's identity
    descent, settle = S2HConfig().phases(EPOCHS)
    assert settle > 0 and descent > 0
    assert state["meta"] == {"kind": "fit", "epochs": EPOCHS, "warmup_epochs": 0,
                             "method": "s2h", "settle_epochs": settle, "settle_mode": "hard",
                             "descent_epochs": descent, "budget": 0.5, "budget_kind": "flops",
                             "one_shot": "per-cost"}


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_old_checkpoints(
        killed: Path, tmp_path: Path) -> None:
    ckpt = shutil.copytree(killed, tmp_path / "ckpt")
    pruner = s2h_fx.prune_graph(Tiny(), 0.5, example_inputs=(torch.zeros(2, 3, 8, 8),),
                                divisor=2)
    loader = DataLoader(Noisy(), batch_size=BATCH)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        pruner.fit(loader, EPOCHS, progress=False, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="epochs=3"):
        pruner.fit(loader, 5, progress=False, checkpoint=ckpt, resume=True)
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        pruner.fit(loader, 1, progress=False, resume=True)


@pytest.mark.parametrize(("budget", "kwargs", "refused"), [
    (0.4, {}, "budget=0.5, this run has budget=0.4"),
    ({"params": 0.5}, {}, "budget_kind='flops', this run has budget_kind='params'"),
    (0.5, {"one_shot": "share"}, "one_shot='per-cost', this run has one_shot='share'")])
def test_resume_refuses_another_budget_or_one_shot_rule(
        killed: Path, tmp_path: Path, budget: Any, kwargs: dict[str, Any], refused: str) -> None:
    """The masks were trained towards the checkpoint's budget and its rule projects them:
    going on towards another would mix two runs without saying so."""
    ckpt = shutil.copytree(killed, tmp_path / "ckpt")
    pruner = s2h_fx.prune_graph(Tiny(), budget, example_inputs=(torch.zeros(2, 3, 8, 8),),
                                divisor=2, **kwargs)
    with pytest.raises(CheckpointError, match=re.escape(refused)):
        pruner.fit(DataLoader(Noisy(), batch_size=BATCH), EPOCHS, progress=False,
                   checkpoint=ckpt, resume=True)


def test_a_checkpoint_from_before_the_budget_was_recorded_resumes_with_a_warning(
        killed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = shutil.copytree(killed, tmp_path / "ckpt")
    for path in ckpt.glob("ckpt-*.pt"):  # as an earlier s2h-fx wrote them
        state = torch.load(path, weights_only=True)
        for key in ("budget", "budget_kind", "one_shot"):
            del state["meta"][key]
        torch.save(state, path)
    pruner = s2h_fx.prune_graph(Tiny(), 0.4, example_inputs=(torch.zeros(2, 3, 8, 8),),
                                divisor=2)
    loader = DataLoader(Noisy(), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="s2h_fx.loop"):
        pruner.fit(loader, EPOCHS, progress=False, checkpoint=ckpt, resume=True)
    assert ("does not record budget, budget_kind, one_shot (written by an earlier s2h-fx): "
            "resuming without checking that it had budget=0.4, budget_kind='flops', "
            "one_shot='per-cost'") in caplog.text


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    good = {"format": "s2h-fx-checkpoint", "version": 1, "x": torch.arange(3)}
    for n in (1, 2, 3):
        store.save(good, n)
    assert names(tmp_path) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]  # keep=2

    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    store.save(good, 4)
    assert calls[:2] == ["fsync", "replace"]  # data on disk before the rename

    def dies_half_way(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        store.save(good, 5)
    assert names(tmp_path) == ["ckpt-00000003.pt", "ckpt-00000004.pt"]  # no 5, no temp file
    monkeypatch.undo()
    # a temporary file left by a process killed mid-write is never taken for a checkpoint
    (tmp_path / ".ckpt-00000006.pt.abc.tmp").write_bytes(b"PK half")
    loaded, path = store.load_latest()
    assert path.name == "ckpt-00000004.pt" and torch.equal(loaded["x"], torch.arange(3))


def test_every_checkpoint_damaged_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "ckpt-00000001.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        CheckpointStore(tmp_path).load_latest()
    assert CheckpointStore(tmp_path / "empty").load_latest() is None
    named = CheckpointStore(tmp_path / "run" / "model.pt")
    assert named.path(7) == tmp_path / "run" / "model-00000007.pt"


if __name__ == "__main__":
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    directory, mode, out_path = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    kill = int(sys.argv[4]) if mode == "kill" else None
    torch.save(result(*train(directory, resume=mode == "resume", kill_at=kill)), out_path)
