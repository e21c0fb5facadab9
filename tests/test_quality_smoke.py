"""Fashion-MNIST loading (tiny generated IDX files), ``s2h-fx prune --fashion-mnist``
and a smoke run of benchmarks/quality.py: every method, the table, the FLOPs
agreement, the resume."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from s2h_fx.cli import main as cli_main
from s2h_fx.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_loaders, read_idx
from s2h_fx.errors import DataError, InputError

from helpers import load_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
N_TRAIN, N_TEST = 48, 24


def load_quality():
    return load_benchmark("quality")


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, type 0x08 (unsigned byte), the number of dimensions, then
    each dimension as a big-endian int32, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(root: Path, seed: int = 0, gzip_train: bool = True) -> dict[str, np.ndarray]:
    """Tiny Fashion-MNIST-shaped files: class k has a bright band in rows 2k..2k+5, so
    the labels are learnable; the train files gzipped, the test files plain."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, stem in (("train", N_TRAIN, "train"), ("test", N_TEST, "t10k")):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k: 2 * k + 6] = 250
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images.astype(np.uint8), labels
        for kind, data in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{stem}-{kind}-ubyte"
            if split == "train" and gzip_train:
                (root / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(data)))
            else:
                (root / name).write_bytes(idx_bytes(data))
    return arrays


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("fashion")
    return root, write_fashion(root)


# ---- the loader -------------------------------------------------------------------
def test_read_idx_gzipped_and_plain(fashion):
    root, arrays = fashion
    train = read_idx(root / "train-images-idx3-ubyte.gz")
    test = read_idx(root / "t10k-labels-idx1-ubyte")
    assert train.shape == (N_TRAIN, 28, 28) and np.array_equal(train, arrays["train_images"])
    assert test.shape == (N_TEST,) and np.array_equal(test, arrays["test_labels"])


def test_loaders_values_subset_and_channels(fashion):
    root, arrays = fashion
    train, val = fashion_mnist_loaders(root, batch_size=100, seed=3, channels=3)
    x, y = next(iter(val))  # not shuffled: the test file in order
    assert x.shape == (N_TEST, 3, 28, 28) and y.dtype == torch.long
    expected = (arrays["test_images"][5].astype(np.float32) / 255 - FASHION_MNIST_MEAN) \
        / FASHION_MNIST_STD
    assert torch.allclose(x[5, 2], torch.from_numpy(expected), atol=1e-6)
    assert torch.equal(y, torch.from_numpy(arrays["test_labels"].astype(np.int64)))
    sub, _ = fashion_mnist_loaders(root, batch_size=8, seed=1, max_train=16)
    again, _ = fashion_mnist_loaders(root, batch_size=8, seed=1, max_train=16)
    first = [b[1].tolist() for b in sub]
    assert sum(len(b) for b in first) == 16 and first == [b[1].tolist() for b in again]
    assert len(train.dataset.classes) == 10  # type: ignore[attr-defined]


def test_missing_folder_names_files_and_package(tmp_path):
    with pytest.raises(DataError) as err:
        fashion_mnist_loaders(tmp_path / "nowhere")
    msg = str(err.value)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert isinstance(err.value, InputError)  # one kind of error for missing data, also bad input


