"""Nothing a run is given can corrupt it: one test per defect of the issue, each with its reproduction.

Every test here failed on the code before the fix (commit 0b7fa18) and states how.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from torch import nn

from maestro_fl import message_keys as P
from maestro_fl.config import ConfigError, SimConfig, resolve, to_dict
from maestro_fl.results import RunDir, RunDirBusy, RunDirError, save_checkpoint
from tests.fakes import fake_strategy, messages, reply, rows_by_partition, sent
from tests.test_simulation import local, small


def finished_run(tmp_path: Path, name: str = "run", **kw: object) -> tuple[SimConfig, Path]:
    cfg = small(tmp_path, **({"backend": "local", "rounds": 3, "run_name": name} | kw))
    run = tmp_path / name
    local(cfg, run)
    RunDir(run).save_config(to_dict(cfg))
    return cfg, run


def tables(run: Path) -> dict[str, bytes]:
    return {t: (run / t).read_bytes() for t in ("rounds.csv", "tiers.csv", "clients.csv", "devices.csv")}


def cli(*args: str) -> int:
    from strategies.cli import main

    return main(list(args))


# -- 1. two writers on one run directory --------------------------------------------------------
def test_a_second_writer_of_a_run_directory_is_refused_naming_the_holder(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Defect 1: two concurrent ``resume=`` of one run both ran, leaving rounds 1 2 3 5 4 6 5 6."""
    _, run = finished_run(tmp_path)
    before = tables(run)
    with RunDir(run).lock():
        assert cli("simulate", f"resume={run}", "rounds=4", "backend=local") == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maestro-fl")]
        assert len(err) == 1 and f"in use by PID {os.getpid()}" in err[0], err
        with pytest.raises(RunDirBusy):
            with RunDir(run).lock():
                pass
    assert tables(run) == before
    with RunDir(run).lock():  # released: the next writer takes it
        pass


def test_a_sweep_cannot_point_its_runs_at_one_run_directory(tmp_path: Path) -> None:
    """Defect 1: a sweep whose [base] sets resume= made every grid point resume one run (rounds 1 2 2)."""
    from strategies.sweeps.sweep import build_sweep

    with pytest.raises(ConfigError, match=r"\[base\]: resume cannot be set in a sweep"):
        build_sweep({"name": "s"}, {"resume": str(tmp_path)}, {"seed": [0, 1]}, {"": {}})


