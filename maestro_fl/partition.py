"""Federated partitions of a labelled dataset, through flwr-datasets' partitioners.

The partitioners run offline on a ``datasets.Dataset`` built from the labels
alone; what comes back is, per client, the indices of its examples, split into
train and validation parts. The same seed always gives the same partition.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

PARTITIONS = ("iid", "dirichlet", "pathological", "natural")


class PartitionError(ValueError):
    """The partition asked for cannot be made; the message says what would work."""


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "dirichlet",
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_partition_size: int = 10,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Indices of each partition's examples.

    Parameters
    ----------
    scheme : {"iid", "dirichlet", "pathological", "natural"}
        IID; label-skewed Dirichlet(α) (Hsu et al. 2019); pathological, each
        client holding ``classes_per_client`` classes (McMahan et al. 2017); or
        natural, one client per value of ``groups`` (a writer id, as FEMNIST is
        split; flwr-datasets' ``NaturalIdPartitioner``); with fewer clients than
        groups, the ``num_partitions`` largest groups, and the others' examples unused.
    min_partition_size : int
        Dirichlet only: redraw until every partition has at least this many examples.
    groups : array, optional
        Natural only: each example's group.

    Raises
    ------
    PartitionError
        The partition cannot be made; the message names the numbers and what would work.

    Results are cached on disk (keyed by labels and arguments): a simulation's
    workers then load the server's partition instead of each importing
    ``datasets`` and pyarrow (~70 MB per worker) to recompute it.
    """
    if scheme not in PARTITIONS:
        raise PartitionError(f"partition must be one of {list(PARTITIONS)}, got {scheme!r}")
    if num_partitions < 1 or num_partitions > len(labels):
        raise PartitionError(f"num_clients must be in [1, {len(labels)}] (the dataset's training examples), "
                             f"got {num_partitions}")
    if scheme == "natural":
        if groups is None or len(groups) != len(labels):
            raise PartitionError("partition='natural' needs partition_by: a column giving each example's group")
        values, sizes = np.unique(groups, return_counts=True)
        if len(values) < num_partitions:
            raise PartitionError(f"partition='natural': the dataset has {len(values)} groups in partition_by; "
                                 f"set num_clients to at most {len(values)} (one client per group), got "
                                 f"{num_partitions}")
        if len(values) > num_partitions:  # the num_clients largest groups (LEAF samples its users likewise)
            largest = values[np.argsort(-sizes, kind="stable")[:num_partitions]]
            kept = np.flatnonzero(np.isin(groups, largest))
            parts = partition_indices(labels[kept], num_partitions, "natural", groups=groups[kept], seed=seed)
            return [kept[part] for part in parts]
    key = hashlib.sha256(
        np.ascontiguousarray(labels).tobytes()
        + (np.ascontiguousarray(groups).tobytes() if scheme == "natural" and groups is not None else b"")
        + repr((CACHE_FORMAT, num_partitions, scheme, alpha, classes_per_client, min_partition_size, seed)).encode()
    ).hexdigest()
    folder = cache_folder()
    cache = folder / f"{key[:24]}.npz" if folder is not None else None
    cached = _read_cache(cache, key, len(labels), num_partitions) if cache is not None else None
    if cached is not None and _plausible(cached, scheme, min_partition_size):
        return cached
    try:
        out = _partition(labels, num_partitions, scheme, alpha, classes_per_client, min_partition_size, seed, groups)
    except ValueError as err:  # flwr-datasets: "the max number of attempts (10) was reached", and others
        raise PartitionError(_what_would_work(labels, num_partitions, scheme, alpha, classes_per_client,
                                              min_partition_size, seed, err)) from None
    if cache is not None:
        _write_cache(cache, key, out)
    return out


CACHE_FORMAT = 3  # bump when what a cache file holds changes (3: a keyed digest)
#: environment variable naming the partition cache's folder (default: a private one in the temp folder)
CACHE_ENV = "MAESTRO_FL_CACHE"


def cache_folder() -> Path | None:
    """This user's private partition cache (created 0700), or ``None`` when it is not safe to use.

    It lives in the temp folder that the Ray actors of this machine share with
    the driver, under a name with the user id. A folder that someone else owns,
    or that others may write, is refused (and nothing is cached): a file
    planted there would decide which examples each client trains on.
    """
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / f"maestro-fl-{os.getuid()}")
    folder = root / "partitions"
    try:
        for path in (root, folder):
            path.mkdir(mode=0o700, exist_ok=True)
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
                _warn_cache(path)
                return None
    except OSError:
        return None
    return folder


@lru_cache(maxsize=4)
def _warn_cache(path: Path) -> None:
    warnings.warn(f"partition cache {path} is not private to this user (another owner, a link, or writable by "
                  "others): partitions are recomputed, never read from it", stacklevel=3)