def test_incomplete_folder_names_the_missing_file(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte") as err:
        fashion_mnist_loaders(tmp_path)
    assert "train-images" not in str(err.value)


def test_corrupt_file_is_an_input_error(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        fashion_mnist_loaders(tmp_path)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_default_root_is_debians_package():
    train, val = fashion_mnist_loaders(batch_size=500, max_train=1000)
    assert len(train.dataset) == 1000 and len(val.dataset) == 10000
    full = train.dataset.dataset  # type: ignore[attr-defined]  # the Subset's source
    assert len(full) == 60000 and sorted(set(full.labels.tolist())) == list(range(10))
    x, _ = next(iter(val))
    assert x.shape == (500, 1, 28, 28) and abs(float(x.mean())) < 0.2  # roughly normalised


# ---- the CLI ------------------------------------------------------------------------
def test_cli_fashion_mnist_without_root_means_debians_folder():
    from s2h_fx.cli import _build_parser
    from s2h_fx.data import FASHION_MNIST_ROOT

    args = _build_parser().parse_args(["prune", "resnet18", "--budget", "0.5",
                                       "--fashion-mnist", "-o", "x.pt"])
    assert args.fashion_mnist == FASHION_MNIST_ROOT == Path("/usr/share/datasets/fashion-mnist")
    assert args.cifar10 is None and args.data_dir is None


def test_cli_prune_fashion_mnist(fashion, tmp_path, capsys):
    root, _ = fashion
    out = tmp_path / "r18.pt"
    rc = cli_main(["prune", "resnet18", "--budget", "0.5", "--fashion-mnist", str(root),
                   "--epochs", "1", "--batch-size", "16", "--latency-runs", "1",
                   "--no-progress", "--threads", "1", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert f"fashion-mnist from {root}" in text and f"{N_TRAIN} train / {N_TEST} val" in text
    assert "10 classes" in text and "at 3x28x28" in text


def test_cli_prune_fashion_mnist_missing(tmp_path, capsys):
    rc = cli_main(["prune", "resnet18", "--budget", "0.5", "--fashion-mnist",
                   str(tmp_path / "none"), "-o", str(tmp_path / "x.pt")])
    assert rc == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


# ---- the benchmark --------------------------------------------------------------------
def assert_tp_as_close_as_it_can(row: dict) -> None:
    """Torch-Pruning's FLOPs move in steps with its one pruning ratio; where no ratio
    lands within 0.01 of the budget, the bisection must have closed in on the step:
    trials on both sides of the budget at ratios less than 0.001 apart, and the row
    the closer of them."""
    budget, trials = row["budget"], row["tp_trials"]
    above = [(r, f) for r, f in trials if f > budget]
    below = [(r, f) for r, f in trials if f <= budget]
    assert above and below, row
    r_hi, f_hi = max(above)  # the largest ratio still above the budget
    r_lo, f_lo = min(below)
    assert 0 < r_lo - r_hi < 1e-3, trials
    assert math.isclose(row["flops_ratio"], min((f_hi, f_lo), key=lambda f: abs(f - budget))), row
    assert math.isclose(row["tp_flops_ratio"], row["flops_ratio"]), row  # measured the same way


def test_quality_every_method_table_flops_and_resume(fashion, tmp_path, capsys):
    quality = load_quality()
    root, _ = fashion
    out = tmp_path / "q.jsonl"
    argv = ["--models", "resnet20", "--budgets", "0.35", "--seeds", "0", "--e0", "1",
            "--e1", "1", "--train-size", "40", "--batch-size", "16", "--device", "cpu", "--threads", "1",
            "--data", str(root), "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        assert quality.main(argv + ["--plot", str(tmp_path / "q.png")]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["method"] for r in rows) == sorted(quality.METHODS)
        assert len({r["dense_start"] for r in rows}) == 1  # every method from one start
        for r in rows:
            assert 0.0 <= r["test_acc"] <= 1.0 and r["seconds"] > 0 and r["params"] > 0
            assert r["e0"] == 1 and r["e1"] == 1 and r["train_size"] == 40
            assert "torch_pruning" in r["versions"]
        pruned = {r["method"]: r["flops_ratio"] for r in rows if r["method"] != "dense"}
        ours = pruned["s2h"]
        assert 0.35 - 0.03 <= ours <= 0.35 + 0.005 and abs(pruned["oneshot-l1"] - ours) <= 0.01
        for r in rows:
            if r["method"].startswith("tp-") and abs(r["flops_ratio"] - ours) > 0.01:
                assert_tp_as_close_as_it_can(r)
        dense = next(r for r in rows if r["method"] == "dense")
        assert dense["flops_ratio"] == 1.0 and dense["params"] == dense["dense_params"]
        assert all(r["params"] < dense["params"] for r in rows if r["method"] != "dense")
        assert (tmp_path / "q.png").stat().st_size > 0
        table = capsys.readouterr().out
        header = table.splitlines()[0]
        assert all(col in header for col in quality.COLUMNS), header
        assert sum(" 0.35 " in line for line in table.splitlines()) == 4
        # the shared dense start was saved and is read back; finished rows are skipped
        assert len(list((tmp_path / "q_dense").glob("*.pt"))) == 1
        assert quality.main(argv + ["--resume"]) == 0
        assert len(out.read_text().splitlines()) == len(rows)
        assert "5 row(s) already in" in capsys.readouterr().err
        with pytest.raises(SystemExit):  # an existing file without --resume
            quality.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_quality_s2h_variants(fashion, tmp_path, capsys):
    """An ablation variant runs S2H with its S2HConfig, which its row keeps; rows of
    another config are other cells (resume and table); a bad field is refused."""
    quality = load_quality()
    root, _ = fashion
    out = tmp_path / "v.jsonl"
    argv = ["--models", "resnet20", "--budgets", "0.35", "--seeds", "0", "--e0", "0",
            "--e1", "2", "--train-size", "32", "--batch-size", "16", "--device", "cpu",
            "--threads", "1", "--data", str(root), "--out", str(out), "--resume",
            "--variant", "quick=settle_epochs=0,mask_lr=0.2"]
    threads = torch.get_num_threads()
    try:
        assert quality.main(argv + ["--methods", "s2h:quick,s2h:before"]) == 0
        rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert set(rows) == {"s2h:quick", "s2h:before"}
        quick, before = rows["s2h:quick"]["s2h_config"], rows["s2h:before"]["s2h_config"]
        assert quick["settle_epochs"] == 0 and quick["mask_lr"] == 0.2
        assert quick["mask_momentum"] == 0.9  # the rest: today's defaults
        assert before["mask_momentum"] == 0.0 and before["descent_epochs"] == 0.0
        assert quality.main(argv + ["--methods", "s2h:quick"]) == 0  # done: skipped
        assert len(out.read_text().splitlines()) == 2
        table = capsys.readouterr().out
        assert "s2h:quick" in table and "s2h:before" in table
        with pytest.raises(SystemExit):
            quality.main(argv[:-1] + ["nope=not_a_field=1", "--methods", "s2h:nope"])
        assert "not an S2HConfig field" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_quality_table_mean_and_sample_sd(tmp_path, capsys):
    quality = load_quality()
    base = {"model": "resnet20", "budget": 0.35, "method": "s2h", "e0": 1, "e1": 2,
            "train_size": 100, "test_size": None, "batch_size": 128, "lr": 0.05,
            "flops_ratio": 0.35, "params": 1000, "seconds": 10.0}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({**base, "seed": s, "test_acc": a}) + "\n"
                            for s, a in ((0, 0.80), (1, 0.90), (2, 0.85))))
    assert quality.main(["--table", str(path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resnet20"))
    # mean 0.85; sample sd sqrt((0.05^2 + 0.05^2 + 0) / 2) = 0.05
    assert "0.8500 +- 0.0500" in line and " 3 " in line
    assert math.isclose(quality.mean_sd([0.8, 0.9, 0.85])[1], 0.05)


def test_quality_attention_variant_on_the_vit(fashion, tmp_path):
    """The ViT's S2H rows say what its attention pruned: both kinds by default, the
    head width alone under ``s2h:width-attention`` (a prune_graph option, not an
    S2HConfig field: the two rows' configs are equal)."""
    quality = load_quality()
    root, _ = fashion
    out = tmp_path / "vit.jsonl"
    argv = ["--models", "vit", "--budgets", "0.5", "--seeds", "0", "--e0", "0", "--e1", "1",
            "--train-size", "32", "--batch-size", "16", "--device", "cpu", "--threads", "1",
            "--data", str(root), "--out", str(out), "--methods", "s2h,s2h:width-attention"]
    threads = torch.get_num_threads()
    try:
        assert quality.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["s2h"]["attention"] == "both"
    assert rows["s2h:width-attention"]["attention"] == "width"
    assert rows["s2h"]["s2h_config"] == rows["s2h:width-attention"]["s2h_config"]
    assert all(r["flops_ratio"] <= 0.5 + 0.005 for r in rows.values())


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet18", "mobilenet_v2", "vit"])
def test_quality_models_prune_with_both_tools(name):
    """Every model of the benchmark takes 1x28x28 and is pruned by s2h-fx (one shot,
    exported) and by Torch-Pruning (round_to 8) to fewer FLOPs, 10 logits out."""
    import s2h_fx
    from s2h_fx.measure import count_flops

    quality = load_quality()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = quality.build_model(name, 0).eval()
        x = torch.randn(2, 1, 28, 28)
        dense = count_flops(model, x)
        ours = s2h_fx.prune_graph(model, 0.35, (x,)).export()
        theirs = quality.tp_prune(model, 0.3, "magnitude", None, torch.device("cpu"))
        for net in (ours, theirs):
            assert net(x).shape == (2, 10)
            # (the ViT's attention products shrink with its embedding, its softmax not)
            assert count_flops(net, x) < (0.8 if name == "vit" else 0.6) * dense
        assert abs(count_flops(ours, x) / dense - 0.35) <= 0.03
        convs = [m for m in theirs.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs[0].in_channels == 1  # the grey input is never pruned
        assert all(c.out_channels % 8 == 0 for c in convs if c.groups == 1)
        if name == "vit":  # Torch-Pruning's fix-up: the forward reads hidden_dim
            assert theirs.hidden_dim == convs[0].out_channels < 128
    finally:
        torch.set_num_threads(threads)


def test_divisor_is_a_setting_rows_from_before_it_ran_at_8() -> None:
    """--divisor keys rows (resume) and table cells; a row written before the option
    existed counts as divisor 8, so --resume does not rerun it."""
    quality = load_quality()
    base = {"model": "resnet20", "budget": 0.15, "seed": 0, "method": "s2h", "e0": 4,
            "e1": 10, "train_size": 10000, "test_size": 10000, "batch_size": 128, "lr": 0.05,
            "test_acc": 0.9, "flops_ratio": 0.15, "params": 30000, "seconds": 1.0}
    old, eight, four = dict(base), {**base, "divisor": 8}, {**base, "divisor": 4, "test_acc": 0.8}
    assert quality.key_of(old) == quality.key_of(eight) != quality.key_of(four)
    cells = quality.cells_of([old, four])
    assert len(cells) == 2
    lines = quality.table([old, four]).splitlines()
    assert any(" 8  0.9000" in line for line in lines) and any(" 4  0.8000" in line for line in lines)


def test_quality_table_warns_of_mixed_dense_starts(tmp_path, capsys):
    """Rows of one seed that trained from different dense starts are named; rows from
    before the digest (none recorded) and other seeds' starts are not."""
    quality = load_quality()
    base = {"model": "resnet20", "budget": 0.35, "e0": 1, "e1": 2, "train_size": 100,
            "test_size": None, "batch_size": 128, "lr": 0.05, "flops_ratio": 0.35,
            "params": 1000, "seconds": 10.0, "test_acc": 0.9}
    rows = [{**base, "seed": 0, "method": "s2h", "dense_start": "aaa"},
            {**base, "seed": 0, "method": "tp-taylor", "dense_start": "aaa"},
            {**base, "seed": 1, "method": "s2h", "dense_start": "bbb"},
            {**base, "seed": 1, "method": "tp-taylor", "dense_start": "ccc"},
            {**base, "seed": 2, "method": "s2h"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert quality.main(["--table", str(path)]) == 0
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning")]
    assert len(warnings) == 1 and "seed 1" in warnings[0] and "bbb, ccc" in warnings[0]


def test_dense_start_digest_follows_the_weights():
    quality = load_quality()
    a, b = quality.build_model("resnet20", 0), quality.build_model("resnet20", 0)
    assert quality.start_checksum(a) == quality.start_checksum(b)  # same seed, same weights
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert quality.start_checksum(a) != quality.start_checksum(b)



def test_quality_table_alias_and_margins(tmp_path, capsys):
    """--alias counts one method's rows as another's (one cell, whatever their
    S2HConfig says); the margin line is S2H's mean minus the best baseline's mean and,
    paired by seed, S2H minus that seed's best baseline."""
    quality = load_quality()
    base = {"model": "resnet20", "budget": 0.15, "e0": 1, "e1": 2, "train_size": 100,
            "test_size": None, "batch_size": 128, "lr": 0.05, "flops_ratio": 0.15,
            "params": 1000, "seconds": 10.0}
    acc = {("s2h:descent3", 0): 0.90, ("s2h", 1): 0.92,
           ("tp-taylor", 0): 0.88, ("tp-taylor", 1): 0.89,
           ("tp-magnitude", 0): 0.89, ("tp-magnitude", 1): 0.87,
           ("oneshot-l1", 0): 0.85, ("oneshot-l1", 1): 0.86}
    rows = [{**base, "method": m, "seed": s, "test_acc": a,
             **({"s2h_config": {"descent_epochs": 3 if m.endswith("3") else None}}
                if m.startswith("s2h") else {})} for (m, s), a in acc.items()]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert quality.main(["--table", str(path), "--alias", "s2h:descent3=s2h"]) == 0
    out = capsys.readouterr().out
    s2h = [ln for ln in out.splitlines() if ln.startswith("resnet20") and " s2h " in ln]
    assert len(s2h) == 1 and "0.9100" in s2h[0] and " 2 " in s2h[0]
    # means: S2H 0.91, best baseline tp-taylor 0.885 -> +2.50; by seed: 0.90 - 0.89, 0.92 - 0.89
    assert "S2H - best baseline +2.50 points on the means; paired by seed +1.00 / +3.00" in out
    rows.append({**rows[1], "method": "s2h:descent3"})  # seed 1 under both names
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="rows of both"):
        quality.main(["--table", str(path), "--alias", "s2h:descent3=s2h"])
