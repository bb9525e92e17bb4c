"""The run directory, defined once: its tables (columns and their meaning), its checkpoint, and their I/O.

Everything that writes or reads a run directory goes through this module:
the server's round loop and the train job write with :meth:`RunDir.writer`
and :func:`save_checkpoint`; resume, ``deploy_ladder``, sweeps and the
analysis read with :meth:`RunDir.table` and :meth:`RunDir.checkpoint`. Each
row is flushed when written, so an interrupted run loses nothing that
finished; a resumed run is first trimmed to its checkpoint
(:meth:`RunDir.trim`), so nothing is duplicated.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


@dataclass(frozen=True)
class Column:
    name: str
    meaning: str


@dataclass(frozen=True)
class Table:
    """One CSV table of a run directory: its file, what a row is, and its columns."""

    file: str
    row: str  # one row per ...
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _cols(*pairs: tuple[str, str]) -> tuple[Column, ...]:
    return tuple(Column(n, m) for n, m in pairs)


#: a sampled client's fate in a round
STATUSES = ("ok", "failed", "timeout", "malformed", "dropped", "offline", "late", "unaffordable")

ROUNDS = Table("rounds.csv", "round", _cols(
    ("round", "server round, from 1"),
    ("sim_seconds", "simulated round latency: the slowest participant's compute + download + upload, capped by round_deadline_s"),
    ("sim_seconds_total", "simulated seconds since the run began, at the round's end"),
    ("sim_start_s", "simulated seconds at the round's start: the last round's end, or later when no client was "
                    "online then (availability)"),
    ("wall_seconds", "real seconds of the round, central evaluation included"),
    ("train_wall_seconds", "real seconds of configure + clients + aggregate, without central evaluation"),
    ("server_seconds", "real seconds the server itself spent: configure_train + aggregate_train"),
    ("bytes_down", "bytes sent to all clients this round"),
    ("bytes_up", "bytes received from all clients this round"),
    ("selected", "clients with a row in clients.csv this round: those sampled (sync rounds), or those merged "
                 "and those that failed when sent (fedbuff, fedasync)"),
    *((s, f"clients whose status was '{s}'") for s in STATUSES),
    ("train_loss", "mean local training loss of the accepted clients, weighted by examples"),
    ("global_rank", "sum of the global model's LoD ranks (0 for models without LoD layers)"),
    ("learning_check", "empty, or why the run is not learning (at chance, loss not falling), in the round "
                       "that found it (the run says so once; see maestro_fl.callbacks.LearningCheck)"),
))
TIERS = Table("tiers.csv", "round and tier", _cols(
    ("round", "server round"),
    ("tier", "device tier"),
    ("accuracy", "test accuracy of the global model deployed at the tier's budget"),
    ("loss", "test cross-entropy of the same"),
    ("val_accuracy", "accuracy of the same on every client's validation split together (what tuning scores; "
                     "empty when val_fraction is 0)"),
    ("fraction", "the tier's rank (or width) fraction"),
    ("width", "hidden-width fraction of the deployed model: 1 for a rank prefix, below 1 for width methods "
              "and the width floor (a rank prefix of a narrower model)"),
    ("ranks", "rank per LoD layer, space-separated (empty for width and dense methods)"),
    ("params", "parameters of the deployed model"),
    ("macs", "forward multiply-accumulates per sample of the deployed model"),
    ("bytes_fp32", "size of the deployed model's weights in fp32"),
    ("params_ratio", "params / the full dense model's"),
    ("macs_ratio", "macs / the full dense model's"),
))
CLIENTS = Table("clients.csv", "round and sampled client", _cols(
    ("round", "server round"),
    ("node_id", "Flower node id"),
    ("partition_id", "the client's data partition"),
    ("tier", "device tier"),
    ("ranks", "rank per LoD layer it trained, space-separated (empty for width and dense methods)"),
    ("status", "ok, failed (raised), timeout (no reply in round_timeout_s), malformed (reply rejected), "
               "dropped (missed round_deadline_s), late (over-selected, finished after the first clients_per_round; "
               "or, in semi-asynchronous rounds, still training when the run ended) "
               "or unaffordable (no sub-model fits its device)"),
    ("fraction", "its budget's rank (or width) fraction; empty when unaffordable"),
    ("width", "hidden-width fraction of its sub-model (1 for a rank prefix); empty when unaffordable"),
    ("reason", "why it was not ok"),
    ("num_examples", "training examples it reported"),
    ("train_loss", "its mean local training loss"),
    ("bytes_down", "bytes of the sub-model sent to it"),
    ("bytes_up", "bytes of its reply's arrays"),
    ("macs", "multiply-accumulates its local training cost, by the method's cost model"),
    ("compute_s", "simulated compute seconds on its device"),
    ("download_s", "simulated download seconds"),
    ("upload_s", "simulated upload seconds"),
    ("wall_s", "real seconds the client spent on the message"),
    ("round_seconds", "compute_s + download_s + upload_s"),
    ("staleness", "round_mode fedbuff/fedasync: server steps between the model it was sent and the merge of its "
                  "update, which is written in the merge's round (0 in sync rounds)"),
))
DEVICES = Table("devices.csv", "registered client", _cols(
    ("partition_id", "the client's data partition"),
    ("node_id", "Flower node id"),
    ("num_examples", "training examples it holds"),
    ("tier", "device tier"),
    ("macs_per_s", "compute speed (multiply-accumulates per second)"),
    ("memory_bytes", "memory for training"),
    ("up_bps", "uplink, bits per second"),
    ("down_bps", "downlink, bits per second"),
    ("availability", "probability of being online in a round"),
    ("rank_fraction", "explicit budget fraction; 0 = derived from the device"),
))
EPOCHS = Table("epochs.csv", "epoch (maestro-fl train)", _cols(
    ("epoch", "epoch, from 1"),
    ("lr", "learning rate"),
    ("train_loss", "mean training loss"),
    ("train_accuracy", "training accuracy (of the sampled sub-models)"),
    ("test_loss", "test cross-entropy at full (learned) rank"),
    ("test_accuracy", "test accuracy at full (learned) rank"),
    ("total_rank", "sum of the learned ranks"),
    ("params", "parameters of the model as deployed"),
    ("macs", "forward multiply-accumulates per sample"),
    ("dense_params", "parameters of the dense model"),
    ("compression", "1 - params / dense_params"),
    ("seconds", "wall seconds of the epoch"),
))
RANKS = Table("ranks.csv", "epoch and LoD layer (maestro-fl train)", _cols(
    ("epoch", "epoch"),
    ("layer", "LoD layer name"),
    ("rank", "its rank after the epoch"),
    ("initial_rank", "its rank at the start"),
))
LADDER = Table("ladder.csv", "rank fraction (maestro-fl train)", _cols(
    ("rank_fraction", "the fraction every layer's rank is cut to"),
    ("test_loss", "test cross-entropy of the extracted model"),
    ("test_accuracy", "test accuracy of the extracted model"),
    ("total_rank", "sum of its ranks"),
    ("params", "its parameters"),
    ("macs", "its forward multiply-accumulates per sample"),
    ("bytes_fp32", "its weights in fp32"),
    ("bytes_fp16", "its weights in fp16"),
    ("dense_params", "the dense model's parameters"),
    ("dense_macs", "the dense model's MACs"),
    ("params_ratio", "params / dense_params"),
    ("macs_ratio", "macs / dense_macs"),
))
COMPONENTS = Table("components.csv", "round, LoD layer and rank component (diagnostics_every > 0)", _cols(
    ("round", "server round"),
    ("layer", "LoD layer name"),
    ("component", "rank component, from 1 (the ordered factors' column/row index + 1)"),
    ("holders", "accepted clients that held the component this round (narrowed clients count: they hold a corner)"),
    ("update_norm", "norm of the round's change of the component, sqrt(|dU[:, j]|^2 + |dV[j]|^2)"),
    ("update_share", "its squared norm's share of the whole LoD model's squared update this round"),
))
LADDER_ROUNDS = Table("ladder_rounds.csv", "diagnosed round and rank fraction (diagnostics_every > 0)", _cols(
    ("round", "server round (every diagnostics_every-th, and the last)"),
    ("fraction", "the fraction every LoD layer's rank is cut to"),
    ("accuracy", "test accuracy of the global model at that rank prefix"),
    ("val_accuracy", "accuracy of the same on every client's validation split together"),
    ("params", "parameters of that sub-model"),
))
TRUNCATION = Table("truncation.csv", "diagnosed round, tier and LoD layer (diagnostics_every > 0)", _cols(
    ("round", "server round (every diagnostics_every-th, and the last)"),
    ("tier", "device tier"),
    ("layer", "LoD layer name"),
    ("rank", "the tier's rank in the layer"),
    ("max_rank", "the global model's rank in the layer"),
    ("accuracy", "test accuracy of the global model with only this layer cut to the tier's rank"),
    ("drop", "full-rank accuracy minus that: the part of the tier's loss this layer's cut causes alone"),
))
#: the tables a federated run writes round by round (trimmed together on resume)
ROUND_TABLES = (ROUNDS, TIERS, CLIENTS, COMPONENTS, LADDER_ROUNDS, TRUNCATION)
TABLES = {t.file: t for t in (ROUNDS, TIERS, CLIENTS, DEVICES, EPOCHS, RANKS, LADDER, COMPONENTS, LADDER_ROUNDS,
                              TRUNCATION)}

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 4  # bump when the layout below changes (3: the run's fingerprint; 4: the server optimizer's state)
#: older formats still read: 3 lacks the server state (its runs had no server momentum)
READABLE_FORMATS = (3, CHECKPOINT_FORMAT)
LOCK_FILE = ".lock"  # held (flock) by the one process that writes the run directory


@dataclass
class ClientRound:
    """One client in one round: what it was given and what became of it (a row of clients.csv)."""

    round: int
    node_id: int
    partition_id: int
    tier: int
    ranks: list[int]
    status: str  # one of STATUSES
    fraction: float = float("nan")  # the budget's rank (or width) fraction; NaN when unaffordable
    reason: str = ""
    num_examples: int = 0
    train_loss: float = float("nan")
    bytes_down: int = 0
    bytes_up: int = 0
    macs: float = 0.0
    compute_s: float = 0.0
    download_s: float = 0.0
    upload_s: float = 0.0
    wall_s: float = 0.0  # real seconds the client spent (not simulated)
    width: float = float("nan")  # its sub-model's hidden-width fraction; NaN when unaffordable
    staleness: int = 0  # server steps between the model it was sent and the one its update merged into

    @property
    def round_seconds(self) -> float:
        return self.compute_s + self.download_s + self.upload_s

    def row(self) -> dict[str, Any]:
        """The clients.csv row."""
        return {c: (self.round_seconds if c == "round_seconds" else getattr(self, c)) for c in CLIENTS.names}


class RunDirError(FileNotFoundError):
    """A run directory lacks a file, or a file cannot be read."""


class CheckpointError(RunDirError):
    """A checkpoint is truncated, garbage, or of another format."""


@dataclass(frozen=True)
class Checkpoint:
    """The server's state after a round: everything resume and deployment need.

    ``arrays`` is the global model's state dict as NumPy arrays (LoD factors at
    the global ranks, which their shapes give).
    """

    round: int
    arrays: dict[str, np.ndarray]
    #: what defines the run (:func:`maestro_fl.federated.run_fingerprint`): resume compares it before it trims
    fingerprint: dict[str, Any] = field(default_factory=dict)
    #: the server optimizer's state (:class:`maestro_fl.server_optimizer.ServerMomentum`'s velocity; empty without)
    server_state: dict[str, np.ndarray] = field(default_factory=dict)


class DiskFullError(RunDirError):
    """A run directory's file could not be written (a full disk, a quota, a read-only folder)."""


