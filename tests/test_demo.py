"""The demo, the data loaders and ``s2h-fx prune``/``s2h-fx demo``, at tiny sizes.

The datasets are generated in tmp_path: an ImageFolder of random PNGs, and CIFAR
roots in torchvision's pickle format. torchvision checks each CIFAR file's md5
against the official release, which generated files cannot match, so the CIFAR
tests that load data replace ``torchvision.datasets.cifar.check_integrity`` with
an existence check (everything else, the pickle format included, is torchvision's
own code).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from s2h_fx import cli
from s2h_fx.data import DataError, cifar_loaders, digits_loaders, folder_loaders, num_classes_of
from s2h_fx.demo import run_demo


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: tiny convolutions gain nothing from two, and a busy machine
    makes threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- generated datasets -------------------------------------------------------------
def make_image_folder(root: Path, classes: int = 2, train: int = 4, val: int = 2,
                      size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 4  # a little signal per class
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def make_cifar_root(root: Path, name: str = "cifar10", per_file: int = 6) -> Path:
    """Tiny CIFAR files in torchvision's format (pickled dicts of uint8 rows of 3072)."""
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, meta = "labels", ("batches.meta", "label_names")
    else:
        folder = root / "cifar-100-python"
        files = ["train", "test"]
        label_key, meta = "fine_labels", ("meta", "fine_label_names")
    folder.mkdir(parents=True)
    for f in files:
        entry = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 label_key: [int(v) for v in rng.integers(0, classes, per_file)]}
        with open(folder / f, "wb") as fh:
            pickle.dump(entry, fh)
    with open(folder / meta[0], "wb") as fh:
        pickle.dump({meta[1]: [f"c{i}" for i in range(classes)]}, fh)
    return root


@pytest.fixture
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


# ---- loaders -----------------------------------------------------------------------
def test_digits_loaders_split_and_shapes() -> None:
    train, val = digits_loaders(batch_size=64, size=32, seed=0)
    assert len(train.dataset) == 1437 and len(val.dataset) == 360  # type: ignore[arg-type]
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    x_all = torch.cat([b[0] for b in train])
    assert abs(float(x_all.mean())) < 1e-3 and abs(float(x_all.std()) - 1) < 1e-3
    y_val = torch.cat([b[1] for b in val])
    assert torch.bincount(y_val, minlength=10).min() >= 35  # stratified: ~36 of each digit
    _, val2 = digits_loaders(batch_size=64, size=32, seed=0)
    assert torch.equal(torch.cat([b[0] for b in val]), torch.cat([b[0] for b in val2]))
    assert num_classes_of(train) == 10
    small, _ = digits_loaders(batch_size=8, size=16, max_train=20)
    assert len(small.dataset) == 20 and next(iter(small))[0].shape == (8, 3, 16, 16)  # type: ignore[arg-type]


