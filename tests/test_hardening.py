"""No reply, file or input can break a run: reply checks (fuzzed), robust merges, inputs, files, resume."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maestro_fl import message_keys as P
from maestro_fl.aggregation import aggregate_robust
from maestro_fl.config import ConfigError, SimConfig, resolve
from maestro_fl.federated import check_task
from maestro_fl.methods import METHODS
from strategies.submodel_strategy import SubModelStrategy, to_numpy
from tests.fakes import ALL_LOD, fake_strategy, messages, reply, sent, tiny_mlp, tiny_wide


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


# -- the reply fuzz test ---------------------------------------------------------------------
BAD = (
    "error", "silent", "missing-array", "extra-array", "shape", "int", "complex", "string", "float64", "nan", "inf",
    "huge", "examples-huge", "examples-inf", "examples-negative", "examples-half", "labels-nan", "labels-half",
    "loss-list", "passes-nan", "passes-negative", "passes-inf", "passes-half", "metric-missing", "no-metrics", "duplicate",
    "stranger",
)
KINDS = ("good",) * 6 + BAD


def make_reply(kind: str, msg: Message, rng: np.random.Generator, n: int) -> list[Message]:
    """The reply (or replies) of a client whose fault is ``kind``; a 'good' one moves its sub-model a little."""
    arrays = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in sent(msg).items()}
    first = sorted(arrays)[0]
    metrics: dict[str, object] = {}
    if kind == "error":
        return [Message(Error(code=1, reason="boom"), reply_to=msg)]
    if kind == "silent":
        return []
    if kind == "missing-array":
        del arrays[first]
    elif kind == "extra-array":
        arrays["not.a.parameter"] = np.zeros(3, dtype=np.float32)
    elif kind == "shape":
        arrays[first] = np.zeros((*arrays[first].shape, 2), dtype=np.float32)
    elif kind in ("int", "complex", "string", "float64"):
        dtype = {"int": np.int32, "complex": np.complex64, "string": "<U3", "float64": np.float64}[kind]
        arrays[first] = np.zeros(arrays[first].shape, dtype=dtype)
    elif kind in ("nan", "inf", "huge"):
        arrays[first] = np.full_like(arrays[first], {"nan": np.nan, "inf": np.inf, "huge": 1e30}[kind])
    elif kind.startswith("examples-"):
        metrics[P.NUM_EXAMPLES] = {"huge": 10**12, "inf": float("inf"), "negative": -5, "half": 10.5}[kind[9:]]
    elif kind == "labels-nan":  # (a MetricRecord holds only numbers and lists of one kind of number)
        metrics[P.LABELS] = [0.0, float("nan")]
    elif kind == "labels-half":
        metrics[P.LABELS] = [0.0, 3.5]
    elif kind == "loss-list":
        metrics[P.TRAIN_LOSS] = [0.5, 0.4]
    elif kind in ("passes-nan", "passes-negative", "passes-inf", "passes-half"):
        metrics[P.SAMPLE_PASSES] = {"passes-nan": float("nan"), "passes-negative": -1.0, "passes-inf": float("inf"),
                                    "passes-half": 2.5}[kind]
    out = reply(msg, arrays, n, **metrics)
    if kind == "metric-missing":
        del out.content[P.METRICS][P.SAMPLE_PASSES]
    elif kind == "no-metrics":
        out = Message(RecordDict({P.ARRAYS: out.content[P.ARRAYS]}), reply_to=msg)
    elif kind == "duplicate":
        return [out, reply(msg, arrays, n)]  # a replay of the same reply
    elif kind == "stranger":  # a reply from a node that was not asked
        stray = Message(out.content, reply_to=msg)
        stray.metadata.__dict__["_src_node_id"] = 999  # pretend another node sent it
        return [stray]
    return [out]


def strategy_for(name: str, n: int) -> tuple[SubModelStrategy, ArrayRecord]:
    build = tiny_wide if METHODS[name].static_batchnorm else tiny_mlp
    fractions = [0.4, 0.7, 1.0] * (n // 3) + [1.0] * (n % 3)
    extra = ALL_LOD if name not in ("fedavg_dense", "fedavg_exclusive") else {}
    return fake_strategy(name, fractions, build=build, max_update_norm=10.0, **extra)


@pytest.mark.parametrize("name", list(METHODS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=7), seed=st.integers(0, 2**16))
def test_fuzzed_replies_never_raise_never_move_the_aggregate_and_are_recorded(
    name: str, kinds: list[str], seed: int
) -> None:
    """Any mix of good and bad replies: no exception, the aggregate is exactly that of the good ones, bad ones recorded."""
    rng = np.random.default_rng(seed)
    strategy, arrays = strategy_for(name, len(kinds))
    msgs = messages(strategy, arrays)
    kind_of = {strategy.partition_of[m.metadata.dst_node_id]: kinds[i] for i, m in enumerate(msgs)}
    replies, good = [], []
    for m in msgs:
        kind = kind_of[strategy.partition_of[m.metadata.dst_node_id]]
        made = make_reply(kind, m, rng, 10)
        replies += made
        if kind in ("good", "duplicate"):
            good.append(made[0])
    rng.shuffle(replies)
    merged, _ = strategy.aggregate_train(1, replies)

    rows = {r.partition_id: r for r in strategy.client_rounds}
    for pid, kind in kind_of.items():
        row = rows[pid]
        if kind in ("good", "duplicate"):
            assert row.status == "ok", (kind, row.reason)
        else:
            assert row.status != "ok" and row.reason, (kind, row.status)
    assert any("duplicate" in why for _, why in strategy.ignored) == ("duplicate" in kind_of.values())

    reference, _ = strategy_for(name, len(kinds))  # the same federation, fed only the good replies
    messages(reference, arrays)
    expected, _ = reference.aggregate_train(1, good)
    if expected is None:
        assert merged is None
        return
    for k, v in to_numpy(expected).items():
        got = to_numpy(merged)[k]
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, v)


# -- robust merges and float64 ------------------------------------------------------------------
def test_robust_merges_equal_flowers_fedmedian_and_fedtrimmedavg_on_equal_shapes() -> None:
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    parts = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in g.items()} for _ in range(7)]
    everything = {k: (slice(None),) * v.ndim for k, v in g.items()}
    median = aggregate_robust(g, [(p, everything) for p in parts], "median")
    trimmed = aggregate_robust(g, [(p, everything) for p in parts], "trimmed_mean", 0.2)
    for k in g:
        stack = np.stack([p[k] for p in parts])
        np.testing.assert_allclose(median[k], np.median(stack, axis=0), rtol=1e-6)  # FedMedian's maths
        np.testing.assert_allclose(trimmed[k], trim_mean(stack, 0.2), rtol=1e-6)  # FedTrimmedAvg's


def test_robust_merges_go_per_element_over_the_clients_that_hold_it() -> None:
    """Row 0 is held by A, B, C (1, 2, 100): median 2; row 1 only by C: 100; row 2 by nobody: kept."""
    g = {"w": np.zeros((3, 2), dtype=np.float32)}
    a = ({"w": np.ones((1, 2))}, {"w": (slice(0, 1), slice(None))})
    b = ({"w": np.full((1, 2), 2.0)}, {"w": (slice(0, 1), slice(None))})
    c = ({"w": np.full((2, 2), 100.0)}, {"w": (slice(0, 2), slice(None))})
    out = aggregate_robust(g, [a, b, c], "median")["w"]
    np.testing.assert_allclose(out[:, 0], [2.0, 100.0, 0.0])
    trimmed = aggregate_robust(g, [a, b, c, a, b], "trimmed_mean", 0.2)["w"]  # row 0: 1,1,2,2,100 -> drop 1 and 100
    assert trimmed[0, 0] == pytest.approx(5 / 3)


def test_a_robust_merge_resists_one_large_reply_the_mean_follows() -> None:
    strategy, arrays = fake_strategy("fedlod", [1.0] * 5, robust_merge="median", **ALL_LOD)
    msgs = messages(strategy, arrays)
    replies = [reply(m, {k: v + (50.0 if i == 0 else 0.01 * i) for k, v in sent(m).items()}, 10)
               for i, m in enumerate(msgs)]
    merged = to_numpy(strategy.aggregate_train(1, replies)[0])
    before = to_numpy(arrays)
    assert max(float(np.abs(merged[k] - before[k]).max()) for k in before) < 0.05
    # the method refuses what its rule cannot honour, before a run directory exists (simulate's check_task)
    with pytest.raises(ConfigError, match="^robust_merge applies"):
        check_task(resolve(SimConfig, overrides={"strategy": "fedhm", "robust_merge": "median", "num_clients": 4,
                                                 "clients_per_round": 2}))


def test_full_rank_aggregate_equals_flowers_fedavg_to_float32_rounding_at_any_scale() -> None:
    """Products in float64: values near float32's limit neither overflow nor lose the average."""
    strategy, arrays = fake_strategy("fedlod", [1.0] * 3, [10, 30, 5], **ALL_LOD)
    msgs = messages(strategy, arrays)
    replies = [reply(m, {k: (v * 1e35 + i).astype(np.float32) for k, v in sent(m).items()}, n)
               for i, (m, n) in enumerate(zip(msgs, [10, 30, 5]))]
    ours = to_numpy(strategy.aggregate_train(1, replies)[0])
    exact = {k: sum(np.float64(n) * to_numpy(r.content[P.ARRAYS])[k].astype(np.float64)
                    for r, n in zip(replies, [10, 30, 5])) / 45 for k in ours}
    for k in ours:
        assert np.isfinite(ours[k]).all()
        np.testing.assert_allclose(ours[k], exact[k].astype(np.float32), rtol=1e-6)
    small = [reply(m, {k: v + 0.1 * i for k, v in sent(m).items()}, n) for i, (m, n) in enumerate(zip(msgs, [10, 30, 5]))]
    ours = to_numpy(strategy.aggregate_train(1, small)[0])
    flower = to_numpy(aggregate_arrayrecords([r.content for r in small], P.NUM_EXAMPLES))
    for k in ours:
        np.testing.assert_allclose(ours[k], flower[k], rtol=1e-6, atol=1e-7)