def test_sweep_and_compare_exit_non_zero_naming_the_failed_runs(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """Defect 1: a sweep with every run failed exited 0."""
    import strategies.sweeps.sweep as sweep_module

    root = tmp_path / "sweep"
    root.mkdir()
    pd.DataFrame({"run": ["seed=0", "seed=1"], "status": ["ok", "failed"], "error": ["", "boom"]}).to_csv(
        root / "results.csv", index=False)
    monkeypatch.setattr(sweep_module, "run_sweep", lambda path: root)
    file = tmp_path / "s.toml"
    file.write_text('[sweep]\nname = "s"\n[grid]\nseed = [0, 1]\n')
    assert cli("sweep", str(file)) == 1
    assert "1 run(s) failed: seed=1" in capsys.readouterr().err


# -- 2. resume checks before it trims --------------------------------------------------------
@pytest.mark.parametrize("foreign", ["other_strategy", "other_model", "missing_array"])
def test_a_foreign_checkpoint_is_refused_before_anything_is_trimmed(tmp_path: Path, foreign: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """Defect 2: a FjORD checkpoint in a FedLoD run (an MLP's in a CNN's, one lacking an array) first trimmed the
    tables to its round, deleting rounds 2-3, then died with a traceback (KeyError: '3.in_network.weight')."""
    _, run = finished_run(tmp_path)
    if foreign == "missing_array":
        ckpt = RunDir(run).checkpoint(required=True)
        assert ckpt is not None
        arrays = dict(ckpt.arrays)
        arrays.pop(sorted(arrays)[0])
        save_checkpoint(run, type(ckpt)(1, arrays, ckpt.fingerprint))
    else:
        kw = {"strategy": "fjord"} if foreign == "other_strategy" else {"model": "cnn"}
        (tmp_path / "other").mkdir()
        _, other = finished_run(tmp_path / "other", name="other", rounds=1, **kw)  # type: ignore[arg-type]
        shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    before = tables(run)
    assert cli("simulate", f"resume={run}", "rounds=4", "backend=local") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maestro-fl")]
    assert len(err) == 1 and "checkpoint.pt" in err[0], err
    assert tables(run) == before


# -- 3. a partial last row ---------------------------------------------------------------------
def test_a_partial_last_row_is_dropped_when_resuming(tmp_path: Path) -> None:
    """Defect 3: ``printf 1 >> rounds.csv`` then resume read rounds 1 2 3 14 5 6 and NaN totals from then on."""
    cfg, run = finished_run(tmp_path)
    with open(run / "rounds.csv", "a") as fh:
        fh.write("1")  # what a short write of '14,...' leaves
    more = resolve(SimConfig, overrides=to_dict(cfg) | {"rounds": 5, "resume": str(run)})
    local(more, run)
    rounds = pd.read_csv(run / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2, 3, 4, 5]
    assert rounds["sim_seconds_total"].notna().all() and rounds["sim_seconds_total"].is_monotonic_increasing


# -- 4. an edited config.json ------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("lr", 0.6), ("seed", 7), ("num_clients", 5)])
def test_an_edited_config_json_is_refused_naming_the_field(tmp_path: Path, field: str, value: object, capsys) -> None:  # type: ignore[no-untyped-def]
    """Defect 4: changing lr (0.15 -> 0.6), seed or num_clients in config.json, then resuming, went on silently."""
    cfg, run = finished_run(tmp_path)
    before = tables(run)
    RunDir(run).save_config(to_dict(cfg) | {field: value})
    assert cli("simulate", f"resume={run}", "rounds=4", "backend=local") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("maestro-fl")]
    assert len(err) == 1, err
    if field != "num_clients":  # num_clients=5 is refused sooner: the trace and clients_per_round no longer fit
        assert f"{field} = {value!r} in config.json" in err[0], err
    assert tables(run) == before


# -- 5. the partition cache ---------------------------------------------------------------------
def test_a_forged_cache_file_with_a_recomputed_digest_is_not_trusted(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Defect 5: a forged file with a recomputed (unkeyed) sha256 gave clients [1286, 1, 1, ...] examples."""
    import hashlib

    from maestro_fl import partition

    monkeypatch.setenv(partition.CACHE_ENV, str(tmp_path / "cache"))
    labels = np.repeat(np.arange(5), 40)
    first = partition.partition_indices(labels, 4, "dirichlet", alpha=0.5, min_partition_size=10, seed=0)
    (cache,) = (tmp_path / "cache" / "partitions").glob("*.npz")
    assert (tmp_path / "cache" / "partitions").stat().st_mode & 0o077 == 0
    with np.load(cache) as z:
        key = str(z["key"])
    forged = np.arange(200)
    np.savez(cache, indices=forged, sizes=np.array([197, 1, 1, 1]), key=np.array(key),
             digest=np.array(hashlib.sha256(forged.astype(np.int64).tobytes()).hexdigest()))
    again = partition.partition_indices(labels, 4, "dirichlet", alpha=0.5, min_partition_size=10, seed=0)
    assert [len(p) for p in again] == [len(p) for p in first]
    assert not list((tmp_path / "cache" / "partitions").glob(f"*.{os.getpid()}.npz"))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_a_cached_partition_is_read_back_without_recomputing_it(tmp_path: Path, monkeypatch, scheme: str) -> None:  # type: ignore[no-untyped-def]
    """The checks of a cached file must let an honest one through: an IID file was always refused
    (``sizes.min(initial=0)`` is 0), so every Ray actor imported ``datasets`` (~3.5 s) to recompute it."""
    from maestro_fl import partition

    monkeypatch.setenv(partition.CACHE_ENV, str(tmp_path / "cache"))
    labels = np.repeat(np.arange(5), 40)
    first = partition.partition_indices(labels, 4, scheme, min_partition_size=10, seed=0)

    def recompute(*args: object) -> None:
        raise AssertionError("the cached partition was recomputed")

    monkeypatch.setattr(partition, "_partition", recompute)
    again = partition.partition_indices(labels, 4, scheme, min_partition_size=10, seed=0)
    assert [p.tolist() for p in again] == [p.tolist() for p in first]


def test_a_cache_folder_others_may_write_is_not_used(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Defect 5: the cache sat in a shared, predictable folder anyone could write."""
    from maestro_fl import partition

    root = tmp_path / "shared"
    (root / "partitions").mkdir(parents=True)
    os.chmod(root / "partitions", 0o777)
    monkeypatch.setenv(partition.CACHE_ENV, str(root))
    with pytest.warns(UserWarning, match="not private"):
        assert partition.cache_folder() is None


# -- 6 and 10. registrations -------------------------------------------------------------------
def registration(node: int, **over: object) -> Message:
    from strategies.runners.ray_grid import set_task_identity

    set_task_identity()
    values = {P.PARTITION_ID: node - 100, P.NUM_EXAMPLES: 10} | over
    from flwr.app import ConfigRecord, MessageType

    query = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.QUERY)
    return Message(RecordDict({P.METRICS: MetricRecord(values)}), reply_to=query)  # type: ignore[arg-type]


def test_bad_registrations_exclude_their_client_and_never_stop_the_federation() -> None:
    """Defects 6 and 10: 1e12 examples, partition 10^6 and two nodes claiming one partition were accepted;
    num-examples +Inf raised OverflowError out of register. A client reports only its partition and examples:
    its device is the run's population's (a device's own checks: tests/test_budget_and_devices.py)."""
    strategy, _ = fake_strategy("fedlod", [1.0] * 9)
    population = {strategy.partition_of[n]: d for n, d in strategy.devices.items()}
    strategy.partition_of.clear(), strategy.examples_of.clear(), strategy.devices.clear()
    strategy.core.partition_sizes = [10] * 9
    bad = {
        101: {P.NUM_EXAMPLES: 1e12}, 102: {P.PARTITION_ID: -1}, 103: {P.PARTITION_ID: 2.5},
        104: {P.NUM_EXAMPLES: 0}, 105: {P.PARTITION_ID: 10**6}, 106: {P.PARTITION_ID: 0},
        107: {P.NUM_EXAMPLES: math.inf}, 108: {P.PARTITION_ID: math.nan},
    }
    strategy.register([registration(100), *(registration(n, **kw) for n, kw in bad.items())])
    assert list(strategy.devices) == [100] and strategy.examples_of == {100: 10}
    assert strategy.devices[100] == population[0]  # the server's own record of partition 0's device
    reasons = dict(strategy.excluded)
    assert set(reasons) == set(bad)
    for node, word in ((101, "holds 10"), (102, "in [0, 9)"), (103, "in [0, 9)"), (104, "integer > 0"),
                       (105, "in [0, 9)"), (106, "already registered"), (107, "integer > 0"), (108, "in [0, 9)")):
        assert word in reasons[node], (node, reasons[node])


# -- 7, 8, 9. replies inside the bound, byte order, labels ------------------------------------------
def test_the_default_bound_refuses_a_client_sending_nine_times_its_model() -> None:
    """Defect 7: a client sending 9x its model with honest counts was accepted (bound 10x; train loss 19.6)."""
    from maestro_fl.config import SimConfig as Config

    strategy, arrays = fake_strategy("fedlod", [1.0, 1.0], max_update_norm=Config().max_update_norm)
    msgs = messages(strategy, arrays)
    honest = {k: v * 1.1 for k, v in sent(msgs[1]).items()}  # 0.1x: an honest step is at most 1.17x (measured)
    strategy.aggregate_train(1, [reply(msgs[0], {k: 9 * v for k, v in sent(msgs[0]).items()}, 10),
                                 reply(msgs[1], honest, 10)])
    rows = rows_by_partition(strategy)
    assert rows[0].status == "malformed" and "max_update_norm" in rows[0].reason  # type: ignore[attr-defined]
    assert rows[1].status == "ok"  # type: ignore[attr-defined]


def test_a_big_endian_reply_is_refused_and_never_raises() -> None:
    """Defect 8: a big-endian float32 reply passed check_reply ('float32') and torch.from_numpy raised."""
    strategy, arrays = fake_strategy("fedlod", [1.0, 1.0])
    msgs = messages(strategy, arrays)
    swapped = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in sent(msgs[0]).items()}
    merged, _ = strategy.aggregate_train(1, [reply(msgs[0], swapped, 10), reply(msgs[1], sent(msgs[1]), 10)])
    rows = rows_by_partition(strategy)
    assert rows[0].status == "malformed" and "wrong dtype" in rows[0].reason  # type: ignore[attr-defined]
    assert merged is not None
    from maestro_fl.aggregation import add_scaled

    out = np.zeros(3)
    add_scaled(out, np.array([1.0, 2.0, 3.0], dtype=">f4"), 2.0)
    assert out.tolist() == [2.0, 4.0, 6.0]


