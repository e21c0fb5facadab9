"""Data loaders for the demo and the ``s2h-fx prune`` command.

* :func:`digits_loaders`: scikit-learn's handwritten digits (1797 real 8x8
  grayscale images that ship with scikit-learn, no download), upsampled to
  ``size`` x ``size``, three channels, normalised; a stratified, seeded 80/20
  split.
* :func:`folder_loaders`: an ``ImageFolder`` dataset with ``train/`` and
  ``val/`` subfolders (one folder per class in each).
* :func:`cifar_loaders`: CIFAR-10 or CIFAR-100 from a local root, in
  torchvision's format (``cifar-10-batches-py/`` or ``cifar-100-python/``);
  never downloads.
* :func:`fashion_mnist_loaders`: Fashion-MNIST's four IDX files (plain or
  gzipped) from Debian's ``dataset-fashion-mnist`` folder or any other; never
  downloads; a missing folder or file raises :class:`~s2h_fx.errors.DataError`.

Every function returns ``(train_loader, val_loader)`` yielding ``(x, y)``
batches; train batches are shuffled (seeded) and lightly augmented where the
images are natural ones. Missing data raises :class:`DataError`, naming the path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from s2h_fx.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {
    "cifar10": ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                "test_batch", "batches.meta"],
    "cifar100": ["train", "test", "meta"],
}


def _loaders(train: Dataset[Any], val: Dataset[Any], batch_size: int, seed: int,
             num_workers: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen,
                              num_workers=num_workers, drop_last=False)
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, val_loader


def _limit(ds: Dataset[Any], n: int | None, seed: int) -> Dataset[Any]:
    """A seeded random subset of ``n`` items (all of them when ``n`` is None)."""
    size = len(ds)  # type: ignore[arg-type]
    if n is None or n >= size:
        return ds
    idx = np.random.default_rng(seed).permutation(size)[:n]
    return Subset(ds, idx.tolist())


# ---- digits -----------------------------------------------------------------
def digits_tensors(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_val, y_val)``: digits at ``size`` x ``size``, 3 channels,
    normalised with the training split's mean and standard deviation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=0.2,
                                          stratify=digits.target, random_state=seed)
    x_train, x_val = images[idx_train], images[idx_val]
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, labels[idx_train], (x_val - mean) / std, labels[idx_val])


def digits_loaders(
    batch_size: int = 64, size: int = 32, seed: int = 0, *,
    max_train: int | None = None, max_val: int | None = None, num_workers: int = 0,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """scikit-learn's digits (10 classes, 1437 train / 360 val images) as
    ``size`` x ``size`` RGB tensors. ``max_train``/``max_val`` take seeded subsets."""
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    x_train, y_train, x_val, y_val = digits_tensors(size, seed)
    train = _limit(TensorDataset(x_train, y_train), max_train, seed)
    val = _limit(TensorDataset(x_val, y_val), max_val, seed + 1)
    return _loaders(train, val, batch_size, seed, num_workers)


# ---- image folders ------------------------------------------------------------
def _transforms(size: int, mean: tuple[float, ...], std: tuple[float, ...],
                natural_size: int | None = None) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(train, val) transforms. ``natural_size``: the images' own size (CIFAR's 32),
    where a padded random crop is the usual augmentation."""
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if natural_size is not None and natural_size == size:
        train = [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
        val: list[Any] = []
    elif natural_size is not None:
        train = [T.Resize(size), T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
        val = [T.Resize(size)]
    else:
        train = [T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip()]
        val = [T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)]
    return T.Compose(train + norm), T.Compose(val + norm)


def folder_loaders(
    root: str | Path, batch_size: int = 64, size: int = 224, seed: int = 0, *,
    num_workers: int = 0, max_train: int | None = None, max_val: int | None = None,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """An ImageFolder dataset: ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``
    (any image format PIL reads). Train: random resized crop and flip; val: resize
    and centre crop. Images are normalised with the ImageNet statistics."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} does not exist")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"data directory {str(root)!r} has no {split}/ subfolder "
                            f"(expected {root / split}/<class>/<image>)")
    train_tf, val_tf = _transforms(size, IMAGENET_MEAN, IMAGENET_STD)
    try:
        train = ImageFolder(str(root / "train"), transform=train_tf)
        val = ImageFolder(str(root / "val"), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read the image folders under {str(root)!r}: {exc}") from exc
    if train.classes != val.classes:
        raise DataError(f"{root / 'train'} and {root / 'val'} have different classes: "
                        f"{train.classes} vs {val.classes}")
    return _loaders(_limit(train, max_train, seed), _limit(val, max_val, seed + 1),
                    batch_size, seed, num_workers)


def num_classes_of(loader: DataLoader[Any]) -> int:
    """The number of classes of a loader built here (ImageFolder, CIFAR or digits)."""
    ds = loader.dataset
    while isinstance(ds, Subset):
        ds = ds.dataset
    classes = getattr(ds, "classes", None)
    if classes is not None:
        return len(classes)
    if isinstance(ds, TensorDataset):
        return int(ds.tensors[1].max()) + 1
    raise TypeError(f"cannot tell the number of classes of {type(ds).__name__}")


# ---- CIFAR ----------------------------------------------------------------------
def cifar_loaders(
    root: str | Path, name: str = "cifar10", batch_size: int = 128, size: int = 32,
    seed: int = 0, *, num_workers: int = 0, max_train: int | None = None,
    max_val: int | None = None,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """CIFAR-10 or CIFAR-100 from ``root`` (the folder that holds
    ``cifar-10-batches-py/`` or ``cifar-100-python/``, as torchvision downloads
    it); never downloads. Train: padded random crop and flip; val: the test split.

    torchvision checks each file's md5 against the official release."""
    from torchvision import datasets

    if name not in CIFAR_FOLDERS:
        raise ValueError(f"name must be one of {', '.join(CIFAR_FOLDERS)}, got {name!r}")
    root = Path(root)
    folder = root / CIFAR_FOLDERS[name]
    if not folder.is_dir():
        raise DataError(f"{name} not found: {str(folder)!r} does not exist (s2h-fx never "
                        f"downloads; fetch it with torchvision.datasets."
                        f"{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}"
                        f"({str(root)!r}, download=True))")
    missing = [f for f in CIFAR_FILES[name] if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name} under {str(folder)!r} is incomplete: missing "
                        f"{', '.join(missing)}")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    mean, std = CIFAR_STATS[name]
    train_tf, val_tf = _transforms(size, mean, std, natural_size=32)
    try:
        train = cls(str(root), train=True, transform=train_tf, download=False)
        val = cls(str(root), train=False, transform=val_tf, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{name} under {str(folder)!r} is not readable: {exc}") from exc
    return _loaders(_limit(train, max_train, seed), _limit(val, max_val, seed + 1),
                    batch_size, seed, num_workers)


# ---- Fashion-MNIST --------------------------------------------------------------
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # of the 60,000 training images
_IDX_TYPES = {0x08: np.uint8}  # the IDX type byte of unsigned bytes, the only one used here


def _idx_path(root: Path, stem: str) -> Path | None:
    """``root/stem`` or ``root/stem.gz``, whichever exists (the plain file first)."""
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped when the name ends in ``.gz``) as a
    numpy array of its stored shape. Only unsigned-byte data, as (Fashion-)MNIST has."""
    import gzip


    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {str(path)!r}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{str(path)!r} is not an IDX file of unsigned bytes (magic "
                         f"{raw[:4].hex() or 'missing'}, expected 0000080N)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{str(path)!r}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataError(f"{str(path)!r}: the header says {'x'.join(map(str, shape))} = "
                         f"{size} values, the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=header).reshape(shape)


def fashion_mnist_arrays(root: str | Path | None = None) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST IDX files under ``root`` (default: where Debian's
    ``dataset-fashion-mnist`` puts them), plain or gzipped, as uint8 arrays keyed
    like :data:`FASHION_MNIST_FILES`. Missing files raise
    :class:`~s2h_fx.errors.DataError` naming them."""

    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    paths = {k: _idx_path(root, stem) for k, stem in FASHION_MNIST_FILES.items()}
    missing = [f"{stem}[.gz]" for k, stem in FASHION_MNIST_FILES.items() if paths[k] is None]
    if missing:
        where = (f"{str(root)!r} is incomplete: missing {', '.join(missing)}" if root.is_dir()
                 else f"{str(root)!r} does not exist (needs {', '.join(missing)})")
        raise DataError(f"Fashion-MNIST not found: {where}. Install it with `apt-get install "
                         f"dataset-fashion-mnist` (into {FASHION_MNIST_ROOT}) or give the "
                         "folder that holds the four IDX files; s2h-fx never downloads")
    arrays = {k: read_idx(p) for k, p in paths.items() if p is not None}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split} files under {str(root)!r} disagree: "
                             f"images {images.shape}, labels {labels.shape}")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"Fashion-MNIST {split} labels under {str(root)!r} go up to "
                             f"{int(labels.max())}; expected 0-9")
    return arrays


class GreyImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """uint8 grey images ``(N, H, W)`` and labels, served as normalised float
    ``(channels, size, size)`` tensors (the grey channel repeated; bilinear resize
    when ``size`` differs)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str],
                 channels: int = 1, size: int | None = None) -> None:
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8))  # a writable copy
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.classes, self.channels, self.size = classes, channels, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[i].float().div(255.0) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        x = x.unsqueeze(0)
        if self.size is not None and self.size != x.shape[-1]:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False)[0]
        return x.expand(self.channels, -1, -1), self.labels[i]


def fashion_mnist_loaders(
    root: str | Path | None = None, batch_size: int = 128, seed: int = 0, *,
    max_train: int | None = None, max_val: int | None = None, channels: int = 1,
    size: int = 28, num_workers: int = 0,
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Fashion-MNIST (10 classes, 60,000 train / 10,000 test 28x28 grey images) from
    the four IDX files under ``root`` (default ``/usr/share/datasets/fashion-mnist``,
    where ``apt-get install dataset-fashion-mnist`` puts them); never downloads.

    ``max_train``/``max_val``: seeded random subsets (``seed`` also seeds the
    shuffle: the same seed gives the same subset and the same batch order).
    ``channels``: 1, or 3 for RGB models (the grey channel repeated); ``size``:
    the side the images are resized to. No augmentation; normalised with the
    training set's mean and standard deviation. The val loader is the test split.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    arrays = fashion_mnist_arrays(root)
    train = GreyImages(arrays["train_images"], arrays["train_labels"], FASHION_MNIST_CLASSES,
                       channels, size)
    val = GreyImages(arrays["test_images"], arrays["test_labels"], FASHION_MNIST_CLASSES,
                     channels, size)
    return _loaders(_limit(train, max_train, seed), _limit(val, max_val, seed + 1),
                    batch_size, seed, num_workers)