def disk_error(path: Path, err: BaseException) -> DiskFullError:
    """One line naming the file that could not be written, and how to go on."""
    reason = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else first_line(err)
    return DiskFullError(f"{path}: could not be written ({reason}); the run directory is consistent up to its "
                         f"last checkpoint: free some space, then continue with resume={path.parent}")


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def save_checkpoint(run_dir: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint.pt`` atomically (a crash leaves the previous one; a failed write leaves no ``.tmp``)."""
    import torch

    run_dir = Path(run_dir)
    tmp = run_dir / (CHECKPOINT_FILE + ".tmp")
    try:
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "round": int(checkpoint.round),
                "fingerprint": json.dumps(checkpoint.fingerprint, sort_keys=True),
                "arrays": {k: torch.from_numpy(np.array(v)) for k, v in checkpoint.arrays.items()},
                "server_state": {k: torch.from_numpy(np.array(v)) for k, v in checkpoint.server_state.items()},
            },
            tmp,
        )
        os.replace(tmp, run_dir / CHECKPOINT_FILE)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError ("enforce fail ... write")
        tmp.unlink(missing_ok=True)
        raise disk_error(run_dir / CHECKPOINT_FILE, err) from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file; any damage is one :class:`CheckpointError` naming the file."""
    import torch

    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, garbage or foreign files all mean the same to a user
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}); "
                              "delete it to restart the run, or resume from an intact copy") from None
    if not isinstance(raw, dict) or raw.get("format") not in READABLE_FORMATS or not isinstance(raw.get("arrays"), dict):
        raise CheckpointError(f"{path}: not a maestro-fl checkpoint of format {CHECKPOINT_FORMAT}")
    try:
        arrays = {str(k): v.numpy() for k, v in raw["arrays"].items()}
        server_state = {str(k): v.numpy() for k, v in raw.get("server_state", {}).items()}
        fingerprint = json.loads(raw["fingerprint"])
        if not isinstance(fingerprint, dict):
            raise TypeError("its fingerprint is not a mapping")
        return Checkpoint(int(raw["round"]), arrays, fingerprint, server_state)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged checkpoint ({err})") from None


