"""FIARSE: importance-chosen sub-models, its server rule hand-computed on fake replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.task_identity import TaskIdentity

from maestro_fl.aggregation import aggregate_fiarse
from maestro_fl.footprint import footprint
from maestro_fl.methods.fiarse import top_components
from maestro_fl.models import scaled
from maestro_fl.submodels import component_importance
from strategies.submodel_strategy import to_numpy
from tests.fakes import fake_strategy, filled, messages, reply, sent, tiny_wide


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_the_rule_moves_each_element_by_the_mean_update_of_the_clients_that_changed_it() -> None:
    """w = 9s. A holds rows 0, 2 and sends 10, 9 (row 2 unchanged); B holds rows 0, 1 and sends 13, 7."""
    g = {"w": np.full((3, 2), 9.0, dtype=np.float32)}
    a = ({"w": np.array([[10.0, 10.0], [9.0, 9.0]])}, {"w": (np.array([0, 2]), slice(None))})
    b = ({"w": np.array([[13.0, 13.0], [7.0, 7.0]])}, {"w": (slice(0, 2), slice(None))})
    out = aggregate_fiarse(g, [a, b])
    # row 0: 9 + (1 + 4) / 2; row 1: only B changed it, 9 - 2; row 2: A held it but did not change it
    np.testing.assert_allclose(out["w"], [[11.5, 11.5], [7.0, 7.0], [9.0, 9.0]])
    assert out["w"].dtype == np.float32
    # the count of changers, not of holders: with A's unchanged row counted, row 2 would still be 9, but
    # row 0 is (1 + 4) / 2 either way; an element B changed alone is not halved by A's holding it
    c = ({"w": np.array([[9.0, 9.0], [9.0, 9.0]])}, {"w": (slice(0, 2), slice(None))})  # holds rows 0, 1, changes none
    np.testing.assert_allclose(aggregate_fiarse(g, [b, c])["w"], [[13.0, 13.0], [7.0, 7.0], [9.0, 9.0]])


def test_rank_components_are_chosen_by_the_product_of_their_factor_norms() -> None:
    u = np.array([[1.0, 0.1, 3.0], [0.0, 0.1, 0.0]])  # out_network.weight: rank on axis 1, ‖u_i‖ = 1, 0.14, 3
    vt = np.array([[2.0, 0.0], [10.0, 0.0], [0.1, 0.0]])  # in_network.weight: ‖v_i‖ = 2, 10, 0.1
    np.testing.assert_allclose(component_importance(u, vt), [2.0, np.sqrt(0.02) * 10, 0.3])
    np.testing.assert_array_equal(top_components(component_importance(u, vt), 2), [0, 1])
    np.testing.assert_array_equal(top_components(np.array([1.0, 1.0, 2.0]), 2), [0, 2])  # ties: the earlier one


def _with_hidden_norms(arrays: ArrayRecord, inflow: list[float], outflow: list[float]) -> ArrayRecord:
    """tiny_wide's 8 hidden units with given row norms into them and column norms out of them."""
    full = to_numpy(arrays)
    w0 = np.zeros_like(full["0.weight"])
    w0[:, 0] = inflow
    w2 = np.zeros_like(full["2.weight"])
    w2[0, :] = outflow
    full |= {"0.weight": w0, "0.bias": np.zeros_like(full["0.bias"]), "2.weight": w2}
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in full.items()})


def test_width_clients_hold_the_channels_of_largest_inflow_times_outflow() -> None:
    """Importance of unit j = ‖row j of layer 0‖·‖column j of layer 2‖: units 6, 1, 3, 4 win at half width."""
    strategy, arrays = fake_strategy("fiarse", [0.5, 1.0], build=tiny_wide)
    arrays = _with_hidden_norms(arrays, inflow=[1, 5, 1, 3, 2, 9, 4, 1], outflow=[1, 1, 1, 1, 1, 0.1, 2, 1])
    # products: 1, 5, 1, 3, 2, 0.9, 8, 1 -> the four largest are units 6, 1, 3, 4
    half, whole = messages(strategy, arrays, 2)
    full = to_numpy(arrays)
    units = [1, 3, 4, 6]
    got = sent(half)
    np.testing.assert_array_equal(got["0.weight"], full["0.weight"][units])
    np.testing.assert_array_equal(got["0.bias"], full["0.bias"][units])
    np.testing.assert_array_equal(got["2.weight"], full["2.weight"][:, units])  # the same units' outgoing weights
    assert sent(whole)["0.weight"].shape == (8, 6)


def test_a_width_sub_model_computes_what_the_full_model_does_without_the_other_units() -> None:
    """The grouping into hidden layers is right when the sliced model equals the full one with the rest cut off."""
    strategy, arrays = fake_strategy("fiarse", [0.5, 1.0], build=tiny_wide)
    full = to_numpy(arrays)
    cost = strategy.method.cost_table()[0].__class__(0.5, {}, 0, 0, 0)
    index = strategy.method.index(cost, 1, full)
    kept = index["0.weight"][0]
    sub = strategy.method.family.client_model(0.5, {})
    sub.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(full[k][np.ix_(*[np.arange(n) if isinstance(i, slice)
                         else i for i, n in zip(index[k], full[k].shape)])])) for k in full})
    cut = dict(full)
    dropped = np.setdiff1d(np.arange(8), kept)
    cut["2.weight"] = full["2.weight"].copy()
    cut["2.weight"][:, dropped] = 0.0
    whole = tiny_wide(1.0)
    whole.load_state_dict({k: torch.tensor(v) for k, v in cut.items()})
    x = torch.randn(5, 6)
    torch.testing.assert_close(sub(x), whole(x))


