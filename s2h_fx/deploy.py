"""Runtimes for the emitted network: the last pass turns a ``GraphModule`` into something to time.

=============  ===========================================================  ==========
runtime        how                                                           devices
=============  ===========================================================  ==========
eager          the module itself                                             cpu, cuda
compile        ``torch.compile`` (inductor; ``mode`` e.g. max-autotune)      cpu, cuda
onnxruntime    ``torch.onnx.export`` -> ``onnxruntime.InferenceSession``     cpu, cuda
tensorrt       ``torch.export`` -> ``torch_tensorrt.dynamo.compile``          cuda
=============  ===========================================================  ==========

Precision: ``fp32`` everywhere; ``fp16`` and ``bf16`` (not onnxruntime, not
tensorrt) on CUDA only, as half weights *and* inputs (torch-tensorrt 2.14's
dynamo path ignores ``enabled_precisions``: the network is strongly typed by
its weights). TensorRT fp32 runs with TF32 disabled, so fp32 means fp32.

Every deployed network is checked against the eager module in fp32 before it
is timed (:func:`check`): max |out - ref| / max |ref| must stay within
:data:`TOLERANCE` of its precision. onnxruntime, onnx (and onnxscript, for
torch's current exporter) and torch-tensorrt are imported lazily; a missing one
raises :class:`DeployError` naming the extra to install.
"""

from __future__ import annotations

import copy
import importlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from s2h_fx.errors import DeployError

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnxruntime", "tensorrt")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |out - ref| / max |ref| against the eager module in fp32. fp32 runtimes reorder
# sums (inductor, MLAS and cuDNN kernels): 1e-4 covers resnet-sized networks with
# room; fp16 keeps 11 significant bits, bf16 8, and errors grow with depth.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}
EXTRAS = {"onnxruntime": "onnx", "tensorrt": "trt"}




@dataclass
class Deployed:
    """A network ready to time: ``run()`` calls it on its own input."""

    runtime: str
    precision: str
    device: str
    fn: Callable[[torch.Tensor], Any]
    x: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def run(self) -> Any:
        with torch.no_grad():  # as in timing: torch.compile guards on grad mode
            return self.fn(self.x)


# ---- availability ------------------------------------------------------------------
def _missing(runtime: str, what: str) -> DeployError:
    extra = EXTRAS[runtime]
    return DeployError(f"runtime {runtime!r} needs {what}: pip install 's2h-fx[{extra}]'")


def _import_tensorrt() -> Any:
    try:
        return importlib.import_module("torch_tensorrt")
    except ImportError as exc:
        raise _missing("tensorrt", f"torch-tensorrt ({exc})") from exc
    except Exception as exc:  # it raises a bare Exception when libnvinfer is missing
        raise DeployError(
            f"runtime 'tensorrt': torch-tensorrt is installed but cannot load TensorRT ({exc}). "
            "TensorRT's libraries come from NVIDIA (pip install tensorrt-cu13 with NVIDIA's "
            "index, or the TensorRT tarball on LD_LIBRARY_PATH)") from exc


