"""Runtimes for the emitted graph (s2h_fx.deploy) and Torch-Pruning at the same FLOPs
(s2h_fx.tp_match). TensorRT tests are marked gpu; what TensorRT needs short of a
device (argument checks, the torch.export program it compiles) runs in the default suite."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import s2h_fx
from s2h_fx import cli, deploy
from s2h_fx.deploy import Deployed, DeployError
from s2h_fx.measure import count_flops
from s2h_fx.tp_match import bisect_ratio, find_classifier, match_flops


class SmallCNN(nn.Module):
    """conv-bn-relu stem, a residual block, pooled linear head: one group per join."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                                   nn.Conv2d(48, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def _randomise_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomise_bn(SmallCNN())
    x = torch.randn(2, 3, 16, 16)
    return s2h_fx.prune_graph(model, 0.5, (x,)).export(), x


@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.resnet18())
    x = torch.randn(2, 3, 64, 64)
    return s2h_fx.prune_graph(model, 0.5, (x,)).export(), x


def _assert_matches(pruned: nn.Module, x: torch.Tensor, runtime: str, **kw: Any) -> Deployed:
    d = deploy.deploy(pruned, x, runtime, **kw)
    with torch.no_grad():
        ref = pruned(x)
    out = d.run()
    out = out[0] if isinstance(out, list) else out
    assert out.shape == ref.shape
    # independent of check(): fp32 runtimes reorder sums only
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert deploy.check(d, pruned, x) <= deploy.TOLERANCE["fp32"]
    return d


# ---- equality with the emitted graph ---------------------------------------------
def test_small_cnn_eager_compile_onnxruntime_equal_the_emitted_graph(small: Any) -> None:
    pruned, x = small
    for runtime in ("eager", "compile", "onnxruntime"):
        _assert_matches(pruned, x, runtime)


def test_resnet18_onnxruntime_equals_the_emitted_graph(resnet18: Any) -> None:
    d = _assert_matches(*resnet18, "onnxruntime", threads=1)
    assert d.info["providers"] == ["CPUExecutionProvider"]


@pytest.mark.slow  # inductor compiles resnet18 for about a minute on 2 cores
def test_resnet18_compile_equals_the_emitted_graph(resnet18: Any) -> None:
    _assert_matches(*resnet18, "compile")


def test_onnx_torchscript_exporter_fallback(small: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without onnxscript, torch's TorchScript exporter writes the model."""
    pruned, x = small
    real = importlib.import_module

    def no_onnxscript(name: str, *a: Any) -> Any:
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real(name, *a)

    monkeypatch.setattr(deploy.importlib, "import_module", no_onnxscript)
    d = _assert_matches(pruned, x, "onnxruntime")
    assert d.info["exporter"] == "torchscript"


def test_check_catches_a_wrong_network(small: Any) -> None:
    pruned, x = small
    good = deploy.deploy(pruned, x, "eager")
    assert deploy.check(good, pruned, x) == 0.0
    bad = Deployed("eager", "fp32", "cpu", lambda t: pruned(t) * 1.01, x)
    with pytest.raises(DeployError, match="disagrees with the eager module"):
        deploy.check(bad, pruned, x)


def test_deploy_leaves_the_callers_module_alone(small: Any) -> None:
    pruned, x = small
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    deploy.deploy(pruned, x, "eager")
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


def test_max_rel_error_pairs_outputs() -> None:
    a = torch.tensor([1.0, -2.0])
    assert deploy.max_rel_error(a, a + torch.tensor([0.0, 0.5])) == pytest.approx(0.25)
    assert deploy.max_rel_error([a, a], [a]) == float("inf")
    assert deploy.max_rel_error(a, a[:1]) == float("inf")


# ---- availability and bad arguments -----------------------------------------------
def _fail_import(monkeypatch: pytest.MonkeyPatch, module: str, exc: BaseException) -> None:
    real = importlib.import_module

    def fake(name: str, *a: Any) -> Any:
        if name == module:
            raise exc
        return real(name, *a)

    monkeypatch.setattr(deploy.importlib, "import_module", fake)


def test_unknown_runtime_and_precision() -> None:
    with pytest.raises(DeployError, match="unknown runtime 'tvm'; choose from eager"):
        deploy.check_runtime("tvm")
    with pytest.raises(DeployError, match="unknown precision 'int8'"):
        deploy.check_runtime("eager", precision="int8")
    with pytest.raises(DeployError, match="precision 'fp16' needs a CUDA device"):
        deploy.check_runtime("onnxruntime", "cpu", "fp16")


def test_onnxruntime_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_import(monkeypatch, "onnxruntime", ImportError("No module named 'onnxruntime'"))
    with pytest.raises(DeployError, match=r"pip install 's2h-fx\[onnx\]'"):
        deploy.check_runtime("onnxruntime")
    assert "onnxruntime" not in deploy.available_runtimes()


def test_tensorrt_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeployError, match="'tensorrt' needs a CUDA device: this machine has no"):
        deploy.check_runtime("tensorrt", "cpu")
    with pytest.raises(DeployError, match="CUDA is not available"):
        deploy.check_runtime("eager", "cuda")