class TableWriter:
    """Appends rows to one table, flushing each batch; the columns are the schema's, in its order."""

    def __init__(self, path: Path, table: Table) -> None:
        self.path, self.table = path, table
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), [])
            if header != table.names:
                raise RunDirError(f"{path}: columns {header} are not those of {table.file} {table.names}")

    def append(self, row: Mapping[str, Any]) -> None:
        self.extend([row])

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        for row in rows:
            if list(row) != self.table.names:
                missing = [c for c in self.table.names if c not in row]
                extra = [c for c in row if c not in self.table.names]
                if missing or extra:
                    raise ValueError(f"{self.table.file}: row is missing {missing} and has unknown {extra}")
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        try:
            with open(self.path, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.table.names)
                if new_file:
                    writer.writeheader()
                for row in rows:
                    writer.writerow({k: _cell(row[k]) for k in self.table.names})
                fh.flush()
        except OSError as err:  # a partial row may be left: resume's trim drops it
            raise disk_error(self.path, err) from None


def complete_lines(path: Path, text: str | None = None) -> list[str]:
    """The file's lines with their newlines; a last line without one (a write cut short) is left out.

    A CSV row holds no newline here (no cell is multi-line), so a line is a row.
    """
    text = path.read_text() if text is None else text
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return lines