def test_a_huge_reply_is_refused_by_the_update_norm_bound() -> None:
    strategy, arrays = fake_strategy("fedlod", [1.0, 1.0], max_update_norm=10.0, **ALL_LOD)
    a, b = messages(strategy, arrays)
    strategy.aggregate_train(1, [reply(a, {k: v * 1.01 for k, v in sent(a).items()}, 10),
                                 reply(b, {k: v * 1e6 for k, v in sent(b).items()}, 10)])
    rows = sorted(strategy.client_rounds, key=lambda r: r.partition_id)
    assert [r.status for r in rows] == ["ok", "malformed"] and "max_update_norm" in rows[1].reason


# -- inputs and files ------------------------------------------------------------------------
HEADER = "client_id,tier,macs_per_s,memory_bytes,up_bps,down_bps,availability,rank_fraction"


@pytest.mark.parametrize(
    "rows,message",
    [
        (["0,0,1e6,1e6,1e4,1e4,0.5,0", "1,1,1e6,1e6,1e4,1e4,0.5,0"], "one row per client"),
        (["0,0,1e6,1e6,1e4,1e4,1.5,0"] + [f"{i},0,1e6,1e6,1e4,1e4,1,0" for i in range(1, 4)], "availability"),
        (["0,0,nan,1e6,1e4,1e4,1,0"] + [f"{i},0,1e6,1e6,1e4,1e4,1,0" for i in range(1, 4)], "macs_per_s"),
        (["0,0,1e6,-1,1e4,1e4,1,0"] + [f"{i},0,1e6,1e6,1e4,1e4,1,0" for i in range(1, 4)], "memory_bytes"),
        (["0,0,1e6,1e6,1e4,1e4,1,2.0"] + [f"{i},0,1e6,1e6,1e4,1e4,1,0" for i in range(1, 4)], "rank_fraction"),
        (["0,7,1e6,1e6,1e4,1e4,1,0"] + [f"{i},0,1e6,1e6,1e4,1e4,1,0" for i in range(1, 4)], "tiers must be numbered"),
        (["0,0.5,1e6,1e6,1e4,1e4,1,0"] + [f"{i},0,1e6,1e6,1e4,1e4,1,0" for i in range(1, 4)], "tier must be an integer"),
        ([f"{i},0,1e6,1e6,1e4,1e4,1,0" for i in (0, 1, 1, 3)], "client_id"),
    ],
)
def test_a_bad_devices_is_one_clear_line_before_anything_starts(tmp_path: Path, rows: list[str], message: str) -> None:
    path = tmp_path / "population.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    with pytest.raises(ConfigError, match=message):
        resolve(SimConfig, overrides={"num_clients": 4, "clients_per_round": 2, "devices": str(path)})


