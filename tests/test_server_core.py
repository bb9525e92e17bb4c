"""The Flower-free server core (maestro_fl/server.py): the device model lives on the server alone.

A client is never told its device and runs no cost model: it reports what its
loop did (examples × passes), and the server charges that with the cost it
budgeted, at the device it holds for the client, for the bytes it counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from maestro_fl import message_keys as P
from maestro_fl import wire
from maestro_fl.budget import BACKWARD_FACTOR, DeviceCapability
from maestro_fl.methods import METHODS, Update
from maestro_fl.server import FederationServer, Registration, first_to_finish, over_selected, simulated_seconds
from strategies.submodel_strategy import to_numpy
from tests.fakes import config, fake_strategy, filled, messages, moved, reply, rows_by_partition, tiny_mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def task_identity() -> None:
    """Outside a Flower runtime, messages take their sender from TaskIdentity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=4),
       dtype=st.sampled_from(["float32", "float64", "int64", "float16"]))
def test_message_bytes_are_what_the_encoded_record_counts(shapes: list[list[int]], dtype: str) -> None:
    arrays = {f"layer{i}.weight": np.zeros(s, dtype=dtype) for i, s in enumerate(shapes)}
    record = ArrayRecord()
    for k, v in arrays.items():
        record[k] = Array(*wire.encode(v))
    assert wire.message_bytes(arrays) == record.count_bytes()


def test_the_server_charges_a_reply_by_its_own_cost_model_device_and_byte_counts() -> None:
    strategy, arrays = fake_strategy("fedlod", [0.4, 1.0], examples=[10, 30])
    msgs = messages(strategy, arrays)
    passes = [7, 90]
    replies = [reply(m, moved(m, i), n, **{P.SAMPLE_PASSES: k}) for i, (m, n, k) in enumerate(zip(msgs, [10, 30], passes))]
    strategy.aggregate_train(1, replies)
    rows = sorted(strategy.client_rounds, key=lambda r: r.partition_id)
    for msg, rep, row, k in zip(msgs, replies, rows, passes):
        task = strategy.tasks[msg.metadata.dst_node_id]
        device = strategy.devices[msg.metadata.dst_node_id]
        assert row.status == "ok"
        assert row.macs == BACKWARD_FACTOR * task.cost.macs * k
        assert row.compute_s == pytest.approx(row.macs / device.macs_per_s, rel=1e-12)
        # the download and the upload as the messages carry them (.npy headers and names included)
        assert row.download_s == pytest.approx(8 * msg.content[P.ARRAYS].count_bytes() / device.down_bps, rel=1e-12)
        assert row.upload_s == pytest.approx(8 * rep.content[P.ARRAYS].count_bytes() / device.up_bps, rel=1e-12)
    assert rows[0].macs < rows[1].macs  # a smaller sub-model and fewer passes


def test_simulated_seconds_scale_with_passes_and_bytes() -> None:
    strategy, _ = fake_strategy("fedlod", [1.0])
    cost = strategy.core.cost_table()[0]
    device = DeviceCapability(0, macs_per_s=2e6, memory_bytes=1e9, up_bps=1e3, down_bps=4e3, availability=1.0)
    one = simulated_seconds(cost, device, 10, 1000, 500)
    two = simulated_seconds(cost, device, 20, 2000, 1000)
    assert two.compute_s == pytest.approx(2 * one.compute_s) and two.download_s == pytest.approx(2 * one.download_s)
    assert one.upload_s == pytest.approx(8 * 500 / 1e3) and one.download_s == pytest.approx(8 * 1000 / 4e3)


def test_a_budget_is_checked_at_the_federations_mean_examples() -> None:
    """What docs/reference.md says: one budget per device, at the mean examples per client; a client with more
    examples than the mean may need more seconds than its budget (its own are charged, test above)."""
    cfg = config(3, strategy="fedlod", keep_first=0, keep_classifier=False, compute_budget_s=1.0)
    method = METHODS["fedlod"](cfg, (6,), tiny_mlp)
    devices = [DeviceCapability(0, 1e3, 1e9, 1e6, 1e6, 1.0)] * 3
    core = FederationServer(method, cfg, population=devices)
    core.register(Registration(10 + i, i, n) for i, n in enumerate([10, 20, 60]))
    assert core.nominal_samples == 30
    table = core.cost_table()
    assert core.budget(devices[0]) == method.budget(table, devices[0], 30)


