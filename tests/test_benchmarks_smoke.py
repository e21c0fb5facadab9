"""Smoke test of benchmarks/zoo.py: two small models, a small input, one process each."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from helpers import load_benchmark

ZOO = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
MODELS = ["resnet18", "mobilenet_v3_small"]


def load_zoo():
    return load_benchmark("zoo")


def test_zoo_two_small_models(tmp_path, capsys):
    zoo = load_zoo()
    out = tmp_path / "zoo.jsonl"
    rc = zoo.main(["--models", ",".join(MODELS), "--input-size", "3,64,64",
                   "--out", str(out), "--jobs", "2", "--timeout", "120"])
    assert rc == 0

    records = [json.loads(line) for line in out.read_text().splitlines()]
    rows = [r for r in records if not r.get("summary")]
    summaries = [r for r in records if r.get("summary")]
    assert sorted(r["model"] for r in rows) == sorted(MODELS)
    for r in rows:
        assert r["traced"] is True, r
        assert r["exported"] is True, r
        assert r["max_rel_err"] is not None and r["max_rel_err"] < 1e-5, r
        assert r["ok"] is True, r
        assert r["groups"] > 0 and 0 < r["flops_ratio"] < 1, r
        assert r["input_size"] == [3, 64, 64], r
    assert len(summaries) == 1
    assert summaries[0]["models"] == 2 and summaries[0]["torch_pruning"]

    printed = capsys.readouterr().out
    assert "s2h-fx: 2/2 exported == hard network; Torch-Pruning: " in printed
    assert printed.strip().splitlines()[-1].endswith("/2 pruned and ran")
    for name in MODELS:
        assert name in printed


def test_table_and_summary_from_rows():
    zoo = load_zoo()
    ok = {**zoo.empty_row("a"), "traced": True, "groups": 3, "frozen": 1, "exported": True,
          "max_rel_err": 0.0, "ok": True, "flops_ratio": 0.5, "seconds": 1.0, "tp_ok": True,
          "tp_flops_ratio": 0.51, "tp_seconds": 0.2}
    bad = {**zoo.empty_row("b"), "error": "TraceError: nope", "tp_error": "timeout after 300 s"}
    table = zoo.format_table([ok, bad])
    assert table.splitlines()[0].split()[:3] == ["model", "traced", "groups"]
    assert "0.500" in table and "0.510" in table
    assert zoo.summary_line([ok, bad]) == (
        "s2h-fx: 1/2 exported == hard network; Torch-Pruning: 1/2 pruned and ran")
    assert "b: TraceError: nope" in zoo.format_failures([ok, bad])


def test_default_input_size():
    zoo = load_zoo()
    assert zoo.default_input_size("inception_v3") == (3, 299, 299)
    assert zoo.default_input_size("vit_h_14") == (3, 224, 224)  # weights=None builds 224
    assert zoo.default_input_size("resnet18") == (3, 224, 224)


def test_bisect_tp_meets_target():
    zoo = load_zoo()
    calls = []

    def trial(ratio):
        calls.append(ratio)
        return (1 - ratio) ** 2.2, ratio

    ratio, (flops_ratio, _) = zoo.bisect_tp(trial, 0.4)
    assert len(calls) <= zoo.TP_TRIALS
    assert abs(flops_ratio - 0.4) < 0.02


def test_resume_keeps_previous_rows(tmp_path, capsys):
    zoo = load_zoo()
    out = tmp_path / "zoo.jsonl"
    done = {**zoo.empty_row("resnet18"), "exported": True, "max_rel_err": 0.0, "ok": True}
    out.write_text(json.dumps(done) + "\n" + json.dumps({"summary": True}) + "\n")
    assert zoo.main(["--models", "resnet18", "--out", str(out), "--resume"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("model") for r in records if not r.get("summary")] == ["resnet18"]
    assert sum(bool(r.get("summary")) for r in records) == 1
    assert "s2h-fx: 1/1 exported == hard network" in capsys.readouterr().out


def test_prune_time_table(tmp_path, capsys):
    """benchmarks/prune_time.py on a small model: one JSON line per model, both tools
    timed, Torch-Pruning matched to s2h-fx's FLOPs."""
    spec = importlib.util.spec_from_file_location(
        "benchmarks_prune_time", ZOO.parent / "prune_time.py")
    assert spec is not None and spec.loader is not None
    prune_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prune_time)
    out = tmp_path / "t.jsonl"
    assert prune_time.main(["--models", "resnet18", "--input-size", "3,32,32", "--repeat", "1",
                            "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["model"] == "resnet18" and row["tp_runs"] is True
    assert row["s2h_flops_ratio"] <= 0.5 + 0.005
    assert abs(row["tp_flops_ratio"] - row["s2h_flops_ratio"]) < 0.05
    for key in ("s2h_median_s", "tp_median_s", "tp_copy_median_s"):
        assert row[key] > 0
    assert "resnet18" in capsys.readouterr().out
