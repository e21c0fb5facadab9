"""The ``s2h-fx`` command line: inspect, export (.pt2 and .pt), errors and exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

import s2h_fx
from s2h_fx import cli

SMALL = ["--input-size", "3,32,32"]


@pytest.fixture
def pruners(monkeypatch: pytest.MonkeyPatch) -> list[s2h_fx.Pruner]:
    """The pruners the CLI builds, to compare its files against their hard networks."""
    built: list[s2h_fx.Pruner] = []

    def recording_prune_graph(*args: Any, **kwargs: Any) -> s2h_fx.Pruner:
        built.append(s2h_fx.prune_graph(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(cli, "prune_graph", recording_prune_graph)
    return built


def _no_s2h_references(archive: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        hits = [n for n in z.namelist() if b"s2h_fx" in z.read(n)]
    assert not hits, f"{archive.name} refers to s2h_fx in {hits}"


def test_inspect_prints_group_table_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "resnet18", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "prunable" in out and "frozen: reaches a model output" in out
    assert "resnet18: 12 prunable and 1 frozen groups" in out
    assert "GFLOPs" in out and "11.69 M params at input 1x3x32x32" in out


def test_export_pt2_reloads_with_torch_export_and_matches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pruners: list[s2h_fx.Pruner]
) -> None:
    out_file = tmp_path / "r18.pt2"
    assert cli.main(["export", "resnet18", "--budget", "0.5", "-o", str(out_file), *SMALL]) == 0
    out = capsys.readouterr().out
    assert "max relative error, pruned(x) vs pruner(x): 0.00e+00" in out
    assert f"wrote {out_file}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["r18.pt2"]  # no temporary file left
    _no_s2h_references(out_file)

    (pruner,) = pruners
    assert not pruner.training
    loaded = torch.export.load(out_file).module()
    for batch in (1, 3):  # the batch dimension was exported as dynamic
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), pruner(x), rtol=1e-5, atol=1e-5)
    n_params = sum(p.numel() for p in loaded.parameters())
    assert n_params < sum(p.numel() for p in torchvision.models.resnet18().parameters())


def test_export_pt_is_a_pickled_graph_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pruners: list[s2h_fx.Pruner]
) -> None:
    out_file = tmp_path / "mnv3.pt"
    args = ["export", "mobilenet_v3_small", "--budget", "0.5", "-o", str(out_file), *SMALL]
    assert cli.main(args) == 0
    assert "weights_only=False" in capsys.readouterr().out
    _no_s2h_references(out_file)

    loaded = torch.load(out_file, weights_only=False)
    assert isinstance(loaded, torch.fx.GraphModule) and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruners[0](x), rtol=1e-5, atol=1e-5)


def test_unknown_model_names_close_matches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "m.pt2"
    assert cli.main(["export", "resnet81", "--budget", "0.5", "-o", str(out_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'resnet81'")
    assert "did you mean resnet18" in err
    assert not out_file.exists()


@pytest.mark.parametrize("budget", ["0", "1.5", "nan"])
def test_bad_budget_exits_2_before_building(
    budget: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "m.pt2"
    assert cli.main(["export", "resnet18", "--budget", budget, "-o", str(out_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: budget must be in (0, 1]")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect"], "the following arguments are required: model"),
        (["inspect", "resnet18", "--input-size", "3,x"], "argument --input-size"),
        (["inspect", "resnet18", "--divisor", "0"], "argument --divisor"),
        (["export", "resnet18", "-o", "m.pt2"], "the following arguments are required: --budget"),
        (["export", "resnet18", "--budget", "0.5", "-o", "m.onnx"], "must end in one of .pt2"),
        (["export", "resnet18", "--budget", "0.5", "-o", "no/such/dir/m.pt2"], "does not exist"),
    ],
)
def test_bad_command_line_exits_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "--help"]) == 0
    assert "--budget" in capsys.readouterr().out


def test_library_error_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "m.pt2"
    args = ["export", "resnet18", "--budget", "0.5", "-o", str(out_file), "--input-size", "1,32,32"]
    assert cli.main(args) == 2  # resnet18 wants 3 input channels: InputError from tracing
    assert "error: running the traced graph on the example inputs failed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_failed_write_keeps_the_old_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out_file = tmp_path / "m.pt"
    out_file.write_bytes(b"previous")

    def disk_full(obj: object, f: object) -> None:
        f.write(b"half a model")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    args = ["export", "resnet18", "--budget", "0.5", "-o", str(out_file), "--input-size", "3,32,32"]
    assert cli.main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert out_file.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_disagreeing_export_exits_1_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "_max_rel_error", lambda ref, out: 0.5)
    out_file = tmp_path / "m.pt2"
    args = ["export", "resnet18", "--budget", "0.5", "-o", str(out_file), "--input-size", "3,32,32"]
    assert cli.main(args) == 1
    assert "disagrees with the pruner" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_console_script_runs(tmp_path: Path) -> None:
    script = shutil.which("s2h-fx", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "s2h_fx"]
    result = subprocess.run(
        [*command, "inspect", "resnet18", "--input-size", "3,32,32"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "prunable" in result.stdout and "resnet18: 12 prunable" in result.stdout
    assert "INFO s2h_fx" in result.stderr  # the CLI logs at INFO


def _image_folder(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 200, 30)).save(root / split / cls / "0.png")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--workers", "-1"], "argument --workers: expected a non-negative integer, got -1"),
        (["--workers", "two"], "argument --workers: expected a non-negative integer, got 'two'"),
        (["--device", "cuda"], "--device 'cuda': CUDA is not available on this machine"),
        (["--device", "cuda:0"], "--device 'cuda:0': CUDA is not available on this machine"),
        (["--device", "tpu7"], "--device 'tpu7'"),
        (["--resume"], "--resume and --checkpoint-every need --checkpoint-dir"),
    ],
)
def test_prune_bad_workers_or_device_exits_2_with_a_message(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    _image_folder(tmp_path)  # valid data: the errors must come from the options themselves
    args = ["prune", "resnet18", "--budget", "0.3", "--data-dir", str(tmp_path),
            "-o", str(tmp_path / "m.pt2"), "--epochs", "1", "--input-size", "3,32,32",
            "--no-progress", *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.pt2").exists()


def test_attention_option_reaches_prune_graph(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}
    real = cli.prune_graph

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "prune_graph", spy)
    assert cli.main(["inspect", "resnet18", "--attention", "heads", *SMALL]) == 0
    assert seen["attention"] == "heads"
    assert cli.main(["inspect", "resnet18", *SMALL]) == 0
    assert seen["attention"] == "auto"
    assert cli.main(["inspect", "resnet18", "--attention", "rows", *SMALL]) == 2
    assert "invalid choice: 'rows'" in capsys.readouterr().err