def test_heterofl_labels_outside_the_classes_are_refused() -> None:
    """Defect 9: HeteroFL with method.label_mask and a reply whose labels are [99] raised IndexError."""
    strategy, arrays = fake_strategy("heterofl", [1.0, 1.0], method=("label_mask=true",))
    strategy.method.inputs = type("Spec", (), {"num_classes": 5})()  # type: ignore[misc]
    msgs = messages(strategy, arrays)
    strategy.aggregate_train(1, [reply(msgs[0], sent(msgs[0]), 10, **{P.LABELS: [99]}),
                                 reply(msgs[1], sent(msgs[1]), 10, **{P.LABELS: [1, 2]})])
    rows = rows_by_partition(strategy)
    assert rows[0].status == "malformed" and "[0, 5)" in rows[0].reason  # type: ignore[attr-defined]
    assert rows[1].status == "ok"  # type: ignore[attr-defined]
    from maestro_fl.aggregation import aggregate_heterofl

    g = {"w": np.zeros((5, 2)), "b": np.zeros(5)}
    upd = [({"w": np.ones((5, 2)), "b": np.ones(5)}, {"w": (slice(0, 5), slice(0, 2)), "b": (slice(0, 5),)}, 1.0)]
    out = aggregate_heterofl(g, upd, label_sets=[[99]], classifier=("w", "b"))  # type: ignore[arg-type]
    assert np.allclose(out["w"], 1.0)


