"""benchmarks/timm_zoo.py: the timm coverage benchmark runs end to end on tiny timm
test models, and its pure parts (sample choice, attention detection, error types,
summary) do what they say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torch import nn

timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timm_zoo  # noqa: E402

ROW_KEYS = {
    "model", "input_size", "budget", "trace", "traced", "groups", "frozen", "exported", "ok",
    "max_rel_err", "flops_ratio", "within_budget", "seconds", "error", "error_type",
    "tp_ok", "tp_flops_ratio", "tp_seconds", "tp_error",
}


def test_benchmark_on_tiny_timm_models(tmp_path, capsys) -> None:
    out = tmp_path / "timm.jsonl"
    models = ["test_resnet", "test_vit"]
    rc = timm_zoo.main(["--models", ",".join(models), "--input-size", "3,32,32", "--jobs", "2",
                        "--timeout", "120", "--tp-trials", "1", "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    rows = {r["model"]: r for r in records if not r.get("summary")}
    assert set(rows) == set(models)
    for row in rows.values():
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["input_size"] == [3, 32, 32] and row["budget"] == 0.5
    resnet = rows["test_resnet"]
    assert resnet["ok"] and resnet["trace"] == "fx" and resnet["error_type"] is None
    assert resnet["max_rel_err"] < 1e-5 and resnet["groups"] > 0
    assert 0 < resnet["flops_ratio"] <= 0.5 + timm_zoo.BUDGET_SLACK and resnet["within_budget"]
    assert resnet["attention_pruned"] is False  # a CNN has no attention
    assert resnet["tp_ok"] and 0 < resnet["tp_flops_ratio"] < 1
    # test_vit resizes its position embedding in forward (dynamic_img_size): plain fx
    # stops at resample_abs_pos_embed's size checks (timm registers it as not
    # traceable); traced with the example's values, those checks are decided by the
    # example's sizes and guarded, and nothing is left whole
    vit = rows["test_vit"]
    assert vit["trace"] == "fx, sizes of the example" and not vit["trace_autowrap"]
    assert vit["ok"] and vit["max_rel_err"] < 1e-5 and vit["attention_pruned"]
    summary = next(r for r in records if r.get("summary"))
    assert summary["models"] == 2 and summary["timm"] == timm.__version__
    assert summary["s2h_ok"] == sum(r["ok"] for r in rows.values())
    assert summary["tp_ok"] == sum(r["tp_ok"] for r in rows.values())
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    assert header[:6] == ["model", "input", "trace", "groups", "frozen", "exp==hard"]
    assert {"attn", "TP", "FLOPs", "error"} <= set(header)
    assert any(line.startswith("test_resnet") and " fx " in line for line in table.splitlines())
    assert "Torch-Pruning: " in table and "s2h-fx: " in table


def test_resume_keeps_rows_and_runs_only_the_others(tmp_path, monkeypatch) -> None:
    out = tmp_path / "timm.jsonl"
    out.write_text(json.dumps({"model": "test_resnet", "ok": True, "tp_ok": True}) + "\n")
    ran: list[list[str]] = []

    def fake_sweep(names: list[str], *args, **kwargs) -> list[dict]:
        ran.append(names)
        rows = [{"model": n, "ok": False, "error": "TraceError: x"} for n in names]
        for row in rows:
            kwargs["on_row"](row)
        return rows

    monkeypatch.setattr(timm_zoo, "sweep", fake_sweep)
    timm_zoo.main(["--models", "test_resnet,test_vit", "--resume", "--out", str(out)])
    assert ran == [["test_vit"]]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("model") for r in records] == ["test_resnet", "test_vit", None]
    assert records[-1]["s2h_ok"] == 1 and records[-1]["s2h_failures"] == {"TraceError": 1}


def test_sample_is_one_smallest_model_per_module_without_test_configs(monkeypatch) -> None:
    modules = ["resnet", "vision_transformer", "mobilenetv3"]
    monkeypatch.setattr(timm, "list_modules", lambda: modules)
    # a fake parameter count: longer names are bigger; a model that fails to build is -1
    monkeypatch.setattr(timm_zoo, "param_counts",
                        lambda names: {n: -1 if n == "resnet10t" else len(n) for n in names})
    sample = timm_zoo.sample_models()
    assert len(sample) == 3 and sample == sorted(sample)
    owner = {m: [n for n in sample if n in timm.list_models(module=m)] for m in modules}
    assert all(len(v) == 1 for v in owner.values()), owner
    assert not any(n.startswith("test_") for n in sample)
    for m, (name,) in owner.items():
        candidates = [n for n in timm.list_models(module=m, exclude_filters=["test_*"])
                      if n != "resnet10t"]
        assert len(name) == min(len(n) for n in candidates)
        assert name == min(n for n in candidates if len(n) == len(name))  # ties: by name


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp = Attention(), nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
        self.proj = nn.Linear(8, 8)  # a 'proj' outside attention
        # timm's MultiQueryAttention2d wraps each projection in its role: attn.query.proj
        self.mqa = nn.Module()
        self.mqa.query, self.mqa.norm = nn.Module(), nn.Module()
        self.mqa.query.proj, self.mqa.norm.proj = nn.Linear(8, 8), nn.Linear(8, 8)


def test_attention_outputs_are_recognised_by_parent() -> None:
    block = Block()
    assert timm_zoo.is_attention_output("attn.qkv.weight[0]", block)
    assert timm_zoo.is_attention_output("attn.qkv:out", block)  # how groups name producers
    assert not timm_zoo.is_attention_output("attn.qkv:in", block)
    assert not timm_zoo.is_attention_output("mlp.0:out", block)
    assert timm_zoo.is_attention_output("attn.proj.weight[0]", block)
    assert not timm_zoo.is_attention_output("attn.qkv.weight[1]", block)  # input channels
    assert not timm_zoo.is_attention_output("proj.weight[0]", block)
    assert not timm_zoo.is_attention_output("mlp.0.weight[0]", block)
    assert timm_zoo.is_attention_output("mha.in_proj_weight[0]", block)
    block.mqa.__class__ = type("MultiQueryAttention2d", (nn.Module,), {})
    assert timm_zoo.is_attention_output("mqa.query.proj:out", block)
    assert not timm_zoo.is_attention_output("mqa.norm.proj:out", block)  # not a role
    assert not timm_zoo.is_attention_output("mlp.query.proj:out", Block())  # no attention


@pytest.mark.parametrize("row, kind", [
    ({"ok": True}, None),
    ({"error": "timeout after 120 s"}, "timeout"),
    ({"error": "TraceError: torch.fx could not trace X"}, "TraceError"),
    ({"error": "BudgetError: budget 0.5 asks for"}, "BudgetError"),
    ({"error": "subprocess exit -9: killed"}, "crash"),
    ({"exported": True, "max_rel_err": 0.1}, "mismatch"),
])
def test_error_type(row, kind) -> None:
    assert timm_zoo.error_type(row) == kind


def test_tp_trials_below_one_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        timm_zoo.parse_args(["--tp-trials", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert timm_zoo.parse_args(["--tp-trials", "2"]).tp_trials == 2