def test_width_replies_merge_back_where_their_units_came_from() -> None:
    strategy, arrays = fake_strategy("fiarse", [0.5, 1.0], [10, 30], build=tiny_wide)
    arrays = _with_hidden_norms(arrays, inflow=[1, 5, 1, 3, 2, 9, 4, 1], outflow=[1, 1, 1, 1, 1, 0.1, 2, 1])
    a, b = messages(strategy, arrays, 2)
    # 11s and 33s: no current value equals them, so both clients changed every element they hold
    g = to_numpy(strategy.aggregate_train(2, [reply(a, filled(a, 11.0), 10), reply(b, filled(b, 33.0), 30)])[0])
    held, only_b = [1, 3, 4, 6], [0, 2, 5, 7]
    np.testing.assert_allclose(g["0.weight"][held], 22.0)  # unweighted mean of 11 and 33, whatever the examples
    np.testing.assert_allclose(g["0.weight"][only_b], 33.0)
    np.testing.assert_allclose(g["2.weight"][:, held], 22.0)
    np.testing.assert_allclose(g["2.bias"], 22.0)


def test_bytes_per_client_are_what_it_holds() -> None:
    fractions = [0.25, 0.5, 0.75, 1.0]
    strategy, arrays = fake_strategy("fiarse", fractions, build=tiny_wide)
    msgs = messages(strategy, arrays, 3)
    strategy.aggregate_train(3, [reply(m, filled(m, 0.5), 10) for m in msgs])
    rows = sorted(strategy.client_rounds, key=lambda r: r.partition_id)
    for row, p, m in zip(rows, fractions, msgs):
        h = scaled(8, p)
        assert row.status == "ok" and row.bytes_down == row.bytes_up == 4 * (6 * h + h + 4 * h + 4)
        assert row.bytes_down == footprint(tiny_wide(p), (6,)).bytes("fp32") == sum(v.nbytes for v in sent(m).values())


def test_rank_clients_hold_their_most_important_components_and_merge_them_back() -> None:
    """Layer 0 has R = 5 components; components 3 and 1 carry the largest ‖u_i‖·‖v_i‖."""
    strategy, arrays = fake_strategy("fiarse_rank", [0.4, 1.0], [10, 30], keep_first=0, keep_classifier=False)
    full = to_numpy(arrays)
    scale = np.array([0.1, 2.0, 0.5, 3.0, 0.2], dtype=np.float32)
    full["0.in_network.weight"] = full["0.in_network.weight"] * scale[:, None]
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in full.items()})
    scores = component_importance(full["0.out_network.weight"], full["0.in_network.weight"])
    comps = np.sort(np.argsort(-scores)[:2])
    low, high = messages(strategy, arrays, 4)
    got = sent(low)
    np.testing.assert_array_equal(got["0.in_network.weight"], full["0.in_network.weight"][comps])
    np.testing.assert_array_equal(got["0.out_network.weight"], full["0.out_network.weight"][:, comps])
    assert list(low.content["config"]["level-ranks"]) == []  # no ordered dropout: it trains what it holds
    g = to_numpy(strategy.aggregate_train(4, [reply(low, filled(low, 11.0), 10), reply(high, filled(high, 33.0), 30)])[0])
    np.testing.assert_allclose(g["0.in_network.weight"][comps], 22.0)
    rest = np.setdiff1d(np.arange(5), comps)
    np.testing.assert_allclose(g["0.in_network.weight"][rest], 33.0)
    row = {r.partition_id: r for r in strategy.client_rounds}[0]
    assert row.bytes_down == sum(v.nbytes for v in got.values())


def test_a_model_with_skip_connections_is_refused() -> None:
    from maestro_fl.config import SimConfig, resolve
    from maestro_fl.federated import make_method
    from maestro_fl.models import InputSpec

    cfg = resolve(SimConfig, overrides={"strategy": "fiarse", "model": "resnet18", "norm": "bn"})
    with pytest.raises(ValueError, match="feed-forward"):
        make_method(cfg, InputSpec.image(3, 32, 10))


@pytest.mark.parametrize("model,shape", [("cnn", (1, 8, 8)), ("cnn1d", (1, 40)), ("lenet5", (1, 28, 28))])
def test_zoo_sub_models_compute_what_the_full_model_does_with_the_rest_zeroed(model: str, shape: tuple[int, ...]) -> None:
    """Convolutions, a flatten into a Linear, pooling: the channel grouping holds on the zoo's feed-forward models."""
    from maestro_fl.config import SimConfig, resolve
    from maestro_fl.federated import make_method
    from maestro_fl.models import InputSpec
    from maestro_fl.submodels import load_arrays, numpy_index, take

    method = make_method(resolve(SimConfig, overrides={"strategy": "fiarse", "model": model, "norm": "none"}),
                         InputSpec(shape, 10))
    rng = np.random.default_rng(0)  # scale every weight so that importance differs from the corner's
    full = {k: (v.detach().numpy() * rng.uniform(0.2, 2.0, v.shape)).astype(np.float32)
            for k, v in method.template.state_dict().items()}
    cost = next(c for c in method.cost_table() if c.fraction == 0.5)
    index = method.index(cost, 1, full)
    sub = load_arrays(method.family.client_model(0.5, {}), take(full, index))
    zeroed = {}
    for name, value in full.items():
        keep = np.zeros(value.shape, dtype=bool)
        keep[numpy_index(index[name], value.shape)] = True
        zeroed[name] = np.where(keep, value, 0.0).astype(np.float32)
    whole = load_arrays(method.family.build(1.0), zeroed)
    x = torch.randn(3, *shape)
    torch.testing.assert_close(sub(x), whole(x), atol=1e-5, rtol=1e-5)
    assert any(not isinstance(i, slice) for i in index["0.weight"])  # not simply the corner
