"""Smoke test of benchmarks/latency_budget.py on a small model and input, eager runtime:
both studies run end to end and write rows whose figures hang together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency_budget.py"
COMMON = ["--models", "resnet18", "--runtime", "eager", "--input-size", "3,32,32",
          "--rounds", "3", "--warmup", "1"]


def load_script():
    return load_benchmark("latency_budget")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_accuracy_study(tmp_path: Path, capsys) -> None:
    bench, out = load_script(), tmp_path / "acc.jsonl"
    assert bench.main(["accuracy", *COMMON, "--settings", "2", "--cache-dir",
                       str(tmp_path / "cache"), "--out", str(out)]) == 0
    got = rows(out)
    assert [r["setting"] for r in got] == [0, 1]
    for r in got:
        assert 0 < r["predicted_ratio"] and 0 < r["measured_ratio"]
        assert r["ratio_error"] == pytest.approx(r["predicted_ratio"] / r["measured_ratio"] - 1)
        assert r["calibration"]["scale"] > 0 and len(r["calibration"]["points"]) == 3
        assert 0 < r["flops_ratio"] < 1 and r["env"]["torch"]
    assert "latency ratio (interleaved with dense)" in capsys.readouterr().out


def test_budget_study(tmp_path: Path) -> None:
    bench, out = load_script(), tmp_path / "budget.jsonl"
    assert bench.main(["budget", *COMMON, "--budget", "0.5", "--match-trials", "1", "--no-tp",
                       "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    got = {r["network"]: r for r in rows(out)}
    assert set(got) == {"dense", "s2h-latency", "s2h-flops"}
    assert got["dense"]["latency_ratio"] == 1 and got["dense"]["flops_ratio"] == 1
    for name in ("s2h-latency", "s2h-flops"):
        assert 0 < got[name]["flops_ratio"] < 1 and 0 < got[name]["params_ratio"] <= 1
        assert got[name]["latency_ratio"] > 0
    assert 0 < got["s2h-latency"]["predicted_ratio"] <= 0.5 + 0.01
