"""The main job works from the README's first command alone (``pip install -e .``, then
``s2h-fx demo``): every third-party module that ``demo`` and ``prune`` import comes from
a base dependency of s2h-fx (or one of theirs), never from an extra such as ``[dev]``.

A fresh process runs a tiny demo and ``prune``'s data loading from an image folder (its
training is the demo's code), then lists the distributions its imported modules belong to.
Optional imports that a base dependency guards itself are listed in ``GUARDED``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PROBE = r"""
import json, sys
from pathlib import Path
from PIL import Image
from s2h_fx import cli
from s2h_fx.demo import run_demo

out = Path(sys.argv[1])
run_demo(epochs=1, budget=0.5, out_dir=out / "demo", batch_size=16, size=16, max_train=32,
         max_val=16, latency_runs=1, progress=False)
for split in ("train", "val"):
    for label in ("a", "b"):
        (out / "imgs" / split / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 100, 200 if label == "a" else 0)).save(
                out / "imgs" / split / label / f"{i}.png")
# prune trains with the same code as the demo; what it adds is reading the data
args = cli._build_parser().parse_args(
    ["prune", "resnet18", "--budget", "0.5", "--data-dir", str(out / "imgs"),
     "--input-size", "3,16,16", "--batch-size", "2", "-o", str(out / "p.pt2")])
train, val, classes, _ = cli._prune_loaders(args)
assert classes == 2 and next(iter(train))[0].shape == (2, 3, 16, 16)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""

# imported when present, skipped when not, by a base dependency: not ours to require
GUARDED = {"colorama": "tqdm.utils: try: import colorama except ImportError"}


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _base_closure() -> set[str]:
    """s2h-fx's base requirements and, recursively, theirs (markers evaluated, no extras)."""
    seen: set[str] = set()
    todo = [_name("s2h-fx")]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_name(req.name))
    return seen


def test_demo_and_prune_import_only_base_dependencies(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    owners = metadata.packages_distributions()
    base = _base_closure()
    assert {"torch", "scikit-learn", "matplotlib"} <= base
    outside = {m: owners[m] for m in modules
               if m in owners and m not in sys.stdlib_module_names and m not in GUARDED
               and not {_name(d) for d in owners[m]} & base}
    assert not outside, (f"the demo/prune path imports modules whose distributions are not "
                         f"base dependencies of s2h-fx: {outside}; add them to "
                         "[project] dependencies or import them lazily with a clear error")
    # the probe really reached the demo's and prune's third-party imports
    assert {"sklearn", "matplotlib", "torchvision", "scipy", "PIL"} <= set(modules)
    assert "onnxruntime" not in modules and "pytest" not in modules
