"""Datasets as in-memory tensors, and fast mini-batch iteration.

``digits`` (scikit-learn's bundled 1,797 8×8 handwritten digits) is the
embedded default and needs no network. MNIST and Fashion-MNIST load through
torchvision, CIFAR-10 from its python batches; each is read from a local
root, or downloaded there when ``download=True``. A dataset that cannot be
found raises :class:`DatasetNotFoundError` saying how to provide it; nothing
falls back to other data.

Everything is held as normalized float tensors: at the sizes simulated here
the Python overhead of ``DataLoader`` is larger than the training step.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .models import InputSpec

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")

# channel mean/std used by the papers' usual transforms
_NORMALIZE = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither under ``data_root`` nor downloadable, or what is there is not that dataset."""


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray | torch.Tensor) -> Split:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Split(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class ImageData:
    name: str
    train: Split
    test: Split
    spec: InputSpec
    augment: bool  # random crop + flip on training batches (CIFAR-10)


def load_dataset(name: str, root: str | Path = "data", download: bool = False) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`)."""
    if name == "digits":
        return _digits()
    if name in ("mnist", "fashion_mnist"):
        return _torchvision_mnist(name, Path(root), download)
    if name == "cifar10":
        return _cifar10(Path(root), download)
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")


def _normalize(x: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = _NORMALIZE[name]
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def _digits() -> ImageData:
    # Read scikit-learn's bundled CSV directly: importing sklearn (and scipy with it) would add
    # ~170 MB to every simulation worker for a 1,797-row table.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError("dataset 'digits' ships with scikit-learn; install it (pip install scikit-learn)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0
    y = table[:, -1].astype(np.int64)
    # a fixed stratified 80/20 split: the test set never depends on the run's seed
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(0.2 * len(idx)))]] = True
    x_tr, x_te, y_tr, y_te = x[~test], x[test], y[~test], y[test]
    mean, std = float(x_tr.mean()), float(x_tr.std())
    to = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return ImageData(
        "digits",
        Split(to(x_tr), torch.from_numpy(y_tr)),
        Split(to(x_te), torch.from_numpy(y_te)),
        InputSpec(1, 8, 10),
        augment=False,
    )


def _how_to_provide(what: str, root: Path, layout: str) -> str:
    return (
        f"data_root: {what} not found under {str(root)!r}. Provide it by placing {layout} there, "
        f"or set download=true on a machine with network access (files are cached under data_root)."
    )


def _torchvision_mnist(name: str, root: Path, download: bool) -> ImageData:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:
        layout = f"the four idx files (e.g. train-images-idx3-ubyte) in {cls.__name__}/raw/"
        raise DatasetNotFoundError(_how_to_provide(cls.__name__, root, layout) + f" ({err})") from err

    def split(ds: datasets.MNIST) -> Split:
        x = ds.data.unsqueeze(1).float().div_(255.0)
        return Split(_normalize(x, name), ds.targets.long().clone())

    return ImageData(name, split(train), split(test), InputSpec(1, 28, 10), augment=False)


def _cifar10(root: Path, download: bool) -> ImageData:
    folder = root / "cifar-10-batches-py"
    if not folder.exists() and download:
        from torchvision import datasets

        try:
            datasets.CIFAR10(str(root), train=True, download=True)
        except (RuntimeError, OSError) as err:
            raise DatasetNotFoundError(_how_to_provide("CIFAR-10", root, "cifar-10-batches-py/") + f" ({err})") from err
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        layout = "the python-version batches (cifar-10-batches-py/data_batch_1..5, test_batch)"
        raise DatasetNotFoundError(_how_to_provide("CIFAR-10", root, layout) + f" (missing {missing})")

    def read(files: list[str]) -> Split:
        xs, ys = [], []
        for f in files:
            try:
                with open(folder / f, "rb") as fh:
                    batch = _CifarUnpickler(fh, encoding="bytes").load()
                xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
                raise DatasetNotFoundError(f"data_root: {folder / f} is not a CIFAR-10 batch ({err})") from None
        x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
        return Split(_normalize(x, "cifar10"), torch.from_numpy(np.concatenate(ys)))

    return ImageData("cifar10", read(names[:5]), read(names[5:]), InputSpec(3, 32, 10), augment=True)


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's python batches and nothing else: a pickle is a program, and ``data_root`` is the user's.

    The batches are dicts of byte strings, lists of ints and one uint8 NumPy
    array; only the NumPy globals such an array needs may be loaded.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}; only arrays, lists and bytes "
                                         "are allowed in the batches (is data_root a CIFAR-10 folder?)")
        return super().find_class(module, name)


def _crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip, per sample, on a batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    augment: bool = False,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of a split, shuffled by ``generator`` (deterministic per seed)."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = split.x[idx]
        if augment:
            x = _crop_flip(x, generator if generator is not None else torch.default_generator)
        yield x, split.y[idx]