def _write_cache(cache: Path, key: str, out: list[np.ndarray]) -> None:
    """Write atomically through an unpredictable temp name in the private folder (never through a planted link)."""
    indices = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    tmp: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(dir=cache.parent, prefix=".part-", suffix=".npz", delete=False) as fh:
            tmp = Path(fh.name)
            np.savez(fh, indices=indices, sizes=np.array([len(o) for o in out]), key=np.array(key),
                     digest=np.array(_digest(indices, key)))
        os.replace(tmp, cache)
    except OSError:  # a full or read-only temp folder: the partition is still right, only not cached
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _digest(indices: np.ndarray, key: str) -> str:
    """HMAC-SHA256 of the partition, keyed by everything it was made from."""
    return hmac.new(key.encode(), np.ascontiguousarray(indices, dtype=np.int64).tobytes(), hashlib.sha256).hexdigest()


def _plausible(parts: list[np.ndarray], scheme: str, min_partition_size: int) -> bool:
    """A cached partition re-checked against what its scheme guarantees."""
    sizes = np.array([len(p) for p in parts])
    if not len(sizes):
        return False
    if scheme == "dirichlet" and (sizes < min_partition_size).any():
        return False
    if scheme == "iid" and sizes.max() - sizes.min() > 1:  # (min(initial=0) would be 0: every IID file refused)
        return False
    return True


def _read_cache(path: Path, key: str, num_examples: int, num_partitions: int) -> list[np.ndarray] | None:
    """The cached partition, or ``None`` when the file is missing, foreign, damaged or not for these arguments.

    The cache sits in the shared temp folder: every file is checked against the
    full key of what it was made from and the digest of its content, and the
    partition must be one of the dataset's examples among exactly the clients asked for.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            indices, sizes = z["indices"].astype(np.int64), z["sizes"].astype(np.int64)
            if not hmac.compare_digest(str(z["digest"]), _digest(indices, key)):
                return None
    except Exception:  # noqa: BLE001 - any unreadable cache file is recomputed
        return None
    if len(sizes) != num_partitions or sizes.sum() != len(indices) or (sizes < 0).any():
        return None
    if len(indices) and (indices.min() < 0 or indices.max() >= num_examples or len(np.unique(indices)) != len(indices)):
        return None
    return list(np.split(indices, np.cumsum(sizes)[:-1]))


def _what_would_work(
    labels: np.ndarray, n: int, scheme: str, alpha: float, classes_per_client: int, min_size: int, seed: int,
    err: Exception,
) -> str:
    """Why the partition failed, with settings found to work (tried here, quickly, on the labels alone)."""
    head = (f"partition: cannot split the {len(labels)} training examples into num_clients={n} "
            f"{scheme} partitions")
    if scheme != "dirichlet":
        return f"{head} ({err})"
    head += f" (alpha={alpha}) of at least min_partition_size={min_size} examples each"
    options = []
    for smaller in sorted({max(1, min_size // 2), max(1, min_size // 4), 1}, reverse=True):
        if smaller < min_size and _feasible(labels, n, alpha, smaller, seed):
            options.append(f"min_partition_size={smaller} (smaller clients)")
            break
    lo, hi = 1, n - 1  # the most clients that work at this minimum size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _feasible(labels, mid, alpha, min_size, seed) else (lo, mid - 1)
    if lo >= 1 and _feasible(labels, lo, alpha, min_size, seed):
        options.append(f"num_clients={lo} or fewer")
    options.append("partition=iid")
    return f"{head}; flwr-datasets gave up redrawing. These work: " + ", or ".join(options)


def _feasible(labels: np.ndarray, n: int, alpha: float, min_size: int, seed: int) -> bool:
    try:
        _partition(labels, n, "dirichlet", alpha, 2, min_size, seed, None)
        return True
    except ValueError:
        return False


def _partition(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float,
    classes_per_client: int,
    min_partition_size: int,
    seed: int,
    groups: np.ndarray | None,
) -> list[np.ndarray]:
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    columns = {"label": np.asarray(labels).tolist(), "idx": list(range(len(labels)))}
    if scheme == "natural":
        columns["group"] = np.asarray(groups).astype(str).tolist()
    ds = Dataset.from_dict(columns)
    if scheme == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "natural":
        part = NaturalIdPartitioner(partition_by="group")
    elif scheme == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=True,
            seed=seed,
        )
    else:
        part = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    part.dataset = ds
    with warnings.catch_warnings():  # Dirichlet redraws until min_partition_size holds, warning each time
        warnings.simplefilter("ignore", UserWarning)
        out = [np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_partitions)]
    if scheme == "iid":  # the IID partitioner splits in order; shuffle the assignment by seed
        perm = np.random.default_rng(seed).permutation(len(labels))
        out = [perm[idx] for idx in out]
    return out


def train_val_split(indices: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into train and validation parts (at least one training example)."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(indices)
    n_val = min(int(round(val_fraction * len(indices))), max(len(indices) - 1, 0))
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])