def check_runtime(runtime: str, device: str = "cpu", precision: str = "fp32") -> None:
    """Raise :class:`DeployError` unless ``runtime`` can run here at ``precision``.

    Cheap checks first (names, device), then the imports it needs.
    """
    if runtime not in RUNTIMES:
        raise DeployError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise DeployError(f"unknown precision {precision!r}; choose from "
                          f"{', '.join(PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if runtime == "tensorrt" and not cuda:
        reason = ("this machine has no CUDA device (torch.cuda.is_available() is False)"
                  if not torch.cuda.is_available() else f"the device is {device!r}")
        raise DeployError(f"runtime 'tensorrt' needs a CUDA device: {reason}; use --device cuda "
                          "on a machine with an NVIDIA GPU")
    if cuda and not torch.cuda.is_available():
        raise DeployError(f"device {device!r}: CUDA is not available on this machine")
    if precision != "fp32" and not cuda:
        raise DeployError(f"precision {precision!r} needs a CUDA device (CPU kernels for it "
                          "are slow or missing); use fp32 on CPU")
    if precision == "bf16" and runtime in ("onnxruntime", "tensorrt"):
        raise DeployError(f"precision 'bf16' is not supported with {runtime!r}; use fp16")
    if runtime == "onnxruntime":
        _import_onnxruntime()
        if cuda and "CUDAExecutionProvider" not in _import_onnxruntime().get_available_providers():
            raise DeployError("runtime 'onnxruntime' on CUDA needs onnxruntime's "
                              "CUDAExecutionProvider: pip install onnxruntime-gpu")
    elif runtime == "tensorrt":
        _check_trt_version(_import_tensorrt())


def _import_onnxruntime() -> Any:
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise _missing("onnxruntime", f"onnxruntime ({exc})") from exc


def _check_trt_version(trt: Any) -> None:
    """torch-tensorrt is built against one torch minor version; another one breaks."""
    ours = torch.__version__.split("+")[0].split(".")[:2]
    theirs = str(getattr(trt, "__version__", "")).split("+")[0].split(".")[:2]
    if theirs != ours:
        raise DeployError(f"torch-tensorrt {trt.__version__} does not match torch "
                          f"{torch.__version__}: install torch-tensorrt=={'.'.join(ours)}.*")


def available_runtimes(device: str = "cpu") -> list[str]:
    """The runtimes that :func:`check_runtime` accepts on ``device`` at fp32."""
    ok = []
    for runtime in RUNTIMES:
        try:
            check_runtime(runtime, device)
        except DeployError as exc:
            log.info("%s", exc)
        else:
            ok.append(runtime)
    return ok


# ---- loading -----------------------------------------------------------------------
def load_program(path: str | Path) -> nn.Module:
    """The module of a ``.pt2`` that ``s2h-fx prune/export`` wrote, as a plain
    ``GraphModule`` (the module torch.export unlifts refuses ``.eval()``; its graph
    already runs in eval mode)."""
    try:
        module = torch.export.load(str(path)).module()
        return torch.fx.GraphModule(module, module.graph).eval()
    except Exception as exc:  # a missing, truncated or foreign file: several types
        raise DeployError(f"cannot load {str(path)!r} as a torch.export program (.pt2): "
                          f"{type(exc).__name__}: {exc}") from exc


# ---- runtimes ----------------------------------------------------------------------
def _cast(module: nn.Module, x: torch.Tensor, device: str,
          precision: str) -> tuple[nn.Module, torch.Tensor]:
    dtype = PRECISIONS[precision]
    module = copy.deepcopy(module).eval().to(device=device, dtype=dtype)
    return module, x.to(device=device, dtype=dtype)


def export_for_tensorrt(module: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """The program that TensorRT compiles: ``torch.export`` at the static shape of ``x``
    (module and input already in their device and precision)."""
    with torch.no_grad():
        return torch.export.export(module.eval(), (x,))


def _onnx_bytes(module: nn.Module, x: torch.Tensor) -> tuple[bytes, str]:
    """The ONNX model and which exporter wrote it: torch's current exporter (torch.export
    + onnxscript) where onnxscript is installed, else the TorchScript exporter."""
    try:
        importlib.import_module("onnxscript")
    except ImportError:
        exporter = "torchscript"
    else:
        exporter = "dynamo"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
            assert program is not None
            return program.model_proto.SerializeToString(), exporter
        buffer = io.BytesIO()
        torch.onnx.export(module, (x,), buffer,  # type: ignore[arg-type]  # takes a buffer
                          dynamo=False, input_names=["x"])
        return buffer.getvalue(), exporter


def _onnxruntime(module: nn.Module, x: torch.Tensor, device: str,
                 threads: int | None) -> tuple[Callable[[torch.Tensor], Any], dict[str, Any]]:
    ort = _import_onnxruntime()
    model, exporter = _onnx_bytes(module, x)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    cuda = torch.device(device).type == "cuda"
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(model, options, providers=providers)
    name = session.get_inputs()[0].name
    info = {"exporter": exporter, "providers": session.get_providers(),
            "onnxruntime": ort.__version__}
    if not cuda:
        def run_cpu(t: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(o) for o in session.run(None, {name: t.numpy()})]
        return run_cpu, info

    binding = session.io_binding()
    outputs = [o.name for o in session.get_outputs()]

    def run_cuda(t: torch.Tensor) -> list[torch.Tensor]:
        # inputs and outputs stay on the GPU: no host copies inside the timed call
        t = t.contiguous()
        binding.bind_input(name, "cuda", torch.device(device).index or 0,
                           _NP_DTYPES[t.dtype], tuple(t.shape), t.data_ptr())
        for out in outputs:
            binding.bind_output(out, "cuda")
        session.run_with_iobinding(binding)
        return [torch.from_numpy(o) for o in binding.copy_outputs_to_cpu()]
    return run_cuda, info


_NP_DTYPES: dict[torch.dtype, Any] = {torch.float32: np.float32, torch.float16: np.float16}


def _tensorrt(module: nn.Module, x: torch.Tensor,
              precision: str) -> tuple[Callable[[torch.Tensor], Any], dict[str, Any]]:
    trt = _import_tensorrt()
    _check_trt_version(trt)
    program = export_for_tensorrt(module, x)
    compiled = trt.dynamo.compile(program, arg_inputs=[x], device=x.device,
                                  disable_tf32=precision == "fp32", min_block_size=1)
    info = {"torch_tensorrt": trt.__version__}
    try:
        info["tensorrt"] = importlib.import_module("tensorrt").__version__
    except Exception:  # the version is a nicety; torch-tensorrt loaded the libraries
        pass
    return compiled, info


def deploy(module: nn.Module, x: torch.Tensor, runtime: str, *, device: str = "cpu",
           precision: str = "fp32", compile_mode: str | None = None,
           threads: int | None = None) -> Deployed:
    """Build ``runtime``'s version of ``module`` for inputs shaped like ``x``.

    ``module`` and ``x`` are copied to ``device`` and ``precision``; the caller's
    module is left as it is. Shapes are static: deploy again for another batch size.
    """
    check_runtime(runtime, device, precision)
    module, x = _cast(module, x, device, precision)
    info: dict[str, Any] = {}
    if runtime == "eager":
        fn: Callable[[torch.Tensor], Any] = module
    elif runtime == "compile":
        fn = torch.compile(module, backend="inductor", mode=compile_mode, dynamic=False)
        info["mode"] = compile_mode or "default"
    elif runtime == "onnxruntime":
        fn, info = _onnxruntime(module, x, device, threads)
    else:
        fn, info = _tensorrt(module, x, precision)
    log.debug("deployed on %s (%s, %s): %s", runtime, device, precision, info)
    return Deployed(runtime, precision, device, fn, x, info)


# ---- checking ----------------------------------------------------------------------
def max_rel_error(ref: Any, out: Any) -> float:
    """max |ref - out| / max |ref| over all output tensors (inf when they do not pair up)."""
    a = [t for t in tree_leaves(ref) if isinstance(t, torch.Tensor)]
    b = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not a or len(a) != len(b) or any(p.shape != q.shape for p, q in zip(a, b)):
        return float("inf")
    err = max(float((p.double().cpu() - q.double().cpu()).abs().max()) for p, q in zip(a, b))
    scale = max(float(p.double().abs().max()) for p in a)
    return err / max(scale, 1e-12)


def check(deployed: Deployed, module: nn.Module, x: torch.Tensor) -> float:
    """Run ``deployed`` once and compare it with ``module(x)`` in fp32 on the same device;
    raise :class:`DeployError` above the precision's tolerance. Returns the error."""
    with torch.no_grad():
        ref_module, ref_x = _cast(module, x, deployed.device, "fp32")
        ref = ref_module(ref_x)
        out = deployed.run()
        out = [t.detach().clone() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    err = max_rel_error(ref, out)
    tol = TOLERANCE[deployed.precision]
    if not err <= tol:
        raise DeployError(f"the {deployed.runtime} network ({deployed.precision}, "
                          f"{deployed.device}) disagrees with the eager module: max relative "
                          f"error {err:.2e} > {tol:g}")
    return err
