#!/usr/bin/env bash
# Everything only a GPU can show, in one short run (about 8 minutes on one H100),
# each part time-boxed so that one slow part cannot eat the others' time:
#
#   1. the CUDA tests (-m gpu): the sync-free S2H step under
#      torch.cuda.set_sync_debug_mode("error"), the S2H step and the non-finite
#      guard on CUDA, the TensorRT runtime (skips, saying why, without TensorRT);
#   2. benchmarks/overhead.py on CUDA: resnet50, batch 128, 224x224, autocast
#      bfloat16: S2H step / dense step with the floor measured in the same run;
#   3. benchmarks/fit_speed.py on CUDA: fit's images/s next to the dense loop's;
#   4. benchmarks/latency.py on CUDA: resnet50 and mobilenet_v2 at budget 0.5,
#      batch 1 and 32, eager and compile, s2h-fx against Torch-Pruning.
#
# Run from the repository root, from source (no install needed):
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh
#
# Results (logs and JSON lines) go to $OUT (default ./gpu_check_out). DEVICE=cpu
# runs the same commands at toy sizes on the CPU (a dry run of this script).
set -u
OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUT"

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "## $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "## $name: exit $rc after $((SECONDS - t0)) s"
}

$PY - <<'EOF' | tee "$OUT/versions.txt"
import platform, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "python", platform.python_version())
if torch.cuda.is_available():
    print("GPU", torch.cuda.get_device_name(0))
for name in ("onnxruntime", "torch_tensorrt", "tensorrt", "timm", "torch_pruning"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as e:  # not installed, or its libraries missing
        print(name, "not available:", type(e).__name__, e)
EOF

if [ "$DEVICE" = cpu ]; then  # the dry run: toy sizes, a few seconds each
    part gpu_tests 300 "$PY" -m pytest -q -p no:randomly -m gpu tests/
    part overhead 120 "$PY" benchmarks/overhead.py --models toy --input-size 3,16,16 \
        --batch-size 8 --repeat 3 --warmup 1 --threads 1 --out "$OUT/overhead.jsonl"
    part fit_speed 120 "$PY" benchmarks/fit_speed.py --model toy --input-size 3,16,16 \
        --batch-size 8 --epochs 1 --steps 3 --repeat 1 --threads 1 --out "$OUT/fit_speed.jsonl"
    part latency 300 "$PY" benchmarks/latency.py --models resnet18 --budgets 0.5 \
        --batches 1 --runtimes eager --input-size 3,64,64 --rounds 3 --warmup 1 \
        --threads 1 --out "$OUT/latency.jsonl"
else
    part gpu_tests 150 "$PY" -m pytest -q -p no:randomly -m gpu tests/
    part overhead 120 "$PY" benchmarks/overhead.py --models resnet50 --device cuda \
        --repeat 11 --out "$OUT/overhead.jsonl"
    part fit_speed 90 "$PY" benchmarks/fit_speed.py --model resnet50 --device cuda \
        --epochs 5 --steps 6 --repeat 2 --out "$OUT/fit_speed.jsonl"
    part latency 240 "$PY" benchmarks/latency.py --device cuda --models resnet50,mobilenet_v2 \
        --budgets 0.5 --batches 1,32 --runtimes eager,compile --rounds 10 --timeout 115 \
        --out "$OUT/latency.jsonl"
fi
echo "## done: $OUT"
