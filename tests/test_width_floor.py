"""FedLoD below its smallest rank prefix: narrower hidden layers, corners of the ordered factors."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from maestro_fl.convert import ranks_at_fraction
from maestro_fl.models import scaled
from maestro_fl.submodels import RankPrefix, RankWidthPrefix, state_shapes
from strategies.submodel_strategy import to_numpy
from tests.fakes import ALL_LOD, fake_strategy, filled, messages, reply, sent, tiny_wide


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_the_ladder_extends_below_the_rank_floor_and_is_unchanged_above_it() -> None:
    with_floor, _ = fake_strategy("fedlod", [1.0], build=tiny_wide, **ALL_LOD)
    without, _ = fake_strategy("fedlod", [1.0], build=tiny_wide, width_floor=False, **ALL_LOD)
    assert isinstance(with_floor.method.family, RankWidthPrefix)
    assert type(without.method.family) is RankPrefix
    full, rank_only = with_floor.method.cost_table(), without.method.cost_table()
    assert full[: len(rank_only)] == rank_only  # the same entries where a rank prefix exists
    narrow = full[len(rank_only):]
    assert narrow, "no narrower entries below the floor"
    floor = min(c.fraction for c in rank_only)
    assert all(c.fraction < floor for c in narrow)
    assert [c.fraction for c in narrow] == sorted((c.fraction for c in narrow), reverse=True)
    assert min(c.params for c in narrow) < min(c.params for c in rank_only)  # a smaller device is served
    assert min(c.activations for c in narrow) < min(c.activations for c in rank_only)  # feature maps shrink too
    smallest = min(rank_only, key=lambda c: c.fraction)
    for c in narrow:  # every narrower entry is cheaper than the smallest prefix, at width_floor_rank of its layers
        assert c.params < smallest.params and c.macs < smallest.macs and c.activations <= smallest.activations
        model = with_floor.method.family.client_model(c.fraction, c.ranks)
        rho = with_floor.method.cfg.width_floor_rank
        assert c.ranks == ranks_at_fraction(with_floor.method.family._narrow[c.fraction][1], rho)
        assert state_shapes(model)["0.out_network.weight"][0] < 8
    for w in (0.5, 0.25):  # the floor's models stand in for the run's own (SVD) factors in shape only
        assert state_shapes(with_floor.method.narrow_shapes(w)) == state_shapes(with_floor.method.factorized(w))


def test_a_narrow_client_holds_corners_and_they_merge_back_where_they_came_from() -> None:
    strategy, arrays = fake_strategy("fedlod", [1.0, 1.0], [10, 30], build=tiny_wide, **ALL_LOD)
    family = strategy.method.family
    narrow = next(c for c in strategy.method.cost_table() if family.width_of(c.fraction) < 1.0)
    units = scaled(8, family.width_of(narrow.fraction))
    strategy, arrays = fake_strategy("fedlod", [narrow.fraction, 1.0], [10, 30], build=tiny_wide, **ALL_LOD)
    a, b = messages(strategy, arrays, 1)
    full = to_numpy(arrays)
    got = sent(a)
    for name, block in got.items():  # every array is the leading corner of the global one
        np.testing.assert_array_equal(block, full[name][tuple(slice(0, d) for d in block.shape)])
    assert got["0.out_network.weight"].shape[0] == units < 8  # the first hidden units only
    assert got["2.in_network.weight"].shape[1] == units  # the next layer reads those
    assert list(a.content["config"]["level-ranks"]) == [r for r in narrow.ranks.values()]  # its own level only
    g = to_numpy(strategy.aggregate_train(1, [reply(a, filled(a, 11.0), 10), reply(b, filled(b, 33.0), 30)])[0])
    corner = tuple(slice(0, d) for d in got["0.out_network.weight"].shape)
    np.testing.assert_allclose(g["0.out_network.weight"][corner], (11 * 10 + 33 * 30) / 40)  # example-weighted
    rest = np.ones(full["0.out_network.weight"].shape, dtype=bool)
    rest[corner] = False
    np.testing.assert_allclose(g["0.out_network.weight"][rest], 33.0)
    row = {r.partition_id: r for r in strategy.client_rounds}[0]
    assert row.bytes_down == row.bytes_up == sum(v.nbytes for v in got.values())


def test_a_narrow_tier_deploys_the_corner_it_trained() -> None:
    strategy, arrays = fake_strategy("fedlod", [1.0], build=tiny_wide, **ALL_LOD)
    method, family = strategy.method, strategy.method.family
    narrow = next(c for c in method.cost_table() if family.width_of(c.fraction) < 1.0)
    model, ranks = method.deploy(family.global_model(to_numpy(arrays)), narrow)
    assert ranks == dict(narrow.ranks)
    assert state_shapes(model) == state_shapes(method.client_model(method.assign(narrow, [narrow])))
    full = to_numpy(arrays)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), full[name][tuple(slice(0, d) for d in value.shape)])