def test_the_registered_device_is_the_populations_never_the_clients_word() -> None:
    cfg = config(4, strategy="fedavg_dense")
    method = METHODS["fedavg_dense"](cfg, (6,), tiny_mlp)
    population = [DeviceCapability(t, 1e6 * (t + 1), 1e9, 1e6, 1e6, 1.0) for t in (0, 1, 0, 1)]
    core = FederationServer(method, cfg, population=population)
    core.register([Registration(7, 3, 10), Registration(8, 0, 10)])
    assert core.devices == {7: population[3], 8: population[0]}


def test_no_client_is_told_its_device_or_runs_a_cost_model() -> None:
    strategy, arrays = fake_strategy("fedlod", [0.4, 1.0])
    for msg in messages(strategy, arrays):
        assert set(msg.content.keys()) == {P.ARRAYS, P.CONFIG}
        assert not any("device" in k or "macs" in k for k in msg.content[P.CONFIG])
    tree = ast.parse((ROOT / "clients" / "client_app.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"maestro_fl.budget", "maestro_fl.footprint", "maestro_fl.population"}, imported
    assert not (ROOT / "clients" / "devices.py").exists()


@pytest.mark.parametrize("k,o,selected", [(10, 0.0, 10), (10, 0.3, 13), (3, 0.5, 5), (1, 0.01, 2), (20, 1.0, 40)])
def test_over_selection_selects_the_ceiling_of_one_plus_o_times_k(k: int, o: float, selected: int) -> None:
    assert over_selected(k, o) == selected


def test_over_selection_keeps_the_first_k_to_finish_on_the_simulated_clock() -> None:
    """Four clients, two kept. Sample passes 90 / 10 / 50 / 10 on equal devices and sub-models set the
    simulated order 1 = 3 < 2 < 0 (the tie goes to the lower partition): 1 and 3 count, 0 and 2 are late,
    and the merge is the merge of 1 and 3 alone (the same federation without over-selection, 0 and 2 silent)."""
    over, arrays = fake_strategy("fedlod", [1.0] * 4, clients_per_round=2, over_selection=1.0)
    msgs = messages(over, arrays)
    assert len(msgs) == 4  # ceil(2 x 2)
    passes = [90, 10, 50, 10]
    merged, _ = over.aggregate_train(1, [reply(m, filled(m, float(i)), 10, **{P.SAMPLE_PASSES: k})
                                         for i, (m, k) in enumerate(zip(msgs, passes))])
    rows = rows_by_partition(over)
    assert [rows[i].status for i in range(4)] == ["late", "ok", "late", "ok"]
    assert rows[0].round_seconds > rows[2].round_seconds > rows[1].round_seconds == rows[3].round_seconds
    assert "after the first 2" in rows[0].reason

    alone, arrays = fake_strategy("fedlod", [1.0] * 4)
    msgs = messages(alone, arrays)
    reference, _ = alone.aggregate_train(1, [reply(msgs[i], filled(msgs[i], float(i)), 10, **{P.SAMPLE_PASSES: 10})
                                             for i in (1, 3)])
    assert merged is not None and reference is not None
    for key in reference:
        np.testing.assert_array_equal(to_numpy(merged)[key], to_numpy(reference)[key])


def test_first_to_finish_orders_by_simulated_seconds_then_partition() -> None:
    strategy, arrays = fake_strategy("fedlod", [1.0] * 3)
    updates = [Update(strategy.tasks[m.metadata.dst_node_id], {}, 10) for m in messages(strategy, arrays)]
    kept, late = first_to_finish([(updates[0], 2.0), (updates[1], 1.0), (updates[2], 1.0)], 2)
    assert kept == [updates[1], updates[2]] and late == [updates[0]]
    assert first_to_finish([(updates[0], 2.0)], 5) == ([updates[0]], [])
