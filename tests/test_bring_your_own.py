"""Your own model, data and devices: one table of real architectures through factorize, extract, footprint
and a federated round; references and objects through the Python API, on local and on Ray; data saved to
disk with a natural partition; bad inputs as one line before anything starts."""

from __future__ import annotations

import copy
import io
import re
import textwrap
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from maestro_fl.convert import active_ranks, extract, factorize, lod_layers, plan_factorization, ranks_at_fraction
from maestro_fl.footprint import MISSING_FLOP_FORMULAS, footprint
from maestro_fl.models import InputSpec, build_model
from strategies.api import RunResult, simulate


class TextTransformer(nn.Module):
    """Token ids → embedding → two encoder layers → mean pool → classes."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec.vocab_size, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class TiedAndReused(nn.Module):
    """Two Linears sharing one weight, a Linear called twice and registered under two names."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        d = spec.shape[0]
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.block = nn.Linear(d, d)
        self.alias = self.block
        self.head = nn.Linear(d, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        h = torch.relu(self.alias(torch.relu(self.block(h))))
        return self.head(h)


def tv_resnet18(spec: InputSpec) -> nn.Module:
    return torchvision.models.resnet18(num_classes=spec.num_classes)


def tv_mobilenet_v3_small(spec: InputSpec) -> nn.Module:
    return torchvision.models.mobilenet_v3_small(num_classes=spec.num_classes)


def zoo(name: str, norm: str | None = None) -> Callable[[InputSpec], nn.Module]:
    def build(spec: InputSpec, width: float = 1.0) -> nn.Module:
        return build_model(name, spec, norm, width=width)

    build.__name__ = f"zoo_{name}"
    return build


# name -> (builder of spec, the spec): tiny and real, every test below runs the whole table
ARCHITECTURES: dict[str, tuple[Callable[[InputSpec], nn.Module], InputSpec]] = {
    "torchvision_resnet18": (tv_resnet18, InputSpec((3, 32, 32), 10)),
    "torchvision_mobilenet_v3_small": (tv_mobilenet_v3_small, InputSpec((3, 32, 32), 10)),
    "text_transformer": (TextTransformer, InputSpec((12,), 4, "int64", 50)),
    "cnn1d": (zoo("cnn1d"), InputSpec((1, 40), 10)),
    "tied_weights": (TiedAndReused, InputSpec((16,), 3)),
    "zoo_mlp": (zoo("mlp"), InputSpec((1, 8, 8), 10)),
    "zoo_cnn": (zoo("cnn", "gn"), InputSpec((1, 8, 8), 10)),
    "zoo_lenet5": (zoo("lenet5"), InputSpec((1, 28, 28), 10)),
    "zoo_resnet18": (zoo("resnet18", "gn"), InputSpec((3, 32, 32), 10)),
    "zoo_vgg19": (zoo("vgg19", "gn"), InputSpec((3, 32, 32), 10)),
    "zoo_char_transformer": (zoo("char_transformer"), InputSpec((20,), 30, "int64", 30)),
}


def inputs(spec: InputSpec, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec.dtype == "int64":
        return torch.randint(0, spec.vocab_size, (n, *spec.shape), generator=g)
    return torch.randn(n, *spec.shape, generator=g)


def training_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of the forward pass training runs (train mode), counted by FlopCounterMode."""
    model.train()  # (with the formula for CPU attention the counter's registry lacks: tests/test_lod_attention.py)
    with FlopCounterMode(display=False, custom_mapping=MISSING_FLOP_FORMULAS) as counter:
        model(x)
    return counter.get_total_flops() // 2 // len(x)


def unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


_FACTORIZED: dict[str, nn.Module] = {}


def factorized(name: str, dense: nn.Module) -> nn.Module:
    """A copy of ``factorize(dense)`` at full rank (SVD), computed once per architecture: the tests below
    check the same factorization (a VGG-19's SVD takes ~9 s), each on its own copy."""
    if name not in _FACTORIZED:
        _FACTORIZED[name] = factorize(copy.deepcopy(dense))
    return copy.deepcopy(_FACTORIZED[name])


@pytest.fixture(params=sorted(ARCHITECTURES))
def architecture(request: pytest.FixtureRequest) -> tuple[str, nn.Module, InputSpec, torch.Tensor]:
    torch.manual_seed(0)
    builder, spec = ARCHITECTURES[request.param]
    return request.param, builder(spec).eval(), spec, inputs(spec, 4)


def test_factorize_at_full_rank_keeps_the_outputs_in_train_and_eval_mode(architecture) -> None:  # type: ignore[no-untyped-def]
    name, dense, spec, x = architecture
    expected = dense(x)
    lod = factorized(name, dense).eval()
    assert lod_layers(lod), f"{name}: nothing was factorized"
    torch.testing.assert_close(lod(x), expected, atol=2e-4, rtol=1e-3)
    with torch.no_grad():  # PyTorch's fused inference paths (TransformerEncoderLayer's) read .weight
        torch.testing.assert_close(lod(x), expected, atol=2e-4, rtol=1e-3)
    lod.train()
    lod(x).float().sum().backward()
    assert all(p.grad is not None for p in lod.parameters() if p.requires_grad)


def test_extract_at_half_rank_equals_the_lod_model_at_that_rank(architecture) -> None:  # type: ignore[no-untyped-def]
    name, dense, _, x = architecture
    lod = factorized(name, dense).eval()
    ranks = ranks_at_fraction(lod, 0.5)
    with active_ranks(lod, ranks):
        expected = lod(x)
    small = extract(lod, ranks).eval()
    torch.testing.assert_close(small(x), expected, atol=1e-5, rtol=1e-4)
    assert unique_params(small) < unique_params(lod)


def test_footprint_equals_flop_counter_and_deduplicated_parameters(architecture) -> None:  # type: ignore[no-untyped-def]
    name, dense, spec, x = architecture
    fp = footprint(dense, spec)
    assert fp.macs == training_macs(copy.deepcopy(dense), x), name
    assert fp.params == unique_params(dense)
    assert fp.dense_params == fp.params and fp.dense_macs == fp.macs
    lod = factorize(copy.deepcopy(dense), init="random")
    ranks = ranks_at_fraction(lod, 0.5)
    small = extract(lod, ranks)
    at_rank = footprint(lod, spec, ranks)
    assert (at_rank.params, at_rank.macs) == (unique_params(small), training_macs(small, x))
    assert at_rank.dense_params == fp.params and at_rank.dense_macs == fp.macs
    assert sum(row["params"] for row in at_rank.rows()) == at_rank.params
    assert all(row["macs"] >= 0 for row in at_rank.rows())


def test_shared_modules_and_tied_weights_stay_shared_and_the_plan_says_why() -> None:
    spec = InputSpec((16,), 3)
    model = factorize(TiedAndReused(spec))
    assert model.a.weight is model.b.weight and type(model.a) is nn.Linear  # tied: left dense, still tied
    assert model.block is model.alias and model.block in lod_layers(model).values()
    plan = str(plan_factorization(TiedAndReused(spec)))
    assert "tied to" in plan and "block = alias" in plan
    # a module called twice counts twice, a shared parameter once
    fp = footprint(TiedAndReused(spec), spec)
    assert fp.macs == 16 * 16 * 4 + 16 * 3 and fp.params == 3 * (16 * 16 + 16) - 16 * 16 + 16 * 3 + 3

    text_plan = str(plan_factorization(TextTransformer(InputSpec((12,), 4, "int64", 50))))
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):  # attention is factorized, one projection at a time
        assert re.search(rf"^encoder\.layers\.0\.self_attn\.{proj} +MultiheadAttention +LoD rank 32$", text_plan, re.M)
    assert "embed.weight" in text_plan and "not factorizable" in text_plan  # listed, not skipped silently


@pytest.fixture(scope="module")
def big_devices() -> pd.DataFrame:
    """Devices that afford every sub-model of every model in the table (memory and compute to spare)."""
    return pd.DataFrame([{"client_id": i, "tier": i % 2, "macs_per_s": 1e15, "memory_bytes": 1e12, "up_bps": 1e9,
                          "down_bps": 1e9, "availability": 1.0} for i in range(2)])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_one_federated_round_through_the_python_api(name: str, big_devices: pd.DataFrame, tmp_path: Path) -> None:
    """A builder and arrays as objects, the devices as a DataFrame; the run's tables come back as DataFrames."""
    builder, spec = ARCHITECTURES[name]
    x = inputs(spec, 40, seed=1).numpy()
    y = np.arange(40) % spec.num_classes
    run = simulate(builder, (x, y), big_devices, rounds=1, num_clients=2, clients_per_round=2, partition="iid",
                   local_epochs=1, batch_size=8, val_fraction=0.0, backend="local", progress=False,
                   out_dir=str(tmp_path), run_name="r", norm="default")
    assert isinstance(run, RunResult) and run.run_dir == tmp_path / "r"
    assert (run.clients["status"] == "ok").sum() == 2, run.clients[["status", "reason"]]
    assert sorted(run.tiers["tier"]) == [0, 1]
    assert np.isfinite(run.tiers["accuracy"]).all() and (run.tiers["params"] > 0).all()
    assert run.rounds["round"].tolist() == [1]


# -- references, by import, on Ray --------------------------------------------------------------
USER_MODULE = '''
import numpy as np
import torch
from torch import nn


def build(spec, width=1.0):
    hidden = max(1, int(round(32 * width)))
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(spec.shape)), hidden), nn.ReLU(),
                         nn.Linear(hidden, spec.num_classes))


def load():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    x = rng.normal(size=(300, 6)).astype(np.float32) + y[:, None]
    return x, y
'''


@pytest.mark.slow
def test_a_simulation_on_ray_takes_model_and_dataset_as_references(shared_ray: None, tmp_path: Path, flwr_home: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``module:attr`` of a module the test writes (not shipped in maestro-fl), resolved in the Ray actors."""
    (tmp_path / "my_task_mod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = simulate("my_task_mod:build", "my_task_mod:load", rounds=2, num_clients=6, clients_per_round=6,
                   partition="iid", tier_shares=[0.5, 0.5], backend="ray", progress=False,
                   out_dir=str(tmp_path / "runs"), run_name="ray")
    config = pd.read_json(run.run_dir / "config.json", typ="series")
    assert config["model"] == "my_task_mod:build" and config["dataset"] == "my_task_mod:load"
    assert (run.clients["status"] == "ok").all() and len(run.clients) > 0
    assert run.tiers["accuracy"].iloc[-2:].min() > 0.5  # three shifted blobs: learnable in two rounds


@pytest.mark.slow
def test_in_memory_objects_reach_the_ray_actors(shared_ray: None, tmp_path: Path, flwr_home: str) -> None:
    """An nn.Module builder defined here and arrays: shipped to the actors with the run."""
    builder, spec = ARCHITECTURES["zoo_mlp"]
    x, y = inputs(spec, 120).numpy(), np.arange(120) % 10
    run = simulate(builder, (x, y), rounds=1, num_clients=4, clients_per_round=4, partition="iid",
                   backend="ray", progress=False, out_dir=str(tmp_path), run_name="objects")
    assert (run.clients["status"] == "ok").sum() >= 1
    assert str(pd.read_json(run.run_dir / "config.json", typ="series")["model"]).startswith("object:model:")


# -- data saved to disk, a natural partition ----------------------------------------------------
def test_a_dataset_saved_to_disk_with_a_natural_partition(tmp_path: Path) -> None:
    """A Hugging Face dataset written with save_to_disk (offline), one client per writer."""
    import datasets

    rng = np.random.default_rng(0)
    writers = np.repeat(np.arange(5), [30, 24, 18, 12, 16])
    labels = rng.integers(0, 3, len(writers))
    features = (rng.normal(size=(len(writers), 8)) + labels[:, None]).astype(np.float32)
    ds = datasets.Dataset.from_dict({"pixels": features.tolist(), "digit": labels.tolist(),
                                     "writer": [f"w{w}" for w in writers]})
    datasets.DatasetDict({"train": ds, "test": ds.select(range(20))}).save_to_disk(str(tmp_path / "saved"))
    run = simulate("mlp", str(tmp_path / "saved"), label_column="digit", partition="natural", partition_by="writer",
                   num_clients=5, clients_per_round=5, rounds=1, val_fraction=0.0, backend="local",
                   progress=False, out_dir=str(tmp_path / "runs"), run_name="natural", tier_shares=[1.0],
                   tier_fractions=[1.0])
    assert sorted(run.devices["num_examples"]) == sorted([30, 24, 18, 12, 16])
    assert (run.clients["status"] == "ok").sum() >= 1


# -- bad inputs: one line, before anything starts -----------------------------------------------
BAD = [
    (["model=no_such_package.nets:build"], "cannot import module 'no_such_package.nets'"),
    (["dataset=os.path:no_such_loader"], "has no attribute 'no_such_loader'"),
    (["dataset=mnist1d", "model=cnn"], "rejects the inputs of dataset 'mnist1d'"),
    (["num_clients=200"], "num_clients=200"),
    (["label_column=digitz", "dataset=SAVED"], "no column 'digitz'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=["no-module", "no-attribute", "input-shape", "partition", "column"])
def test_bad_inputs_are_one_line_and_leave_no_run_directory(args: list[str], message: str, tmp_path: Path) -> None:
    import datasets

    from strategies.cli import main

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"x": [[0.0, 1.0]] * 10, "digit": [0, 1] * 5}).save_to_disk(str(saved))
    out = tmp_path / "runs"
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["simulate", *(a.replace("SAVED", str(saved)) for a in args), f"out_dir={out}", "progress=false"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert not out.exists() or not any(out.iterdir())


def test_the_partition_error_says_what_would_work() -> None:
    from maestro_fl.config import ConfigError, SimConfig, resolve
    from maestro_fl.federated import check_task

    with pytest.raises(ConfigError) as info:
        check_task(resolve(SimConfig, overrides={"num_clients": 200}))
    text = str(info.value)
    for needle in ("1438 training examples", "min_partition_size=10", "alpha=0.5", "partition=iid"):
        assert needle in text
    # and what it proposes works
    fixed = resolve(SimConfig, overrides={"num_clients": 200, "min_partition_size": 2})
    assert len(check_task(fixed).partitions) == 200


def test_a_width_method_needs_a_builder_that_takes_width(tmp_path: Path) -> None:
    from maestro_fl.config import ConfigError

    def no_width(spec: InputSpec) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(spec.shape)), 32), nn.ReLU(),
                             nn.Linear(32, spec.num_classes))

    with pytest.raises(ConfigError, match="takes no width argument"):
        simulate(no_width, strategy="heterofl", backend="local", out_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_python_api_refuses_objects_on_flowers_engine(tmp_path: Path) -> None:
    from maestro_fl.config import ConfigError

    with pytest.raises(ConfigError, match="backend='flower' cannot ship"):
        simulate(zoo("mlp"), backend="flower", out_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())



@pytest.mark.slow
def test_the_bring_your_own_notebook_runs_and_draws(tmp_path: Path) -> None:
    """It defines its model, data and devices itself, simulates through the Python API and plots."""
    import nbformat

    from tests.notebook_runner import run_in_process

    root = Path(__file__).resolve().parents[1]
    nb = nbformat.read(root / "analysis" / "notebooks" / "bring_your_own.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebooks are stored without outputs"
    assert "parameters" in nb.cells[0].metadata.get("tags", [])
    nb.cells[0].source = f"OUT_DIR = {str(tmp_path)!r}\nROUNDS = 3"
    assert run_in_process(nb, root) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedlod", "fjord"]
    assert len(pd.read_csv(tmp_path / "fjord" / "rounds.csv")) == 3


def test_train_through_the_python_api_takes_objects(tmp_path: Path) -> None:
    """Centralized LoD training of a builder on arrays; the ladder comes back as a DataFrame."""
    from strategies.api import train

    builder, spec = ARCHITECTURES["zoo_mlp"]
    x, y = inputs(spec, 200).numpy(), np.arange(200) % 10
    run = train(builder, (x, y), epochs=2, progress=False, out_dir=str(tmp_path), run_name="t",
                eval_fractions=[1.0, 0.5])
    assert run.run_dir == tmp_path / "t" and (run.run_dir / "model.pt").exists()
    assert run.ladder["rank_fraction"].tolist() == [1.0, 0.5] and len(run.epochs) == 2
    assert run.ladder["params"].iloc[1] < run.ladder["params"].iloc[0]


@pytest.mark.slow
def test_sweep_and_compare_through_the_python_api_ship_objects_to_ray_tasks(shared_ray: None, tmp_path: Path) -> None:
    from strategies.api import compare, sweep

    builder, spec = ARCHITECTURES["zoo_mlp"]
    x, y = inputs(spec, 160).numpy(), np.arange(160) % 10
    small = {"rounds": 1, "num_clients": 4, "clients_per_round": 4, "partition": "iid", "local_epochs": 1}
    result = sweep({"sweep": {"name": "s", "out_dir": str(tmp_path)}, "base": small, "grid": {"seed": [0, 1]}},
                   model=builder, dataset=(x, y))
    assert set(result.results["status"]) == {"ok"} and result.results["run"].nunique() == 2
    compared = compare(builder, (x, y), methods=["fedlod", "heterofl"], seeds=[0], out_dir=str(tmp_path / "c"),
                       **small)
    assert set(compared.summary["method"]) == {"fedlod", "heterofl"}
    assert compared.matched is not None and (compared.matched["method"] == "heterofl").any()