def test_folder_loaders(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs")
    train, val = folder_loaders(root, batch_size=3, size=32)
    assert num_classes_of(train) == 2
    assert len(train.dataset) == 8 and len(val.dataset) == 4  # type: ignore[arg-type]
    x, y = next(iter(train))
    assert x.shape == (3, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    assert next(iter(val))[0].shape == (3, 3, 32, 32)
    with pytest.raises(DataError, match="no val/ subfolder"):
        folder_loaders(_without_val(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        folder_loaders(tmp_path / "nowhere")


def _without_val(tmp_path: Path) -> Path:
    root = tmp_path / "no_val"
    (root / "train" / "a").mkdir(parents=True)
    return root


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loaders_read_torchvision_format(
    name: str, tmp_path: Path, skip_cifar_md5: None
) -> None:
    root = make_cifar_root(tmp_path, name)
    train, val = cifar_loaders(root, name, batch_size=4)
    n_train = 30 if name == "cifar10" else 6
    assert len(train.dataset) == n_train and len(val.dataset) == 6  # type: ignore[arg-type]
    assert num_classes_of(train) == (10 if name == "cifar10" else 100)
    x, y = next(iter(val))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    # val is not augmented: the first image is the stored pixels, normalised
    ds = val.dataset
    raw = torch.as_tensor(ds.data[0]).permute(2, 0, 1).float() / 255  # type: ignore[attr-defined]
    mean = torch.tensor(ds.transform.transforms[-1].mean).view(3, 1, 1)  # type: ignore[attr-defined]
    std = torch.tensor(ds.transform.transforms[-1].std).view(3, 1, 1)  # type: ignore[attr-defined]
    torch.testing.assert_close(x[0], (raw - mean) / std)
    big, _ = cifar_loaders(root, name, batch_size=2, size=40)
    assert next(iter(big))[0].shape == (2, 3, 40, 40)


def test_cifar_missing_or_corrupt_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        cifar_loaders(tmp_path / "empty")
    root = make_cifar_root(tmp_path / "fake")  # files present, md5 not the official one
    with pytest.raises(DataError, match="not readable: Dataset not found or corrupted"):
        cifar_loaders(root)
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="missing test_batch"):
        cifar_loaders(root)
    with pytest.raises(ValueError, match="name must be one of"):
        cifar_loaders(root, "cifar1000")


# ---- the demo ----------------------------------------------------------------------
def test_run_demo_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budget = 0.3
    # two epochs: the default phases make the second a settling one (hard network alone)
    result = run_demo(epochs=2, budget=budget, out_dir=tmp_path / "demo", batch_size=32,
                      size=16, max_train=64, max_val=48, latency_runs=3, progress=False)
    rows = {r.name: r for r in result["rows"]}
    assert list(rows) == ["dense", "soft", "hard", "exported"]
    assert rows["exported"].val_acc == rows["hard"].val_acc
    assert rows["exported"].flops_ratio <= budget + 0.005
    assert rows["exported"].flops_ratio == pytest.approx(rows["hard"].flops_ratio, rel=1e-9)
    assert rows["exported"].flops_ratio == pytest.approx(
        float(result["pruner"].flops_ratio()), rel=1e-6)
    assert rows["soft"].flops_ratio == pytest.approx(1.0, abs=0.01)
    assert rows["exported"].params_m < rows["dense"].params_m
    assert rows["dense"].speedup == 1.0 and all(r.latency_ms > 0 for r in rows.values())
    assert result["plot"].is_file() and result["plot"].stat().st_size > 10_000
    saved = json.loads(result["json"].read_text())
    assert [r["name"] for r in saved["rows"]] == list(rows)
    assert len(saved["history"]) == 2 and len(saved["history"][0]["steps"]) == 2
    first, second = saved["history"]
    assert not first["settling"] and second["settling"] and second["soft_acc"] is None
    assert all("soft_acc" not in step for step in second["steps"])
    out = capsys.readouterr().out
    assert "S2H epoch 2 (settling)" in out
    # the soft row after settling is marked: the soft network did not train in those epochs
    assert rows["soft"].note and "\nsoft*" in out and "* soft: the soft network" in out
    assert not rows["hard"].note
    assert "network" in out and "speed-up" in out and "exported" in out


def test_cli_demo_passes_options_and_rejects_bad_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import s2h_fx.demo

    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []
    monkeypatch.setattr(s2h_fx.demo, "run_demo", lambda *a, **k: calls.append((a, k)))
    threads = torch.get_num_threads()
    args = ["demo", "--epochs", "2", "--budget", "0.4", "--out", str(tmp_path / "d"),
            "--latency-runs", "7", "--no-progress"]
    assert cli.main(args) == 0
    (a, k), = calls
    assert a == (2, 0.4, tmp_path / "d") and k["latency_runs"] == 7 and k["progress"] is False
    assert k["batch_size"] == 64 and torch.get_num_threads() == threads
    assert cli.main(["demo", "--budget", "1.5"]) == 2
    assert "error: budget must be in (0, 1]" in capsys.readouterr().err
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert len(calls) == 1


# ---- s2h-fx prune -------------------------------------------------------------------------
PRUNE_FAST = ["--epochs", "1", "--batch-size", "4", "--input-size", "3,32,32",
              "--latency-runs", "2", "--no-progress", "--device", "cpu"]


def test_prune_image_folder_writes_a_loadable_pt2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_image_folder(tmp_path / "imgs")
    out_file, plot = tmp_path / "r18.pt2", tmp_path / "curve.png"
    args = ["prune", "resnet18", "--budget", "0.5", "--data-dir", str(root),
            "-o", str(out_file), "--plot", str(plot), *PRUNE_FAST]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "resnet18 (2 classes, random weights) on image folder" in out
    assert "exported" in out and f"wrote {out_file}" in out and plot.is_file()
    assert "max relative error, pruned(x) vs pruner(x)" in out
    loaded = torch.export.load(out_file).module()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert loaded(x).shape == (3, 2)
    dense = torchvision.models.resnet18(num_classes=2)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters())


def test_prune_cifar10_from_a_checkpoint_writes_a_pt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], skip_cifar_md5: None
) -> None:
    root = make_cifar_root(tmp_path / "data", per_file=2)
    torch.manual_seed(1)
    start = torchvision.models.resnet18(num_classes=10)
    torch.save(start.state_dict(), tmp_path / "start.pth")
    out_file = tmp_path / "r18.pt"
    args = ["prune", "resnet18", "--budget", "0.3", "--cifar10", str(root), "-o", str(out_file),
            "--checkpoint", str(tmp_path / "start.pth"), "--dense-baseline", *PRUNE_FAST]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "resnet18 (10 classes, weights from" in out and "dense baseline: 1 epochs" in out
    loaded = torch.load(out_file, weights_only=False)
    assert isinstance(loaded, torch.fx.GraphModule)
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("data_args", "message"),
    [
        (["--data-dir", "{tmp}/nowhere"], "nowhere' does not exist"),
        (["--data-dir", "{tmp}"], "has no train/ subfolder"),
        (["--cifar10", "{tmp}/nowhere"], "nowhere/cifar-10-batches-py' does not exist"),
        (["--cifar100", "{tmp}"], "cifar-100-python' does not exist"),
    ],
)
def test_prune_missing_data_exits_2(
    data_args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "m.pt2"
    args = ["prune", "resnet18", "--budget", "0.3", "-o", str(out_file),
            *[a.format(tmp=tmp_path) for a in data_args]]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out_file.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "one of the arguments --data-dir --cifar10 --cifar100 --fashion-mnist is required"),
        (["--data-dir", "a", "--cifar10", "b"], "not allowed with argument"),
        (["--data-dir", "{tmp}", "--budget", "0"], "budget must be in (0, 1]"),
        (["--data-dir", "{tmp}", "-o", "m.onnx"], "must end in one of .pt2"),
        (["--data-dir", "{tmp}", "--input-size", "1,32,32"], "--input-size must be 3,S,S"),
        (["--data-dir", "{tmp}", "--lr", "-1"], "argument --lr"),
    ],
)
def test_prune_bad_command_line_exits_2(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path / "imgs")
    base = ["prune", "resnet18", "--budget", "0.3", "-o", str(tmp_path / "m.pt2")]
    args = base + [a.format(tmp=tmp_path / "imgs") for a in extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


def test_prune_unknown_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "imgs")
    args = ["prune", "resnet81", "--budget", "0.3", "--data-dir", str(root),
            "-o", str(tmp_path / "m.pt2")]
    assert cli.main(args) == 2
    assert "did you mean resnet18" in capsys.readouterr().err


def test_prune_checkpoint_dir_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "imgs")  # 8 training images: 2 batches of 4
    ckpt = tmp_path / "ck"
    base = ["prune", "resnet18", "--budget", "0.5", "--data-dir", str(root),
            "-o", str(tmp_path / "r18.pt"), "--checkpoint-dir", str(ckpt), *PRUNE_FAST]
    assert cli.main([*base, "--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    # after batch 1, after batch 2 (then again at the end of the epoch, same position)
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    state = torch.load(ckpt / "ckpt-00000002.pt", weights_only=True)
    assert (state["run"]["epoch"], state["run"]["step"]) == (1, 0)  # epoch 1 done
    assert cli.main(base) == 2  # a new run would mix its checkpoints with the old ones
    assert "already holds checkpoints" in capsys.readouterr().err
    assert cli.main([*base, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "ckpt-00000002.pt" in err
    assert "checkpoint ckpt-" not in err  # nothing left to train: no new checkpoint
    assert torch.load(tmp_path / "r18.pt", weights_only=False)(torch.randn(1, 3, 32, 32)).shape == (1, 2)
