"""Dataset loading on fixtures written here, and config errors that name the field."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from maestro_fl.config import ConfigError, SimConfig, TrainConfig, resolve
from maestro_fl.data import DatasetNotFoundError, batches, load_dataset


def write_idx_mnist(root: Path, folder: str, n_train: int = 12, n_test: int = 5) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_cifar_batches(root: Path, per_batch: int = 4) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8),
            b"labels": list(range(per_batch)),
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)


def test_digits_is_embedded_and_fixed() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train.x.shape == (1438, 1, 8, 8) and a.test.x.shape == (359, 1, 8, 8)
    assert torch.equal(a.test.y, b.test.y)
    assert abs(float(a.train.x.mean())) < 1e-4  # normalized on the training split
    assert sorted(a.train.y.unique().tolist()) == list(range(10))


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_mnist_from_local_root(tmp_path: Path, name: str, folder: str) -> None:
    write_idx_mnist(tmp_path, folder)
    data = load_dataset(name, tmp_path)
    assert data.train.x.shape == (12, 1, 28, 28) and data.test.x.shape == (5, 1, 28, 28)
    assert data.train.y.tolist() == [i % 10 for i in range(12)]
    assert data.spec.shape == (1, 28, 28)


def test_cifar10_from_local_python_batches(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert data.train.x.shape == (20, 3, 32, 32) and data.test.x.shape == (4, 3, 32, 32)
    assert data.augment
    x, _ = next(batches(data.train, 8, generator=torch.Generator().manual_seed(0), augment=True))
    assert x.shape == (8, 3, 32, 32)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_dataset_says_how_to_provide_it(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFoundError, match="data_root: .* not found .* download=true"):
        load_dataset(name, tmp_path)


def test_unknown_dataset_is_rejected() -> None:
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model=transformer"], "model"),
        (["rank_fraction=1.5"], "rank_fraction"),
        (["rank_fraction=0"], "rank_fraction"),
        (["eval_fractions=1.0,0"], r"eval_fractions\[1\]"),
        (["dataset=mnist", "data_root=/nonexistent/maestro"], "data_root"),
        (["sampler=random"], "sampler"),
        (["epochs=ten"], "epochs"),
        (["download=maybe"], "download"),
        (["lr=-1"], "lr"),
        (["no_such_key=1"], "unknown config key"),
    ],
)
def test_bad_config_names_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        resolve(TrainConfig, overrides=overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["rounnds=3"], r"'rounnds': did you mean 'rounds'\?"),
        (["rounds=2.5"], r"^rounds must be an integer, got '2.5'$"),
        (["lr=fast"], r"^lr must be a number, got 'fast'$"),
        (["tier_shares=0.5,0.5,0.5"], r"^tier_shares must be non-negative shares of the clients that sum to 1"),
        (["tier_shares=0.5,-0.5,1"], r"^tier_shares must be non-negative"),
        (["strategy=fedlodd"], r"^strategy must be one of .*, got 'fedlodd' \(did you mean 'fedlod'\?\)$"),
        (["model=cnnn"], r"^model must be one of .*, got 'cnnn' \(did you mean 'cnn' or 'cnn1d'\?\)$"),
        (["dataset=digit"], r"^dataset must be one of .*; got 'digit' \(did you mean 'digits'\?\)$"),
        (["partition=dirichlett"], r"\(did you mean 'dirichlet'\?\)$"),
        (["strategy=zzz"], r"^strategy must be one of .*, got 'zzz'$"),  # nothing close: no guess
    ],
)
def test_a_bad_simulate_key_or_value_gets_one_line_that_helps(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(SimConfig, overrides=overrides)


def test_a_quoted_number_in_a_config_file_is_refused_and_an_override_still_parses(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('rounds = "5"\n')
    with pytest.raises(ConfigError, match=r"^rounds must be an integer, got the string '5' \(TOML writes numbers"):
        resolve(SimConfig, path)
    assert resolve(SimConfig, path, ["rounds=7"]).rounds == 7  # the command line's strings are parsed
    path.write_text('tier_shares = ["0.5", 0.5]\n')
    with pytest.raises(ConfigError, match=r"^tier_shares\[0\] must be a number, got the string"):
        resolve(SimConfig, path)


def test_config_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('model = "mlp"\nepochs = 3\neval_fractions = [1.0, 0.5]\n')
    cfg = resolve(TrainConfig, path, ["epochs=4"])
    assert (cfg.model, cfg.epochs, cfg.eval_fractions) == ("mlp", 4, (1.0, 0.5))
    path.write_text("epochs = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(TrainConfig, path)


def test_partitions_cover_every_example_once_and_are_cached() -> None:
    from maestro_fl.partition import partition_indices

    labels = load_dataset("digits").train.y.numpy()
    for scheme in ("iid", "dirichlet", "pathological"):
        parts = partition_indices(labels, 20, scheme, seed=3)
        flat = np.concatenate(parts)
        assert len(parts) == 20 and sorted(flat.tolist()) == list(range(len(labels)))
        again = partition_indices(labels, 20, scheme, seed=3)  # from the on-disk cache
        assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    patho = partition_indices(labels, 20, "pathological", classes_per_client=2, seed=0)
    assert all(len(np.unique(labels[p])) <= 2 for p in patho)
    with pytest.raises(ValueError, match="partition must be one of"):
        partition_indices(labels, 5, "zipf")


# -- one copy of the data per machine ------------------------------------------------------------
def _mapped_from(tensor: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's memory lies in a mapping of ``path`` (Linux's /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


def test_the_drivers_dataset_is_memory_mapped_by_the_other_processes(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from maestro_fl.config import SimConfig
    from maestro_fl.data import load_shared
    from maestro_fl.federated import SHARED_DATA_ENV, load_task, share_task

    cfg = resolve(SimConfig, overrides={"dataset": "mnist1d", "dataset_samples": 600, "num_clients": 10,
                                        "clients_per_round": 10})
    env = share_task(cfg, tmp_path / "shared")
    monkeypatch.setenv(SHARED_DATA_ENV, env[SHARED_DATA_ENV])
    mapped, loaded = load_task(cfg), load_dataset("mnist1d", samples=600)
    for a, b in ((mapped.train, loaded.train), (mapped.test, loaded.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.x.dtype == b.x.dtype
    assert mapped.spec == loaded.spec and mapped.name == loaded.name and mapped.augment == loaded.augment
    assert _mapped_from(mapped.train.x, (tmp_path / "shared" / "train_x.npy").resolve())
    assert not _mapped_from(loaded.train.x, (tmp_path / "shared" / "train_x.npy").resolve())
    # another dataset, or a node without the folder, loads its own
    other = resolve(SimConfig, overrides={"dataset": "mnist1d", "dataset_samples": 500})
    assert len(load_task(other).train) + len(load_task(other).test) == 500
    assert load_shared(tmp_path / "elsewhere", "any") is None


def test_a_config_built_by_hand_with_lists_finds_its_federation_as_a_resolved_one() -> None:
    """``federation`` is looked up per message by the config's hash; a config holding lists has none."""
    import dataclasses

    from maestro_fl.config import SimConfig
    from maestro_fl.federated import federation

    by_hand = dataclasses.replace(SimConfig(), tier_shares=[0.2] * 5)
    resolved = resolve(SimConfig, overrides={"tier_shares": [0.2] * 5})
    assert federation(by_hand) is federation(by_hand) is federation(resolved)
