"""Baselines' aggregate_train fed with fake replies (Flower's fedavgm_test.py style), hand-computed.

HeteroFL and FjORD on width slices, FedHM on truncated SVD factors, FedAvg
dense and exclusive on the dense model; plus the width-sliced models, the
bytes each client moves, and FjORD's ordered dropout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from maestro_fl import message_keys as P
from maestro_fl.config import ConfigError, SimConfig, resolve
from maestro_fl.data import Split
from maestro_fl.footprint import footprint
from maestro_fl.models import InputSpec, build_model, scaled
from maestro_fl.training import EpochStats, SGDStep, run_epoch
from maestro_fl.width import OrderedDropout, corner
from strategies.submodel_strategy import SubModelStrategy, to_numpy
from tests.fakes import fake_strategy, filled, messages, moved, reply, sent, tiny_wide

# -- helpers of these tests: the width family cut and trained directly, outside a method --
Arrays = dict[str, np.ndarray]


def slice_corners(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]]) -> Arrays:
    """The sub-model of ``shapes`` cut out of the full model's ``arrays`` (leading corners).

    Raises
    ------
    ValueError
        A name the full model lacks, or a shape that is not a corner of it.
    """
    out: Arrays = {}
    for name, shape in shapes.items():
        if name not in arrays:
            raise ValueError(f"sub-model parameter {name!r} is not in the full model")
        full = arrays[name]
        if len(shape) != full.ndim or any(s > f for s, f in zip(shape, full.shape)):
            raise ValueError(f"{name}: {tuple(shape)} is not a leading corner of the full shape {full.shape}")
        out[name] = full[corner(shape)]
    return out


def ordered_dropout_epoch(
    od: OrderedDropout,
    data: Split | Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    distill: bool = False,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    augment: bool = False,
    clip_grad_norm: float = 0.0,
    class_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> EpochStats:
    """One epoch of FjORD training (:func:`~maestro_fl.training.run_epoch` with width draws and SGD).

    Each step trains one sampled width; with ``distill`` (FjORD's
    self-distillation) a step below ``p_max`` adds ``CE(f_p(x), softmax(f_max(x)))``.
    With a single width level this is plain SGD on the client's sub-model
    (HeteroFL's local training). ``class_mask`` (bool, one entry per class)
    zeroes the logits of the other classes, as HeteroFL's masked classifier does.
    """
    od.model.train()
    return run_epoch(
        data,
        od,
        SGDStep(optimizer, clip_grad_norm),
        distill=distill,
        class_mask=class_mask,
        batch_size=batch_size,
        generator=generator,
        augment=augment,
        device=device,
    )


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def width_strategy(name: str, fractions: list[float], examples: list[int] | None = None,
                   **cfg: object) -> tuple[SubModelStrategy, ArrayRecord]:
    return fake_strategy(name, fractions, examples, build=tiny_wide, **cfg)


# -- HeteroFL and FjORD -----------------------------------------------------------
@pytest.mark.parametrize("name,corner_value", [("heterofl", 2.0), ("fjord", 2.5)])
def test_width_slices_average_over_their_holders(name: str, corner_value: float) -> None:
    """Client A (width 0.5, 10 examples) sends 1s, B (full, 30 examples) sends 3s.

    HeteroFL counts: the block both hold is (1+3)/2 = 2. FjORD weights by
    examples: (10·1 + 30·3)/40 = 2.5. Elements only B holds are 3.
    """
    strategy, arrays = width_strategy(name, [0.5, 1.0], [10, 30])
    a, b = messages(strategy, arrays)
    assert float(a.content[P.CONFIG][P.FRACTION]) == 0.5
    assert sent(a)["0.weight"].shape == (4, 6)
    out, _ = strategy.aggregate_train(1, [reply(a, filled(a, 1.0), 10), reply(b, filled(b, 3.0), 30)])
    g = to_numpy(out)
    np.testing.assert_allclose(g["0.weight"][:4], corner_value)
    np.testing.assert_allclose(g["0.weight"][4:], 3.0)
    np.testing.assert_allclose(g["0.bias"], [corner_value] * 4 + [3.0] * 4)
    np.testing.assert_allclose(g["2.weight"][:, :4], corner_value)  # input side of the last layer is sliced
    np.testing.assert_allclose(g["2.weight"][:, 4:], 3.0)
    np.testing.assert_allclose(g["2.bias"], corner_value)  # classes are never sliced: both hold it


def test_heterofl_averages_each_output_row_over_the_clients_holding_that_class() -> None:
    """A (width 0.5, classes {0, 1}) sends 1s, B (full, classes {1, 2}) sends 3s; 4 classes.

    Output rows: class 0 only A (1 on A's corner, old values beyond it), class 1 both (2 on the
    corner, 3 beyond), class 2 only B (3), class 3 nobody (old values). Hidden layers as before.
    """
    strategy, arrays = width_strategy("heterofl", [0.5, 1.0], [10, 30], method=("label_mask=true",))
    before = to_numpy(arrays)
    assert strategy.method.classifier == ("2.weight", "2.bias")
    a, b = messages(strategy, arrays)
    assert bool(a.content[P.CONFIG][P.LABEL_MASK])
    ra, rb = reply(a, filled(a, 1.0), 10), reply(b, filled(b, 3.0), 30)
    ra.content[P.METRICS][P.LABELS] = [0, 1]
    rb.content[P.METRICS][P.LABELS] = [1, 2]
    g = to_numpy(strategy.aggregate_train(1, [ra, rb])[0])
    w, bias = g["2.weight"], g["2.bias"]
    np.testing.assert_allclose(w[0, :4], 1.0)
    np.testing.assert_array_equal(w[0, 4:], before["2.weight"][0, 4:])
    np.testing.assert_allclose(w[1], [2.0] * 4 + [3.0] * 4)
    np.testing.assert_allclose(w[2], 3.0)
    np.testing.assert_array_equal(w[3], before["2.weight"][3])
    np.testing.assert_allclose(bias[:3], [1.0, 2.0, 3.0])
    assert bias[3] == before["2.bias"][3]
    np.testing.assert_allclose(g["0.weight"][:4], 2.0)  # hidden layers are not masked


@pytest.mark.parametrize("name", ["heterofl", "fjord"])
def test_width_elements_nobody_trained_keep_their_values(name: str) -> None:
    strategy, arrays = width_strategy(name, [0.5, 1.0])
    before = to_numpy(arrays)
    a, b = messages(strategy, arrays)
    out, _ = strategy.aggregate_train(1, [reply(a, filled(a, 1.0), 10), Message(Error(code=1, reason="x"), reply_to=b)])
    g = to_numpy(out)
    np.testing.assert_allclose(g["0.weight"][:4], 1.0)
    np.testing.assert_array_equal(g["0.weight"][4:], before["0.weight"][4:])
    np.testing.assert_array_equal(g["2.weight"][:, 4:], before["2.weight"][:, 4:])


@pytest.mark.parametrize("name", ["heterofl", "fjord"])
def test_width_bytes_per_client_are_the_slice_sizes(name: str) -> None:
    """Each client receives and sends exactly its slice: 4·(6h + h + 4h + 4) bytes, h = ⌈8p⌉."""
    fractions = [0.25, 0.5, 0.75, 1.0]
    strategy, arrays = width_strategy(name, fractions)
    msgs = messages(strategy, arrays)
    strategy.aggregate_train(1, [reply(m, filled(m, 0.0), 10) for m in msgs])
    rows = sorted(strategy.client_rounds, key=lambda r: r.partition_id)
    for row, p in zip(rows, fractions):
        h = scaled(8, p)
        assert row.status == "ok" and row.fraction == p
        assert row.bytes_down == row.bytes_up == 4 * (6 * h + h + 4 * h + 4)
        # the same accounting as every other method: the sub-model's footprint, in fp32
        assert row.bytes_down == footprint(tiny_wide(p), (6,)).bytes("fp32")
    assert [r.bytes_down for r in rows] == sorted(r.bytes_down for r in rows)
    assert rows[0].bytes_down < rows[-1].bytes_down


def test_fjord_samples_the_federations_widths_up_to_its_own() -> None:
    for name, expected in [("fjord", [[0.25], [0.25, 0.5], [0.25, 0.5, 1.0]]), ("heterofl", [[], [], []])]:
        strategy, arrays = width_strategy(name, [0.25, 0.5, 1.0])
        msgs = messages(strategy, arrays)
        assert [list(m.content[P.CONFIG][P.LEVELS]) for m in msgs] == expected
        assert [m.content[P.CONFIG][P.FRACTION] for m in msgs] == [0.25, 0.5, 1.0]


def test_width_reply_with_a_wrong_slice_is_malformed() -> None:
    strategy, arrays = width_strategy("heterofl", [0.5, 1.0])
    a, b = messages(strategy, arrays)
    wrong = filled(b, 1.0)  # the full slice, from the client that was sent half
    strategy.aggregate_train(1, [reply(a, wrong, 10), reply(b, filled(b, 3.0), 10)])
    rows = {r.partition_id: r for r in strategy.client_rounds}
    assert rows[0].status == "malformed" and "wrong shape" in rows[0].reason
    assert rows[1].status == "ok"


# -- FedHM ---------------------------------------------------------------------------
def fedhm(fractions: list[float]) -> tuple[SubModelStrategy, ArrayRecord]:
    return fake_strategy("fedhm", fractions, [10, 30, 60][: len(fractions)], keep_first=0, keep_classifier=False)


def dense(arrays: dict[str, np.ndarray], layer: str) -> np.ndarray:
    return arrays[f"{layer}.out_network.weight"].astype(np.float64) @ arrays[f"{layer}.in_network.weight"]


def test_fedhm_sends_the_truncated_svd_of_the_dense_model() -> None:
    strategy, arrays = fedhm([0.4, 1.0])
    w = dense(to_numpy(arrays), "0")
    a, _ = messages(strategy, arrays)
    got = sent(a)
    assert got["0.in_network.weight"].shape == (2, 6)  # rank ⌈0.4·5⌉ = 2
    p, s, qt = np.linalg.svd(w)
    np.testing.assert_allclose(dense(got, "0"), (p[:, :2] * s[:2]) @ qt[:2], atol=1e-5)
    assert strategy.method.sampler == "none"  # clients train their factors at that rank
    assert list(a.content[P.CONFIG][P.LEVEL_RANKS]) == []


def test_fedhm_averages_rebuilt_dense_updates_uniformly() -> None:
    """A rank-2 client (10 examples) and a full-rank one (30): W = (U_a V_aᵀ + U_b V_bᵀ)/2, not 1:3."""
    strategy, arrays = fedhm([0.4, 1.0])
    a, b = messages(strategy, arrays)
    ua, ub = moved(a, 1), moved(b, 2)
    out, _ = strategy.aggregate_train(1, [reply(a, ua, 10), reply(b, ub, 30)])
    g = to_numpy(out)
    for layer in ("0", "2"):
        np.testing.assert_allclose(dense(g, layer), (dense(ua, layer) + dense(ub, layer)) / 2, atol=1e-4)
        np.testing.assert_allclose(g[f"{layer}.out_network.bias"], (ua[f"{layer}.out_network.bias"] + ub[f"{layer}.out_network.bias"]) / 2, atol=1e-6)
    # the result is again an exact SVD: its components are ordered by singular value
    norms = np.linalg.norm(g["0.in_network.weight"], axis=1)
    assert (np.diff(norms) <= 1e-5).all()


def test_fedhm_keeps_the_server_model_when_no_client_had_full_rank() -> None:
    strategy, arrays = fedhm([0.4, 0.4])
    before = to_numpy(arrays)
    a, b = messages(strategy, arrays)
    ua, ub = moved(a, 1), moved(b, 2)
    out, _ = strategy.aggregate_train(1, [reply(a, ua, 10), reply(b, ub, 30)])
    expected = (dense(ua, "0") + dense(ub, "0") + dense(before, "0")) / 3
    np.testing.assert_allclose(dense(to_numpy(out), "0"), expected, atol=1e-4)


# -- FedAvg dense and exclusive --------------------------------------------------------
def test_fedavg_dense_gives_everyone_the_full_model_and_averages_by_examples() -> None:
    strategy, arrays = fake_strategy("fedavg_dense", [0.2, 0.5, 1.0], [10, 10, 20])
    msgs = messages(strategy, arrays)
    assert all(sent(m)["0.weight"].shape == (5, 6) for m in msgs)
    out, _ = strategy.aggregate_train(1, [reply(m, filled(m, v), n) for m, v, n in zip(msgs, [1.0, 2.0, 4.0], [10, 10, 20])])
    for v in to_numpy(out).values():
        np.testing.assert_allclose(v, (10 * 1 + 10 * 2 + 20 * 4) / 40)


def test_fedavg_exclusive_trains_only_clients_that_afford_the_full_model() -> None:
    strategy, arrays = fake_strategy("fedavg_exclusive", [0.5, 1.0, 1.0], [10, 10, 20])
    msgs = messages(strategy, arrays)
    assert [strategy.partition_of[m.metadata.dst_node_id] for m in msgs] == [1, 2]
    out, _ = strategy.aggregate_train(1, [reply(m, filled(m, v), n) for m, v, n in zip(msgs, [1.0, 4.0], [10, 20])])
    for v in to_numpy(out).values():
        np.testing.assert_allclose(v, 3.0)
    statuses = {r.partition_id: r.status for r in strategy.client_rounds}
    assert statuses == {0: "unaffordable", 1: "ok", 2: "ok"}


# -- width-sliced models and ordered dropout ---------------------------------------------------
WIDTH_MODELS = [
    ("mlp", InputSpec.image(1, 8, 10), None),
    ("cnn", InputSpec.image(1, 8, 10), "gn"),
    ("lenet5", InputSpec.image(1, 28, 10), None),
    ("resnet18", InputSpec.image(3, 32, 10), "sbn"),
    ("vgg19", InputSpec.image(3, 32, 10), "gn"),
]


@pytest.mark.parametrize("name,spec,norm", WIDTH_MODELS)
def test_a_model_at_width_p_is_the_leading_corner_of_the_full_model(name: str, spec: InputSpec, norm: str | None) -> None:
    full = build_model(name, spec, norm)
    sub = build_model(name, spec, norm, width=0.3)
    full_state = {k: v.numpy() for k, v in full.state_dict().items()}
    sliced = slice_corners(full_state, {k: tuple(v.shape) for k, v in sub.state_dict().items()})
    assert sliced.keys() == full_state.keys()
    sub.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sliced.items()})
    out = sub.eval()(torch.randn(2, *spec.shape))
    assert out.shape == (2, spec.num_classes)
    ratio = footprint(sub, spec.shape).params / footprint(full, spec.shape).params
    assert 0.3**2 * 0.8 < ratio < 0.3 * 1.2  # hidden-to-hidden weights scale as p², input/output layers as p


def test_width_mlp_footprint_by_hand() -> None:
    spec = InputSpec.image(1, 8, 10)
    fp = footprint(build_model("mlp", spec, width=0.5), spec.shape)
    assert fp.params == (64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)
    assert fp.macs == 64 * 128 + 128 * 64 + 64 * 10


def test_slice_corners_rejects_what_is_not_a_corner() -> None:
    full = {"w": np.zeros((4, 3))}
    with pytest.raises(ValueError, match="not a leading corner"):
        slice_corners(full, {"w": (5, 3)})
    with pytest.raises(ValueError, match="not in the full model"):
        slice_corners(full, {"v": (1, 1)})


def digits_like(n: int = 48) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_ordered_dropout_runs_the_corner_of_the_clients_weights() -> None:
    spec = InputSpec.image(1, 8, 10)
    build = partial(build_model, "cnn", spec, "gn")
    torch.manual_seed(0)
    model = build(width=0.75)
    od = OrderedDropout(model, lambda p: build(width=p), [0.25, 0.5, 0.75], torch.Generator().manual_seed(0))
    x = torch.randn(3, *spec.shape)
    reference = build(width=0.5)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                               slice_corners(state, {k: tuple(v.shape) for k, v in reference.state_dict().items()}).items()})
    torch.testing.assert_close(od.forward(x, 0.5), reference(x))
    od.forward(x, 0.5).sum().backward()
    w = model[0].weight  # 24 output channels at width 0.75; width 0.5 uses the first 16
    assert w.grad[:16].abs().sum() > 0 and w.grad[16:].abs().sum() == 0


@pytest.mark.parametrize("distill", [False, True])
def test_ordered_dropout_epoch_is_deterministic_and_learns(distill: bool) -> None:
    spec = InputSpec.image(1, 8, 10)

    def run() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("cnn", spec, "gn", width=0.5)
        gen = torch.Generator().manual_seed(1)
        od = OrderedDropout(model, partial(lambda p: build_model("cnn", spec, "gn", width=p)), [0.25, 0.5], gen)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        data = digits_like()
        losses = [ordered_dropout_epoch(od, data, opt, distill=distill, batch_size=8, generator=gen).loss
                  for _ in range(8)]
        return losses, model[0].weight.detach().clone()

    (l1, w1), (l2, w2) = run(), run()
    assert l1 == l2 and torch.equal(w1, w2)
    assert l1[-1] < l1[0]


# -- config and end to end ------------------------------------------------------------------
def test_baselines_reject_fedlod_only_settings() -> None:
    for strategy in ("heterofl", "fjord", "fedhm"):
        with pytest.raises(ConfigError, match="apply to 'fedlod' only"):
            resolve(SimConfig, overrides={"strategy": strategy, "aggregation": "svd"})


@pytest.mark.parametrize("strategy,extra", [("heterofl", {}), ("heterofl", {"method.label_mask": True}),
                                            ("fjord", {}), ("fedhm", {})])
def test_baseline_runs_end_to_end_on_the_in_process_grid(tmp_path: Path, strategy: str, extra: dict) -> None:
    """Real clients: sub-models of the right size travel, every tier is evaluated, accuracy beats chance."""
    from maestro_fl.federated import federation, model_builder
    from maestro_fl.methods import METHODS
    from tests.test_simulation import local, small

    cfg = small(tmp_path, strategy=strategy, backend="local", rounds=3, model="cnn", **extra)
    run = tmp_path / strategy
    local(cfg, run)
    clients = pd.read_csv(run / "clients.csv")
    tiers = pd.read_csv(run / "tiers.csv")
    assert (clients["status"] == "ok").all() and len(clients) == 18
    last = tiers[tiers["round"] == 3]
    assert sorted(last["tier"]) == [0, 1] and (last["accuracy"] > 0.2).all()
    # the weak tier (fraction 0.25) holds fewer parameters and moves fewer bytes
    assert last["params"].iloc[0] < last["params"].iloc[1]
    per_tier = clients.groupby("tier")[["bytes_down", "bytes_up"]].mean()
    assert per_tier.loc[0, "bytes_down"] < per_tier.loc[1, "bytes_down"]
    if strategy != "fedhm":
        fed = federation(cfg)
        for _, row in clients.iterrows():
            build = model_builder(cfg, fed.data.spec, METHODS[strategy].static_batchnorm)
            expected = footprint(build(row["fraction"]), fed.data.spec.shape).bytes("fp32")
            assert row["bytes_down"] == row["bytes_up"] == expected


def test_deploy_ladder_reproduces_the_tiers_of_a_finished_run(tmp_path: Path) -> None:
    """The global model reloaded from the checkpoint, cut at a tier's fraction, gives that tier's row."""
    from maestro_fl.config import to_dict
    from maestro_fl.federated import deploy_ladder
    from maestro_fl.results import RunDir
    from tests.test_simulation import local, small

    cfg = small(tmp_path, backend="local", rounds=2, model="cnn", rank_allocation="uniform")  # the ladder's cuts
    local(cfg, tmp_path / "run")
    RunDir(tmp_path / "run").save_config(to_dict(cfg))
    last = pd.read_csv(tmp_path / "run" / "tiers.csv").query("round == 2")
    ladder = pd.DataFrame(deploy_ladder(tmp_path / "run", list(last["fraction"]) + [0.05]))
    for _, tier in last.iterrows():
        row = ladder[ladder["fraction"] == tier["fraction"]].iloc[0]
        # tiers.csv keeps 6 decimals
        assert row["accuracy"] == pytest.approx(tier["accuracy"], abs=1e-6) and row["params"] == tier["params"]
    assert ladder["params"].is_monotonic_increasing
    (tmp_path / "run" / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        deploy_ladder(tmp_path / "run", [0.5])


def test_width_baselines_use_static_batchnorm() -> None:
    """HeteroFL's sBN: running statistics of different widths are never averaged, so none are kept."""
    from maestro_fl.federated import model_builder
    from maestro_fl.methods import METHODS

    spec = InputSpec.image(3, 32, 10)
    for strategy, tracks in [("heterofl", False), ("fjord", False), ("fedlod", True)]:
        cfg = resolve(SimConfig, overrides={"strategy": strategy, "model": "resnet18", "norm": "default"})
        build = model_builder(cfg, spec, METHODS[strategy].static_batchnorm)
        norms = [m for m in build(0.25).modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(m.track_running_stats is tracks for m in norms)


@pytest.mark.parametrize("strategy", ["heterofl", "fjord", "fedavg_dense"])
def test_faulty_baseline_clients_are_recorded_and_the_run_goes_on(tmp_path: Path, strategy: str) -> None:
    from tests.test_simulation import local, small

    cfg = small(tmp_path, strategy=strategy, backend="local", rounds=2, fault_injection="1:raise,2:nan,3:shape")
    local(cfg, tmp_path / "run")
    clients = pd.read_csv(tmp_path / "run" / "clients.csv", keep_default_na=False)
    status = clients.groupby("partition_id")["status"].agg(set).to_dict()
    assert status[1] == {"failed"} and status[2] == {"malformed"} and status[3] == {"malformed"}
    assert {status[p].pop() for p in (0, 4, 5)} == {"ok"}
    assert "non-finite" in clients.loc[clients["partition_id"] == 2, "reason"].iloc[0]
    assert "wrong shape" in clients.loc[clients["partition_id"] == 3, "reason"].iloc[0]
    assert len(pd.read_csv(tmp_path / "run" / "tiers.csv")) == 4  # both rounds evaluated both tiers


def test_class_mask_trains_only_the_clients_own_output_rows() -> None:
    spec = InputSpec.image(1, 8, 10)
    torch.manual_seed(0)
    model = build_model("mlp", spec, width=0.25)
    before = model[-1].weight.detach().clone()
    od = OrderedDropout(model, lambda p: build_model("mlp", spec, width=p), [0.25], torch.Generator().manual_seed(0))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 5]] = True
    data = Split(torch.randn(16, 1, 8, 8), torch.tensor([2, 5] * 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no weight decay: untouched rows stay exactly
    ordered_dropout_epoch(od, data, opt, batch_size=8, class_mask=mask, generator=torch.Generator().manual_seed(0))
    changed = (model[-1].weight.detach() != before).any(dim=1)
    assert changed.tolist() == mask.tolist()


def test_char_transformer_at_width_p_keeps_the_first_heads_and_ffn_units() -> None:
    """The sliced model computes the full one with the dropped heads' and FFN units' outputs removed."""
    spec = InputSpec((12,), 30, "int64", 30)
    torch.manual_seed(0)
    full, sub = build_model("char_transformer", spec), build_model("char_transformer", spec, width=0.5)
    full_state = {k: v.numpy() for k, v in full.state_dict().items()}
    sub.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                         slice_corners(full_state, {k: tuple(v.shape) for k, v in sub.state_dict().items()}).items()})
    block = sub.blocks[0]
    assert (block.attention.q_proj.out_features, block.ffn[0].out_features) == (2 * 8, 32)  # 2 of 4 heads, 32 of 64
    with torch.no_grad():
        for b in full.blocks:  # what the sub-model lacks contributes nothing here either
            b.attention.out_proj.weight[:, 16:] = 0
            b.ffn[2].weight[:, 32:] = 0
    x = torch.randint(0, 30, (3, 12))
    torch.testing.assert_close(sub.eval()(x), full.eval()(x), atol=1e-5, rtol=1e-4)
