"""benchmarks/gpu_check.sh, the one time-boxed run for a machine with a GPU: its
syntax (always), and its CPU dry run end to end (slow: about 40 s)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                          reason="the script needs bash and coreutils' timeout")


@bash
def test_the_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@bash
@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_part(tmp_path) -> None:
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    exits = dict(re.findall(r"^## (\w+): exit (\d+)", done.stdout, re.M))
    assert exits == {"gpu_tests": "0", "overhead": "0", "fit_speed": "0", "latency": "0"}, \
        done.stdout
    for name in ("overhead", "fit_speed", "latency"):
        assert (tmp_path / f"{name}.jsonl").read_text().strip(), name
    assert "torch" in (tmp_path / "versions.txt").read_text()