# -- 12, 13. messages a user can act on, names inside their folder -----------------------------------
def test_a_full_disk_names_the_file_and_leaves_no_tmp(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Defect 12: a full disk surfaced as 'RuntimeError: [enforce fail at inline_container.cc:672]' and left
    checkpoint.pt.tmp behind."""
    from maestro_fl.results import Checkpoint

    def full(obj: object, path: object) -> None:
        Path(str(path)).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunDirError, match=r"checkpoint.pt: could not be written .*resume="):
        save_checkpoint(tmp_path, Checkpoint(1, {"w": np.zeros(2, dtype=np.float32)}))
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/../../x", "x" * 300, "-x"])
def test_a_run_name_that_escapes_out_dir_or_is_too_long_is_one_line(name: str) -> None:
    """Defects 12 and 13: run_name=../x and an absolute name wrote outside out_dir; 300 characters gave a traceback."""
    with pytest.raises(ConfigError, match="run_name must be a relative folder inside out_dir"):
        resolve(SimConfig, overrides={"run_name": name}).validate()


def test_a_sweep_name_that_escapes_out_dir_is_one_line() -> None:
    """Defect 13: a sweep name = '../../x' wrote outside out_dir."""
    from strategies.sweeps.sweep import build_sweep

    with pytest.raises(ConfigError, match="relative folder inside out_dir"):
        build_sweep({"name": "../../x"}, {}, {"seed": [0]}, {"": {}})


def test_a_devices_csv_with_a_bom_is_read_and_an_extra_field_is_named(tmp_path: Path) -> None:
    """Defect 12: Excel's UTF-8 BOM gave "lacks columns ['client_id']"; extra fields were dropped silently."""
    from maestro_fl.population import PopulationError, load_population

    head = "client_id,tier,macs_per_s,memory_bytes,up_bps,down_bps,availability"
    rows = [f"{i},0,1e9,1e9,1e6,1e6,1.0" for i in range(3)]
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeff" + "\n".join([head, *rows]) + "\n", encoding="utf-8")
    assert len(load_population(str(bom), 3)) == 3
    extra = tmp_path / "extra.csv"
    extra.write_text("\n".join([head + ",colour", *(r + ",red" for r in rows)]) + "\n")
    with pytest.raises(PopulationError, match=r"unknown columns \['colour'\]"):
        load_population(str(extra), 3)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("\n".join([head, rows[0] + ",9", *rows[1:]]) + "\n")
    with pytest.raises(PopulationError, match="line 2: 8 fields, the header has 7"):
        load_population(str(ragged), 3)
    with pytest.raises(PopulationError, match="not found"):
        load_population(str(tmp_path / "missing.csv"), 3)


# -- 14. footprints ----------------------------------------------------------------------------------
class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.rnn = cell(16, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x))
        return self.head(h[:, -1])