def test_a_missing_column_names_it(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("client_id,tier,macs_per_s\n0,0,1\n")
    with pytest.raises(ConfigError, match=r"lacks columns \['memory_bytes'"):
        resolve(SimConfig, overrides={"num_clients": 1, "clients_per_round": 1, "devices": str(path)})


def test_cifar_batches_are_read_without_running_code(tmp_path: Path) -> None:
    from maestro_fl.data import DatasetNotFoundError, load_dataset

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    assert len(load_dataset("cifar10", tmp_path).train) == 20

    class Exploit:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (tmp_path / "pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DatasetNotFoundError, match="not a CIFAR-10 batch"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_a_replaced_partition_cache_file_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from maestro_fl import partition

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    labels = np.repeat(np.arange(5), 20)
    first = partition.partition_indices(labels, 4, "iid", seed=0)
    (cache,) = tmp_path.glob("maestro-fl-*/partitions/*.npz")
    np.savez(cache, indices=np.array([0, 1, 2] * 4), sizes=np.array([3, 3, 3, 3]))  # the same 3 examples each
    again = partition.partition_indices(labels, 4, "iid", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


# -- resume ------------------------------------------------------------------------------------
def test_resume_accepts_more_rounds_and_refuses_other_changes(tmp_path: Path) -> None:
    from strategies.runners.launch import prepare_run_dir
    from tests.test_simulation import small

    cfg = small(tmp_path, backend="local", rounds=2, run_name="r")
    _, run_dir = prepare_run_dir(cfg)
    more, _ = prepare_run_dir(resolve(SimConfig, overrides={"resume": str(run_dir), "rounds": 5}))
    assert more.rounds == 5 and more.model == "mlp" and more.num_clients == 6
    with pytest.raises(ConfigError, match=r"cannot change lr=0\.5 .*seed=5"):
        prepare_run_dir(resolve(SimConfig, overrides={"resume": str(run_dir), "seed": 5, "lr": 0.5}))


def test_resuming_a_run_with_tables_but_no_checkpoint_duplicates_nothing(tmp_path: Path) -> None:
    from tests.test_simulation import local, small

    cfg = small(tmp_path, backend="local", rounds=3)
    full = tmp_path / "full"
    local(cfg, full)
    cut = tmp_path / "cut"
    local(cfg, cut)
    (cut / "checkpoint.pt").unlink()  # killed in round 1, say, after its rows were written
    local(cfg, cut)
    for table in ("rounds.csv", "tiers.csv", "clients.csv"):
        a, b = pd.read_csv(full / table), pd.read_csv(cut / table)
        assert b["round"].tolist() == a["round"].tolist()
    pd.testing.assert_series_equal(pd.read_csv(full / "tiers.csv")["accuracy"], pd.read_csv(cut / "tiers.csv")["accuracy"])


def test_a_corrupt_checkpoint_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from strategies.cli import main
    from tests.test_simulation import local, small

    cfg = small(tmp_path, backend="local", rounds=1, run_name="run")
    run = tmp_path / "run"
    local(cfg, run)
    from maestro_fl.config import to_dict
    from maestro_fl.results import RunDir

    RunDir(run).save_config(to_dict(cfg))
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])  # truncated
    capsys.readouterr()  # the run's own phase lines
    assert main(["simulate", f"resume={run}", "rounds=2", "backend=local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt: not a readable checkpoint" in err[0]


# -- real runs with injected faults (in-process) --------------------------------------------------
REPLY_FAULTS = {1: "raise", 2: "nan", 3: "huge", 4: "shape", 5: "dtype", 6: "examples", 7: "duplicate", 8: "timeout",
                9: "rank"}


def test_every_reply_fault_on_the_local_backend_is_recorded_and_healthy_clients_go_on(tmp_path: Path) -> None:
    from tests.test_simulation import always_online_population, local

    trace = always_online_population(tmp_path / "population.csv", 11)
    spec = ",".join(f"{p}:{k}" for p, k in REPLY_FAULTS.items())
    cfg = resolve(SimConfig, overrides={"model": "mlp", "num_clients": 11, "clients_per_round": 11, "rounds": 2,
                                        "local_epochs": 1, "partition": "iid", "progress": False, "backend": "local",
                                        "devices": str(trace), "fault_injection": spec,
                                        "round_timeout_s": 2.0})
    local(cfg, tmp_path / "run")
    clients = pd.read_csv(tmp_path / "run" / "clients.csv", keep_default_na=False)
    expect = {"raise": ("failed", "injected failure"), "nan": ("malformed", "non-finite"),
              "huge": ("malformed", "max_update_norm"), "shape": ("malformed", "wrong shape"),
              "dtype": ("malformed", "wrong dtype"), "examples": ("malformed", "registered"),
              "duplicate": ("ok", "second reply was ignored"), "timeout": ("timeout", "no reply"),
              "rank": ("malformed", "wrong rank")}
    for pid, kind in REPLY_FAULTS.items():
        mine = clients[clients["partition_id"] == pid]
        status, reason = expect[kind]
        assert (mine["status"] == status).all() and mine["reason"].str.contains(reason).all(), kind
    healthy = clients[clients["partition_id"].isin([0, 10])]
    assert (healthy["status"] == "ok").all() and len(healthy) == 4
    assert pd.read_csv(tmp_path / "run" / "rounds.csv")["round"].tolist() == [1, 2]
