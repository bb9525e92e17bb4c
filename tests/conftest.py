"""Shared fixtures: one table of tiny models that every LoD test runs through."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from maestro_fl.models import InputSpec, build_model

# Flower must neither phone home nor write to the user's home during tests.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
torch.set_num_threads(1)


class TwoBranch(nn.Module):
    """A residual block with a strided 1x1 shortcut and BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.short = nn.Conv2d(3, 8, 1, stride=2, bias=False)
        self.head = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))) + self.short(x)
        return self.head(h.flatten(1))


# name -> (builder, input shape (C, H, W))
TINY_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)), (1, 4, 4)),
    "conv": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 2 * 2, 4)
        ),
        (2, 6, 6),
    ),
    "dilated": (
        lambda: nn.Sequential(nn.Conv2d(3, 10, 3, padding=2, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(10 * 25, 3)),
        (3, 5, 5),
    ),
    "residual_bn": (TwoBranch, (3, 5, 5)),
    "digits_cnn": (lambda: build_model("cnn", InputSpec.image(1, 8, 10)), (1, 8, 8)),
}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    """(name, dense model in eval mode, a batch of inputs)."""
    torch.manual_seed(0)
    builder, shape = TINY_MODELS[request.param]
    model = builder().eval()
    x = torch.randn(7, *shape)
    return request.param, model, x


@pytest.fixture
def flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    home = str(tmp_path_factory.mktemp("flwr_home"))
    monkeypatch.setenv("FLWR_HOME", home)
    return home


@pytest.fixture(scope="session")
def _ray_of_the_session() -> Iterator[None]:
    """Shuts down, at the end of the test run, the Ray that :func:`shared_ray` started (if it still runs)."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def shared_ray(_ray_of_the_session: None) -> None:
    """One local Ray for every test that does not need its own, started when a test first needs it.

    A Ray takes ~4 s to start on an idle 2-core machine and far longer on a loaded one; runs and sweeps
    given a running Ray use it (and leave it running), so the tests pay for it once. Only speed depends on
    it: a test that finds no Ray (an ``own_ray`` test shut it down) starts one of its own, as a user's run would.
    """
    import ray

    from strategies.runners.launch import quiet_flower, ray_init_args

    if not ray.is_initialized():
        quiet_flower()  # Flower's and Ray's settings (worker niceness among them) before Ray starts
        ray.init(**ray_init_args(""))


@pytest.fixture
def own_ray() -> Iterator[None]:
    """No Ray in this process before or after the test: for tests that start (or must find) a Ray of their own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


#: the modules that take longest, longest first (seconds of one idle 2-core run, 2026-12-04: 150, 103, 91, 44,
#: 37, 36, 34, 33, 32, 30, 26, 21; mostly Ray and subprocess start-up). They are collected first, and
#: ``pytest -n 2 --dist loadscope --no-loadscope-reorder`` hands modules out in collection order (without the
#: flag xdist orders them by test count, which sent the longest module last): the longest-first rule, so that
#: no worker starts a long module when the other has nothing left. Only the schedule changes.
LONG_MODULES = ("test_ray_engine.py", "test_simulation.py", "test_bring_your_own.py", "test_client_reuse.py",
                "test_methods.py", "test_default_shapes.py", "test_analysis.py", "test_first_hour.py",
                "test_hardening.py", "test_export.py", "test_cluster.py", "test_sweep.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long modules first, each module's tests in their own order (a stable sort: only the schedule changes)."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))
