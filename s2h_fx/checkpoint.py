"""Training checkpoints: atomic files in one directory, the last few kept, and a
fallback to the previous one when the newest cannot be read.

A checkpoint is one ``torch.save`` file that ``torch.load(path, weights_only=True)``
reads: only tensors, dicts, lists, numbers, strings and None. It is written to a
temporary file in the same directory, flushed, ``os.fsync``-ed and renamed over
its final name (``os.replace``), so a crash or a kill at any moment leaves either
the previous files or the new complete one, never a half-written checkpoint.

Files are ``DIR/ckpt-00000123.pt`` (123 = batches trained so far); for a location
ending in ``.pt``, ``run/model.pt`` gives ``run/model-00000123.pt``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2h_fx.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "s2h-fx-checkpoint"
VERSION = 1


class CheckpointStore:
    """The checkpoints of one training run, in one directory."""

    def __init__(self, location: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        path = Path(location)
        if path.suffix == ".pt" and not path.is_dir():
            self.directory, self.prefix = path.parent, path.stem
        else:
            self.directory, self.prefix = path, "ckpt"
        self.keep = keep
        self._pattern = re.compile(rf"^{re.escape(self.prefix)}-(\d+)\.pt$")

    def path(self, number: int) -> Path:
        return self.directory / f"{self.prefix}-{number:08d}.pt"

    def files(self) -> list[Path]:
        """The checkpoint files, newest (highest number) first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = self._pattern.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict[str, Any], number: int) -> Path:
        """Write ``state`` atomically as checkpoint ``number``; drop all but the newest
        ``keep`` files. Returns the file's path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(number)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)
        for old in self.files()[self.keep:]:
            old.unlink(missing_ok=True)
        log.debug("checkpoint written: %s", final)
        return final

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest readable checkpoint and its path (on the CPU), or None when
        there is none. An unreadable file is skipped with a warning; when every file
        is unreadable, :class:`CheckpointError`."""
        files = self.files()
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                _check_format(state)
            except Exception as exc:  # torch.load raises many types on a damaged file
                log.warning("checkpoint %s cannot be read (%s: %s); falling back to the "
                            "previous one", path, type(exc).__name__, exc)
                continue
            return state, path
        if files:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: "
                f"{', '.join(p.name for p in files)} are all damaged")
        return None


def _check_format(state: Any) -> None:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError("not an s2h-fx training checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint version {state.get('version')}, expected {VERSION}")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- random number generators --------------------------------------------------
def loader_generators(loader: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects a DataLoader draws its order from
    (its own, its sampler's, its batch sampler's sampler's), in a fixed order."""
    found: list[torch.Generator] = []
    candidates = [getattr(loader, "generator", None)]
    sampler = getattr(loader, "sampler", None)
    candidates.append(getattr(sampler, "generator", None))
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates.append(getattr(getattr(batch_sampler, "sampler", None), "generator", None))
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def rng_state(loader: Any = None) -> dict[str, Any]:
    """Every random state training draws from: torch (CPU and CUDA), numpy, Python's
    ``random`` and the loader's generators; safe for ``weights_only`` loading."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "numpy": {"kind": str(kind), "keys": torch.as_tensor(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "loader": [g.get_state() for g in loader_generators(loader)],
    }


def set_rng_state(state: dict[str, Any], loader: Any = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()),
                     p["gauss_next"]))
    gens = loader_generators(loader)
    if len(gens) != len(state["loader"]):
        raise CheckpointError(f"the loader has {len(gens)} random generator(s), the "
                              f"checkpoint {len(state['loader'])}: not the same loader")
    for gen, saved in zip(gens, state["loader"]):
        gen.set_state(saved)
