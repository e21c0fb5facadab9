"""The wheel installs passes/ as s2h_fx.passes and nothing as a top-level ``passes``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _source_modules() -> set[str]:
    """Every .py file of the source tree, as the path it must have once installed."""
    pkg = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "s2h_fx").rglob("*.py")}
    passes = {f"s2h_fx/{p.relative_to(REPO_ROOT)}" for p in (REPO_ROOT / "passes").rglob("*.py")}
    return pkg | passes


def test_wheel_installs_passes_as_subpackage(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheels"
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [*pip, "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheel_dir)],
        tmp_path,
    )
    (wheel,) = wheel_dir.glob("s2h_fx-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], tmp_path)

    assert (site / "s2h_fx" / "passes" / "__init__.py").is_file()
    assert not (site / "passes").exists()
    installed = {str(p.relative_to(site)) for p in (site / "s2h_fx").rglob("*.py")}
    missing = sorted(_source_modules() - installed)
    assert not missing, f"not in the wheel (add the subpackage to pyproject.toml): {missing}"

    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import s2h_fx.passes, s2h_fx; print(s2h_fx.passes.__file__)"
    out = _run([sys.executable, "-c", probe], tmp_path, env).stdout.strip()
    assert Path(out).resolve().is_relative_to(site.resolve()), out