@pytest.mark.parametrize("cell,gates", [(nn.LSTM, 4), (nn.GRU, 3)])
def test_recurrent_layers_are_counted_by_hand(cell: type[nn.RNNBase], gates: int) -> None:
    """Defect 14: CPU nn.LSTM was invisible to FlopCounterMode (3.4% of a hand count)."""
    from maestro_fl.footprint import footprint
    from maestro_fl.models import InputSpec

    steps = 20
    hand = steps * 2 * (gates * 32 * (16 + 32) + gates * 32 * (64 + 32)) + 64 * 5
    assert footprint(Recurrent(cell), InputSpec((steps,), 5, "int64", 50)).macs == hand


class InputDependent(nn.Module):
    """Runs its second layer only for inputs whose mean is positive (data-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if x.mean() > 0:
            h = self.b(torch.relu(h))
        return self.head(h)


def test_footprints_are_probed_with_real_inputs_and_a_disagreement_warns() -> None:
    """Defect 14: a model with data-dependent control flow was probed on zeros: 2.4-3.9x low."""
    from maestro_fl.data import Split, TaskData
    from maestro_fl.federated import probe_disagreement, with_sample
    from maestro_fl.footprint import footprint
    from maestro_fl.models import InputSpec

    x = torch.rand(10, 8) + 0.5
    split = Split(x, torch.zeros(10, dtype=torch.long))
    data = with_sample(TaskData("toy", split, split, InputSpec((8,), 3)))
    model = InputDependent()
    assert footprint(model, data.spec).macs == 8 * 64 + 64 * 64 + 64 * 3  # the real inputs take the branch
    warning = probe_disagreement(model, data)
    assert warning is not None and "depend on its input" in warning
    assert probe_disagreement(nn.Sequential(nn.Linear(8, 3)), data) is None


# -- 15. a reply answering as another node ------------------------------------------------------------
def test_a_reply_claiming_another_node_is_replaced_by_an_error() -> None:
    """Defect 15: the engine did not check a reply's src_node_id, so one client could answer as another."""
    from flwr.app import ConfigRecord, MessageType

    from strategies.runners.local_grid import LocalGrid
    from strategies.runners.ray_grid import WRONG_SENDER

    def impostor(msg: Message, context: object) -> Message:
        out = Message(RecordDict({"m": MetricRecord({"x": 1})}), reply_to=msg)
        out.metadata._src_node_id = 2 if msg.metadata.dst_node_id == 1 else msg.metadata.dst_node_id  # type: ignore[attr-defined]
        return out

    grid = LocalGrid(impostor, 3)  # type: ignore[arg-type]
    msgs = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in (1, 3)]
    first, second = grid.send_and_receive(msgs)
    assert first.has_error() and first.error.code == WRONG_SENDER and first.metadata.src_node_id == 1
    assert "claims to come from node 2" in first.error.reason
    assert not second.has_error()


# -- 17. the fault tests' federation learns -----------------------------------------------------------
def test_the_fault_tests_healthy_baseline_learns(tmp_path: Path) -> None:
    """Defect 17: backend=local, 10 clients x ~130 examples, IID, stayed at chance (0.10) with the defaults,
    so a fault test could not tell a poisoned model from a healthy one. The defaults now learn there (issue 21)."""
    from tests.test_simulation import always_online_population

    trace = always_online_population(tmp_path / "population.csv", 10)
    cfg = resolve(SimConfig, overrides={"model": "mlp", "num_clients": 10, "clients_per_round": 10, "rounds": 3,
                                        "local_epochs": 1, "partition": "iid", "progress": False, "backend": "local",
                                        "devices": str(trace), "out_dir": str(tmp_path)})
    local(cfg, tmp_path / "run")
    last = pd.read_csv(tmp_path / "run" / "tiers.csv").groupby("round")["accuracy"].max()
    assert last.iloc[-1] >= 0.6, last.tolist()

