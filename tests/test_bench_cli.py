"""``s2h-fx bench``: end to end on a small input, and every bad input exits 2 with a message."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from s2h_fx import bench, cli, deploy

from helpers import load_benchmark

FAST = ["--input-size", "3,32,32", "--rounds", "3", "--warmup", "1", "--threads", "1"]
ROW_FIELDS = {"model", "runtime", "batch", "precision", "device", "network", "input_size",
              "budget", "divisor", "flops", "flops_ratio", "params", "median_ms", "p90_ms",
              "throughput", "speedup", "efficiency", "max_rel_error", "tolerance", "rounds",
              "warmup", "samples", "info", "env"}
ENV_FIELDS = {"torch", "torch_threads", "load_average", "cpu", "cpu_count", "onnxruntime"}


@pytest.fixture
def threads() -> Any:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_bench_end_to_end_writes_every_field(tmp_path: Path, threads: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, lines, plot = tmp_path / "b.json", tmp_path / "b.jsonl", tmp_path / "b.png"
    argv = ["bench", "resnet18", "--budget", "0.5", "--runtime", "eager,onnxruntime",
            "--batch", "1,2", "--json", str(out), "--jsonl", str(lines), "--plot", str(plot),
            *FAST]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    # 2 runtimes x 2 batches x 3 networks, in that order
    assert [(r["runtime"], r["batch"], r["network"]) for r in rows] == [
        (rt, b, n) for rt in ("eager", "onnxruntime") for b in (1, 2)
        for n in ("dense", "s2h-fx", "torch-pruning")]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert ENV_FIELDS <= set(r["env"]) and r["env"]["torch_threads"] == 1
        assert r["samples"] == 3 and r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"]
        assert r["throughput"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["flops_ratio"])
        assert r["max_rel_error"] <= r["tolerance"] == deploy.TOLERANCE["fp32"]
    by = {(r["runtime"], r["batch"], r["network"]): r for r in rows}
    for rt in ("eager", "onnxruntime"):
        dense = by[rt, 1, "dense"]
        assert dense["speedup"] == 1.0 and dense["flops_ratio"] == 1.0
        s2h, tp = by[rt, 1, "s2h-fx"], by[rt, 1, "torch-pruning"]
        assert 0.45 <= s2h["flops_ratio"] <= 0.505  # the budget, met from below
        assert abs(tp["flops_ratio"] - s2h["flops_ratio"]) < 0.05  # bisected to the same FLOPs
        assert tp["params"] < dense["params"] and s2h["params"] < dense["params"]
        assert by[rt, 2, "s2h-fx"]["flops"] == 2 * s2h["flops"]
        assert by[rt, 1, "s2h-fx"]["median_ms"] != by[rt, 2, "s2h-fx"]["median_ms"]
    assert by["onnxruntime", 1, "dense"]["info"]["providers"] == ["CPUExecutionProvider"]
    assert [json.loads(line) for line in lines.read_text().splitlines()] == rows
    assert doc["environment"]["device"] == "cpu"
    assert plot.is_file() and plot.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "onnxruntime, batch 2, fp32, cpu" in text and "effic." in text


def test_bench_a_pruned_file(tmp_path: Path, threads: Any,
                             capsys: pytest.CaptureFixture[str]) -> None:
    pt2 = tmp_path / "r18.pt2"
    assert cli.main(["export", "resnet18", "--budget", "0.4", "--input-size", "3,32,32",
                     "-o", str(pt2)]) == 0
    out = tmp_path / "p.json"
    assert cli.main(["bench", "resnet18", "--pruned", str(pt2), "--no-tp", "--json", str(out),
                     *FAST]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["network"] for r in rows] == ["dense", "s2h-fx"]
    assert rows[1]["pruned_file"] == str(pt2) and rows[1]["budget"] is None
    assert 0.35 <= rows[1]["flops_ratio"] <= 0.405
    # the file was exported at 3x32x32 with a dynamic batch only: another size is refused
    assert cli.main(["bench", "resnet18", "--pruned", str(pt2), "--no-tp",
                     "--input-size", "3,40,40", "--rounds", "1"]) == 2
    assert "pass the --input-size it was pruned at" in capsys.readouterr().err


def test_bench_times_s2h_fx_again_where_torch_pruning_misses_the_flops(
        tmp_path: Path, threads: Any, caplog: pytest.LogCaptureFixture) -> None:
    """regnet_y_400mf at 0.2: Torch-Pruning leaves the grouped convolutions whole and its
    bisection stops well above s2h-fx's FLOPs; efficiency falls with FLOPs, so the bench
    adds s2h-fx at Torch-Pruning's FLOPs to compare with."""
    out = tmp_path / "g.json"
    argv = ["bench", "regnet_y_400mf", "--budget", "0.2", "--divisor", "8", "--runtime",
            "eager", "--batch", "1", "--json", str(out), *FAST]
    with caplog.at_level("WARNING", logger="s2h_fx.bench"):
        assert cli.main(argv) == 0
    rows = {r["network"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "s2h-fx", "torch-pruning", bench.TP_MATCHED]
    s2h, tp, again = rows["s2h-fx"], rows["torch-pruning"], rows[bench.TP_MATCHED]
    assert s2h["flops_ratio"] <= 0.2 < 0.25 < tp["flops_ratio"]
    assert tp["tp_flops_gap"] == pytest.approx(tp["flops"] / s2h["flops"] - 1)
    # the second s2h-fx network is pruned to Torch-Pruning's FLOPs, from below
    assert 0.95 * tp["flops_ratio"] <= again["flops_ratio"] <= tp["flops_ratio"]
    assert again["efficiency"] == pytest.approx(again["speedup"] * again["flops_ratio"])
    assert again["max_rel_error"] <= again["tolerance"]
    assert f"timing s2h-fx at {again['flops_ratio']:.3f} too" in caplog.text


@pytest.mark.parametrize("case", ["pruned", "cannot prune", "unreached"])
def test_no_second_s2h_fx_network_where_it_cannot_be_made(
        case: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --pruned network's widths were trained (no one-shot twin); a prune that fails,
    or Torch-Pruning left at full FLOPs, is a warning and the bench goes on."""
    import argparse

    def refuse(*a: Any, **k: Any) -> Any:
        raise RuntimeError("no prune here")

    monkeypatch.setattr(bench, "_one_shot", refuse)
    args = argparse.Namespace(pruned=Path("x.pt2") if case == "pruned" else None)
    flops = {"dense": 100.0, "s2h-fx": 30.0,
             "torch-pruning": 100.0 if case == "unreached" else 52.0}
    networks: dict[str, Any] = {}
    with caplog.at_level("WARNING", logger="s2h_fx.bench"):
        bench._match_tp(torch.nn.Identity(), torch.zeros(1), args, networks, flops)
    assert networks == {} and bench.TP_MATCHED not in flops
    reached = "1.000" if case == "unreached" else "0.520"
    assert f"Torch-Pruning reached FLOPs ratio {reached}, not s2h-fx's 0.300" in caplog.text
    assert ("cannot be pruned to it: RuntimeError: no prune here" in caplog.text) == (
        case == "cannot prune")


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["bench", "resnet18", "--budget", "0.5"]
    assert "unknown runtime 'tvm'; choose from eager, compile, onnxruntime, tensorrt" in _error(
        [*base, "--runtime", "eager,tvm"], capsys)
    assert "batch sizes must be positive integers, got '0'" in _error(
        [*base, "--batch", "1,0"], capsys)
    assert "bench needs --budget" in _error(["bench", "resnet18"], capsys)
    assert "budget must be in (0, 1]" in _error(["bench", "resnet18", "--budget", "2"], capsys)
    assert "unknown model 'resnet19'" in _error(["bench", "resnet19", "--budget", "0.5",
                                                  "--no-tp"], capsys)
    assert "precision 'fp16' needs a CUDA device" in _error(
        [*base, "--precision", "fp16"], capsys)
    assert "is not a file" in _error(["bench", "resnet18", "--pruned",
                                      str(tmp_path / "none.pt2")], capsys)
    assert "its directory does not exist" in _error(
        [*base, "--json", str(tmp_path / "no" / "b.json")], capsys)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _error([*base, "--runtime", "tensorrt"], capsys)
    assert "runtime 'tensorrt' needs a CUDA device" in err and "no CUDA device" in err
    assert "CUDA is not available" in _error([*base, "--device", "cuda"], capsys)

    real = importlib.import_module

    def no_ort(name: str, *a: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(name, *a)

    monkeypatch.setattr(deploy.importlib, "import_module", no_ort)
    assert "pip install 's2h-fx[onnx]'" in _error([*base, "--runtime", "onnxruntime"], capsys)


# ---- benchmarks/latency.py -----------------------------------------------------------
def _latency() -> Any:
    return load_benchmark("latency")


def test_latency_resume_runs_only_what_is_missing(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    lat = _latency()
    out = tmp_path / "l.jsonl"
    row = {"budget": 0.5, "divisor": 8, "precision": "fp32", "device": "cpu", "median_ms": 2.0,
           "flops_ratio": 1.0, "efficiency": 1.0, "one_shot": "share"}
    rows = [{**row, "model": "resnet18", "runtime": "eager", "batch": 1, "network": "dense"},
            {**row, "model": "resnet18", "runtime": "eager", "batch": 1, "network": "s2h-fx",
             "median_ms": 1.0, "flops_ratio": 0.5, "efficiency": 1.0},
            {**row, "model": "resnet18", "runtime": "eager", "batch": 1,
             "network": "torch-pruning", "median_ms": 1.5, "flops_ratio": 0.6,
             "efficiency": 0.8},
            {**row, "model": "resnet18", "runtime": "eager", "batch": 1,
             "network": "s2h-fx@tp", "median_ms": 1.1, "flops_ratio": 0.59,
             "efficiency": 1.07},
            {**row, "model": "resnet18", "runtime": "onnxruntime", "batch": 32,
             "network": "dense"}]
    # a row written before the rule was a choice: the per-cost rule's
    old = {k: v for k, v in row.items() if k != "one_shot"}
    rows.append({**old, "model": "resnet50", "runtime": "eager", "batch": 1, "network": "dense"})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut sho')
    args = lat.parse_args(["--models", "resnet18,resnet50", "--budgets", "0.5",
                           "--batches", "1,32", "--one-shot", "share", "--out", str(out),
                           "--resume"])
    done = lat.done_keys(lat.read_rows(out))
    jobs = lat.todo(args, ["eager", "onnxruntime"], done)
    # resnet18 lacks (eager, 32) and (onnxruntime, 1); resnet50 lacks everything of share
    assert jobs == [("resnet18", 0.5, 8, "share", ["eager", "onnxruntime"], [32, 1]),
                    ("resnet50", 0.5, 8, "share", ["eager", "onnxruntime"], [1, 32])]
    both = lat.parse_args(["--models", "resnet50", "--budgets", "0.5", "--batches", "1",
                           "--one-shot", "share,per-cost", "--out", str(out), "--resume"])
    assert lat.todo(both, ["eager"], done) == [("resnet50", 0.5, 8, "share", ["eager"], [1])]
    default = lat.parse_args(["--models", "resnet50", "--budgets", "0.5", "--batches", "1",
                              "--out", str(out), "--resume"])
    assert default.one_shot == ["per-cost"] and lat.todo(default, ["eager"], done) == []
    argv = lat.bench_argv(args, *jobs[0])
    assert argv[:2] == ["bench", "resnet18"] and "--jsonl" in argv
    parsed = cli._build_parser().parse_args(argv)  # bench accepts it
    assert parsed.batch == [32, 1] and parsed.one_shot == "share"
    assert lat.main(["--table", "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split() == ["resnet18", "0.5", "8", "share", "eager", "1", "2.00",
                                "1.00", "0.500", "1.00", "1.50", "0.600", "0.80"]
    # where Torch-Pruning missed the FLOPs: s2h-fx at its FLOPs, on the next line
    assert table[3].split() == ["resnet18", "0.5", "8", "share@tp", "eager", "1", "2.00",
                                "1.10", "0.590", "1.07", "1.50", "0.600", "0.80"]
    assert table[-1].split()[:5] == ["resnet50", "0.5", "8", "per-cost", "eager"]