def test_tensorrt_missing_or_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _fail_import(monkeypatch, "torch_tensorrt", ImportError("No module named 'torch_tensorrt'"))
    with pytest.raises(DeployError, match=r"pip install 's2h-fx\[trt\]'"):
        deploy.check_runtime("tensorrt", "cuda")
    # what torch-tensorrt 2.14.0 raises when TensorRT's libraries are absent
    _fail_import(monkeypatch, "torch_tensorrt",
                 Exception("import error when try to import _TensorRTProxyModule, got error "
                           "Could not find libnvinfer.so.11"))
    with pytest.raises(DeployError, match="cannot load TensorRT.*libnvinfer"):
        deploy.check_runtime("tensorrt", "cuda")
    with pytest.raises(DeployError, match="'bf16' is not supported with 'tensorrt'"):
        deploy.check_runtime("tensorrt", "cuda", "bf16")


def test_tensorrt_version_must_match_torch() -> None:
    minor = ".".join(torch.__version__.split(".")[:2])
    deploy._check_trt_version(type("T", (), {"__version__": f"{minor}.0"}))
    with pytest.raises(DeployError, match=f"install torch-tensorrt=={minor}"):
        deploy._check_trt_version(type("T", (), {"__version__": "2.1.0"}))


# ---- what TensorRT compiles, without a device -------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_for_tensorrt_is_the_static_program(small: Any, precision: str) -> None:
    pruned, x = small
    module, xc = deploy._cast(pruned, x, "cpu", precision)
    program = deploy.export_for_tensorrt(module, xc)
    (placeholder,) = [n for n in program.graph.nodes
                      if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    val = placeholder.meta["val"]
    assert tuple(val.shape) == tuple(x.shape) and val.dtype == deploy.PRECISIONS[precision]
    weights = [p for p in program.state_dict.values() if p.is_floating_point()]
    assert weights and all(w.dtype == deploy.PRECISIONS[precision] for w in weights)
    if precision == "fp32":
        with torch.no_grad():
            assert torch.allclose(program.module()(x), pruned(x), rtol=1e-5, atol=1e-6)


# ---- .pt2 files ------------------------------------------------------------------
def test_load_program_round_trip_and_bad_file(small: Any, tmp_path: Path) -> None:
    pruned, x = small
    path = tmp_path / "small.pt2"
    cli._save(pruned, x, path)
    loaded = deploy.load_program(path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), pruned(x), atol=1e-6)
    assert not loaded.training and sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in pruned.parameters())
    assert count_flops(loaded, x) == count_flops(pruned, x)
    _assert_matches(loaded, x, "onnxruntime")
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(DeployError, match="cannot load .*junk.pt2"):
        deploy.load_program(tmp_path / "junk.pt2")


# ---- Torch-Pruning at the same FLOPs ----------------------------------------------
def test_bisect_ratio_converges_on_a_monotone_curve() -> None:
    calls: list[float] = []

    def trial(r: float) -> tuple[float, str]:
        calls.append(r)
        return (1 - r) ** 3, f"r={r}"  # steeper than the (1 - r)^2 first guess

    ratio, flops, result, run = bisect_ratio(trial, 0.4, trials=20, tol=1e-3)
    assert abs(flops - 0.4) < 1e-3 and abs(ratio - (1 - 0.4 ** (1 / 3))) < 1e-3
    assert result == f"r={ratio}" and run == len(calls) and run > 1
    _, flops2, _, run2 = bisect_ratio(trial, 0.4, trials=2, tol=1e-6)
    assert run2 == 2 and abs(flops2 - 0.4) == min(abs((1 - r) ** 3 - 0.4) for r in calls[-2:])


def test_match_flops_small_cnn_rounds_widths(small: Any) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(SmallCNN())
    x = torch.randn(1, 3, 16, 16)
    assert find_classifier(model, x) == "head"
    match = match_flops(model, x, 0.5, round_to=8)
    assert abs(match.flops_ratio - 0.5) < 0.1
    assert match.flops_ratio == pytest.approx(count_flops(match.model, x) / count_flops(model, x))
    convs = [m for m in match.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert match.model.head.out_features == 10  # the classifier is left whole
    assert sum(c.out_channels for c in convs) < 32 + 48 + 32


# ---- on a GPU ----------------------------------------------------------------------
def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


def _need_tensorrt() -> None:
    _need_cuda()
    try:
        deploy.check_runtime("tensorrt", "cuda")
    except DeployError as exc:
        pytest.skip(f"TensorRT cannot run here: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_equals_the_emitted_graph(small: Any, resnet18: Any, precision: str) -> None:
    _need_tensorrt()
    for pruned, x in (small, resnet18):
        d = deploy.deploy(pruned, x, "tensorrt", device="cuda", precision=precision)
        assert deploy.check(d, pruned, x) <= deploy.TOLERANCE[precision]
        assert d.info["torch_tensorrt"].startswith(".".join(torch.__version__.split(".")[:2]))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_eager_and_compile(small: Any, precision: str) -> None:
    _need_cuda()
    pruned, x = small
    for runtime in ("eager", "compile"):
        d = deploy.deploy(pruned, x, runtime, device="cuda", precision=precision)
        assert d.x.is_cuda and d.x.dtype == deploy.PRECISIONS[precision]
        assert deploy.check(d, pruned, x) <= deploy.TOLERANCE[precision]
