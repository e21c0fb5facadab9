"""timm models on the command line (``timm:NAME``): inspect, export, bench and prune
build them with random weights at their own input size (or the one given, or the
dataset's: a ViT is built for it), and every bad name or a missing timm exits 2 naming
what to do."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from s2h_fx import cli, models
from s2h_fx.errors import InputError

timm = pytest.importorskip("timm", reason="timm is in the [dev] extra")


def test_inspect_uses_the_models_own_input_size(capsys: pytest.CaptureFixture[str]) -> None:
    size = timm.create_model("test_vit").pretrained_cfg["input_size"]
    assert cli.main(["inspect", "timm:test_vit"]) == 0
    out = capsys.readouterr().out
    assert f"at input 1x{'x'.join(map(str, size))}" in out
    assert "timm:test_vit:" in out and "prunable" in out


def test_inspect_a_vit_shows_heads_and_head_widths(capsys: pytest.CaptureFixture[str]) -> None:
    """The default prunes a ViT's whole heads and their widths, and the table says which
    groups are head widths; a latency budget refuses attention='both' by name."""
    assert cli.main(["inspect", "timm:test_vit", "--input-size", "3,32,32"]) == 0
    assert "are head widths inside whole heads" in capsys.readouterr().out
    argv = ["export", "timm:test_vit", "--input-size", "3,32,32", "--attention", "both",
            "--budget", "0.5", "--budget-kind", "latency", "--runtime", "eager", "-o", "x.pt2"]
    assert cli.main(argv) == 2
    assert "attention='both'" in capsys.readouterr().err


def test_export_a_timm_vit_at_another_size_reloads_and_matches(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "vit.pt2"
    argv = ["export", "timm:test_vit", "--budget", "0.5", "--input-size", "3,32,32",
            "-o", str(out_file)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "input 1x3x32x32" in out and f"wrote {out_file}" in out
    torch.manual_seed(0)  # the CLI's seed: the same random weights
    dense = timm.create_model("test_vit", img_size=(32, 32)).eval()
    loaded = torch.export.load(out_file).module()
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters())
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 32, 32)).shape == dense(torch.randn(2, 3, 32, 32)).shape


def test_bench_a_timm_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = torch.get_num_threads()
    out = tmp_path / "b.json"
    try:
        assert cli.main(["bench", "timm:test_resnet", "--budget", "0.5", "--runtime", "eager",
                         "--no-tp", "--rounds", "2", "--warmup", "0", "--threads", "1",
                         "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(before)
    rows = json.loads(out.read_text())["rows"]
    size = list(timm.create_model("test_resnet").pretrained_cfg["input_size"])
    assert [r["network"] for r in rows] == ["dense", "s2h-fx"]
    assert all(r["input_size"] == size and r["model"] == "timm:test_resnet" for r in rows)
    assert 0.4 <= rows[1]["flops_ratio"] <= 0.505
    # the CPU runtimes' steps of 32 leave this small network's budget out of reach:
    # bench prunes in steps of 8 instead, says so, and records it
    assert all(r["divisor"] == 8 for r in rows)
    assert "out of reach in the runtimes' steps of 32" in caplog.text


@pytest.mark.parametrize(("argv", "message"), [
    (["inspect", "timm:vit_tiny_patch16_22"], "unknown model 'vit_tiny_patch16_22': not a timm "
                                               "model; did you mean vit_tiny_patch16_224"),
    (["inspect", "vit_tiny_patch16_224"], "a timm model is named timm:NAME"),
    # built for 30x30, then its patches do not divide it: the trace says so
    (["inspect", "timm:test_vit", "--input-size", "3,30,30"], "should be divisible by patch "
                                                             "size"),
])
def test_bad_timm_names_exit_2(argv: list[str], message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err.split("error: ", 1)[1], err


def test_missing_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    real_import = builtins.__import__

    def no_timm(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    assert cli.main(["inspect", "timm:test_vit"]) == 2
    assert "pip install 's2h-fx[timm]'" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"pip install 's2h-fx\[timm\]'"):
        models.default_input_size("timm:test_vit")  # read before the model is built


def test_image_size_only_where_the_model_takes_one() -> None:
    vit = models.load_model("timm:test_vit", image_size=(48, 48), num_classes=7)
    assert tuple(vit.patch_embed.img_size) == (48, 48) and vit.num_classes == 7
    cnn = models.load_model("timm:test_resnet", image_size=(48, 48))  # no img_size option
    assert cnn(torch.randn(1, 3, 48, 48)).shape == (1, 1000)
    assert models.default_input_size("resnet18") == (3, 224, 224)
    models.load_model("timm:test_resnet.r160_in1k")  # a pretrained tag is accepted
    assert models.default_input_size("timm:test_resnet.r160_in1k") == (3, 160, 160)


def test_prune_builds_a_timm_vit_for_the_datasets_images(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_demo import PRUNE_FAST, make_image_folder

    root = make_image_folder(tmp_path / "imgs")
    out_file = tmp_path / "vit.pt2"
    argv = ["prune", "timm:test_vit", "--budget", "0.5", "--data-dir", str(root),
            "-o", str(out_file), *PRUNE_FAST]  # 32x32 images: test_vit is made for 160x160
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "timm:test_vit (2 classes, random weights) on image folder" in out
    assert "at 3x32x32" in out and f"wrote {out_file}" in out
    loaded = torch.export.load(out_file).module()
    with torch.no_grad():
        assert loaded(torch.randn(3, 3, 32, 32)).shape == (3, 2)


def test_bench_keeps_a_divisor_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--divisor 32 given: the budget out of reach is an error (exit 2), not a fallback."""
    before = torch.get_num_threads()
    try:
        code = cli.main(["bench", "timm:test_resnet", "--budget", "0.5", "--runtime", "eager",
                         "--no-tp", "--divisor", "32", "--rounds", "2", "--warmup", "0",
                         "--threads", "1", "--json", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(before)
    assert code == 2
    assert "budget 0.5 asks for" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