class RunDirBusy(RunDirError):
    """Another process is writing the run directory."""


class RunLock:
    """An exclusive ``flock`` on ``LOCK_FILE`` inside a run directory, held for the run's life.

    The kernel drops the lock when its holder exits, however it exits, so a
    stale lock file (a killed run) is simply taken over. The holder's PID is
    written into the file to name it to a second writer.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fh: BinaryIO | None = None

    def __enter__(self) -> RunLock:
        fh = open(self.path, "a+b")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.seek(0)
            holder = fh.read(32).decode(errors="replace").strip() or "another process"
            fh.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(f"{self.path.parent} is in use by PID {holder}: one process writes a run directory "
                                 "at a time; wait for it to end (or stop it) and try again") from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()).encode())
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return value


class RunDir:
    """A run directory: its config, tables and checkpoint, read and written through the schema above."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- config ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise RunDirError(f"{self.path} is not a run directory: no {CONFIG_FILE}")
        try:
            return dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as err:
            raise RunDirError(f"{path}: unreadable ({err})") from None

    def save_config(self, values: Mapping[str, Any]) -> None:
        (self.path / CONFIG_FILE).write_text(json.dumps(dict(values), indent=2) + "\n")

    # -- tables ------------------------------------------------------------------------------
    def writer(self, table: Table) -> TableWriter:
        return TableWriter(self.path / table.file, table)

    def has(self, table: Table) -> bool:
        path = self.path / table.file
        return path.is_file() and path.stat().st_size > 0

    def table(self, table: Table | str, required: Iterable[str] | None = None) -> Any:  # a pandas DataFrame
        """The table as a DataFrame; a missing, empty or malformed one is a :class:`RunDirError` naming it.

        ``table``: one of the schema's, or the file name of another CSV (a sweep's ``results.csv``).
        ``required``: the columns the caller needs (default: all of the schema's).
        """
        import pandas as pd

        if isinstance(table, str):
            table = TABLES.get(table, Table(table, "row", ()))
        path = self.path / table.file
        if not path.is_file():
            raise RunDirError(f"{path}: missing (is {self.path} a maestro-fl run directory?)")
        try:
            df = pd.read_csv(path, keep_default_na=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise RunDirError(f"{path}: unreadable table ({err})") from None
        need = table.names if required is None else list(required)
        missing = [c for c in need if c not in df.columns]
        if missing or df.empty:
            raise RunDirError(f"{path}: {'no rows' if df.empty else f'missing columns {missing}'}")
        return df

    def round_table_problems(self) -> list[str]:
        """Why the round tables cannot be trimmed safely (a foreign header, a round that is not a number), or []."""
        problems = []
        for table in ROUND_TABLES:
            path = self.path / table.file
            if not (path.is_file() and path.stat().st_size > 0):
                continue
            lines = complete_lines(path)
            header = next(csv.reader(lines[:1]), [])
            if header != table.names:
                problems.append(f"{path}: columns {header[:4]}... are not those of {table.file}")
                continue
            bad = [row[0] for row in csv.reader(lines[1:]) if not (row and row[0].isdigit())]
            if bad:
                problems.append(f"{path}: round {bad[0]!r} is not a round number")
        return problems

    def trim(self, last_round: int) -> None:
        """Drop every row of the round tables after ``last_round`` (written, then interrupted before the checkpoint),
        and an incomplete last line (a write cut short). Call :meth:`round_table_problems` first."""
        for table in ROUND_TABLES:
            path = self.path / table.file
            if not (path.exists() and path.stat().st_size > 0):
                continue
            text = path.read_text()
            lines = complete_lines(path, text)
            kept = lines[:1] + [ln for ln, row in zip(lines[1:], csv.reader(lines[1:]))
                                if row and row[0].isdigit() and int(row[0]) <= last_round]
            if "".join(kept) != text:  # rows dropped, or a partial last line
                tmp = path.with_suffix(".csv.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, path)

    # -- one writer --------------------------------------------------------------------------
    def lock(self) -> RunLock:
        """The run directory's writer lock (a context manager); a second writer gets :class:`RunDirBusy`."""
        return RunLock(self.path)

    # -- checkpoint --------------------------------------------------------------------------
    def checkpoint(self, required: bool = False) -> Checkpoint | None:
        path = self.path / CHECKPOINT_FILE
        if not path.exists():
            if required:
                raise RunDirError(f"{self.path} is not a finished run directory: no {CHECKPOINT_FILE}")
            return None
        return load_checkpoint(path)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        save_checkpoint(self.path, checkpoint)

    # -- summaries ---------------------------------------------------------------------------
    def final_table(self) -> list[dict[str, Any]]:
        """Per tier: final accuracy, footprint, and mean bytes per participating client per round."""
        tiers, clients = self.table(TIERS), self.table(CLIENTS)
        last = tiers[tiers["round"] == tiers["round"].max()]
        sent = clients[clients["status"] == "ok"].groupby("tier")
        rows = []
        for _, t in last.iterrows():
            tier = int(t["tier"])
            traffic = sent.get_group(tier) if tier in sent.groups else None
            rows.append(
                {
                    "tier": tier,
                    "clients": int((clients.drop_duplicates("partition_id")["tier"] == tier).sum()),
                    "accuracy": float(t["accuracy"]),
                    "loss": float(t["loss"]),
                    "perplexity": perplexity(float(t["loss"])),
                    "val_accuracy": float(t["val_accuracy"]) if "val_accuracy" in t else float("nan"),
                    "params": int(t["params"]),
                    "params_ratio": float(t["params_ratio"]),
                    "macs": int(t["macs"]),
                    "bytes_per_round": float((traffic["bytes_down"] + traffic["bytes_up"]).mean())
                    if traffic is not None else 0.0,
                    "updates": len(traffic) if traffic is not None else 0,
                    "unaffordable": int(((clients["tier"] == tier) & (clients["status"] == "unaffordable")).sum()),
                }
            )
        return rows


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean cross-entropy in nats: for next-character prediction, per character."""
    return math.exp(loss) if loss < 700 else math.inf  # (exp overflows a float past ~709)


FINAL_COLUMNS = [
    ("tier", "tier", ""),
    ("accuracy", "accuracy", ".4f"),
    ("params", "params", ",d"),
    ("params_ratio", "params/full", ".3f"),
    ("macs", "MACs", ",d"),
    ("bytes_per_round", "bytes/round", ",.0f"),
    ("updates", "updates", "d"),
]


#: a language task's final table: next-token accuracy, then the test loss and its perplexity
LANGUAGE_COLUMNS = [*FINAL_COLUMNS[:2], ("loss", "loss", ".4f"), ("perplexity", "perplexity", ".2f"),
                    *FINAL_COLUMNS[2:]]


def final_columns(dataset: str) -> list[tuple[str, str, str]]:
    """The columns the end-of-run table prints for ``dataset`` (perplexity for language tasks)."""
    from .catalog import LANGUAGE_DATASETS

    return LANGUAGE_COLUMNS if dataset in LANGUAGE_DATASETS else FINAL_COLUMNS


def schema_markdown() -> str:
    """The run directory's files and every table's columns with their meaning, as markdown
    (``docs/run_directory.md`` is this text; a test keeps it in step)."""
    lines = ["# The run directory", "",
             "Generated from `maestro_fl/results.py` (`maestro_fl.results.schema_markdown()`), which writes and "
             "reads every file below. Rows are flushed as they are produced; `checkpoint.pt` is written after "
             "the round's tables, so a resumed run trims the tables to it and repeats nothing.", "",
             "| file | what it holds |", "|---|---|",
             f"| `{CONFIG_FILE}` | the resolved config (every key; `maestro-fl COMMAND --help` explains them) |",
             f"| `{CHECKPOINT_FILE}` | the global model after the last finished round: its arrays, the round and the "
             f"run's fingerprint (every field that defines the run, the model's shapes, the data's and partitions' "
             f"digests), which resume checks before it changes anything) and the server optimizer's velocity "
             f"(`server_momentum`), so a resumed run steps as an uninterrupted one (format {CHECKPOINT_FORMAT}) |",
             f"| `{LOCK_FILE}` | the PID of the one process writing the run; locked (`flock`) while it runs, so a "
             "second writer is refused; the kernel releases it when that process ends |",
             "| `model.pt` | `maestro-fl train`: the trained LoD model (`maestro_fl.centralized.load_model`) |"]
    lines += [f"| `{t.file}` | one row per {t.row} |" for t in TABLES.values()]
    for t in TABLES.values():
        lines += ["", f"## `{t.file}`: one row per {t.row}", "", "| column | meaning |", "|---|---|"]
        lines += [f"| `{c.name}` | {c.meaning} |" for c in t.columns]
    return "\n".join(lines) + "\n"


#: the longest run (or sweep) name: a file name is at most 255 bytes, and a suffix and a table name go after it
MAX_NAME_LENGTH = 120


def check_name(field_name: str, name: str) -> None:
    """A run or sweep name is a relative folder inside ``out_dir``: folders joined by '/', none empty, '.' or
    '..', none starting with '-', each at most :data:`MAX_NAME_LENGTH` bytes; never absolute."""
    parts = name.split("/")
    if (not name or "\\" in name or "\0" in name or len(name.encode()) > 2 * MAX_NAME_LENGTH
            or any(p in ("", ".", "..") or p.startswith("-") or len(p.encode()) > MAX_NAME_LENGTH for p in parts)):
        raise ValueError(f"{field_name} must be a relative folder inside out_dir: no '..', not absolute, no folder "
                         f"starting with '-', at most {MAX_NAME_LENGTH} bytes a folder; got "
                         f"{name[:60]!r}{'...' if len(name) > 60 else ''}")


def safe_name(text: str) -> str:
    """``text`` as a folder name: characters other than letters, digits, '.', '_' and '-' become '_', bounded."""
    import re

    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("-.") or "run"
    return cleaned[:MAX_NAME_LENGTH - 8]  # room for new_run_dir's suffix


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name``, created; a name already taken gets a numeric suffix. ``name`` is one folder (:func:`check_name`)."""
    check_name("run_name", name)
    base = Path(out_dir) / name
    base.parent.mkdir(parents=True, exist_ok=True)
    path, i = base, 1
    while True:
        try:
            path.mkdir()  # atomic: of two runs given one name at once, each gets its own folder
            return path
        except FileExistsError:
            i += 1
            path = base.with_name(f"{base.name}-{i}")


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def format_table(rows: Sequence[Mapping[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` holds (key, header, format spec)."""
    head = [h for _, h, _ in columns]
    body = [[format(r[k], f) if f else str(r[k]) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])
