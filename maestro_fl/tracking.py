"""Experiment tracking: the tables' numbers, round by round, in TensorBoard or MLflow.

The run directory's CSVs stay the record; a tracker mirrors them so that runs can be watched and compared
in a tracker's own UI. Each is a round callback placed after the tables, installed with
``pip install maestro-fl[tracking]`` and chosen with ``tracking=tensorboard``, ``tracking=mlflow`` or both
(``tracking=tensorboard,mlflow``).

A resumed run continues its curves without duplicating a round: TensorBoard's writer purges the steps from
the resumed round on, and MLflow's tracker skips the rounds its run already holds (a round that ran but was
never checkpointed is rerun with the same seed, so its numbers are the ones already logged).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .callbacks import RoundCallback, RoundResult
from .catalog import tracker_names

LOG = logging.getLogger("maestro_fl")

#: the folder of a run directory that TensorBoard's event files go to
TENSORBOARD_DIR = "tensorboard"
#: the run directory's record of its MLflow run, so that a resumed run logs into the same one
MLFLOW_RUN_FILE = "mlflow_run.json"
#: the database next to a run directory that MLflow's runs go to when ``MLFLOW_TRACKING_URI`` is unset: the runs of
#: one ``out_dir`` (or one sweep) share it, so ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` compares them
MLFLOW_DB = "mlflow.db"
#: the MLflow experiment when ``MLFLOW_EXPERIMENT_NAME`` is unset
MLFLOW_EXPERIMENT = "maestro-fl"
#: the round-table columns a tracker mirrors (``round/<column>``)
ROUND_KEYS = ("train_loss", "bytes_down", "bytes_up", "sim_seconds_total", "wall_seconds", "ok", "failed",
              "timeout", "malformed", "dropped", "offline", "late", "unaffordable")
#: the tier-table columns a tracker mirrors (``tier_<T>/<column>``)
TIER_KEYS = ("accuracy", "loss", "val_accuracy")


def round_metrics(result: RoundResult) -> dict[str, float]:
    """What a round adds to a tracker: each evaluated tier's accuracy, loss and validation accuracy, and the
    round table's training loss, bytes, seconds and client counts; NaN (no validation split) is left out."""
    out: dict[str, float] = {}
    for tier in result.tiers:
        for key in TIER_KEYS:
            value = tier.get(key)
            if value is not None and value == value:
                out[f"tier_{tier['tier']}/{key}"] = float(value)
    for key in ROUND_KEYS:
        value = result.row.get(key)
        if value is not None and value == value:
            out[f"round/{key}"] = float(value)
    return out


class TensorBoardTracking(RoundCallback):
    """Per round, :func:`round_metrics` as scalars under ``RUN_DIR/tensorboard``, the step being the server round."""

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any] | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer needs the tensorboard package
            raise ImportError("tracking=tensorboard needs TensorBoard: pip install 'maestro-fl[tracking]' "
                              "(or pip install tensorboard)") from err
        self._writer_class = SummaryWriter
        self.log_dir = str(Path(run_dir) / TENSORBOARD_DIR)
        self.writer: Any = None

    def on_run_start(self, first_round: int, last_round: int) -> None:
        # a resumed run reruns from first_round: the purge drops what an interrupted session logged from there on
        self.writer = self._writer_class(log_dir=self.log_dir, purge_step=first_round if first_round > 1 else None)

    def after_round(self, result: RoundResult) -> bool:
        if self.writer is None:
            self.on_run_start(result.round, result.round)
        for key, value in round_metrics(result).items():
            self.writer.add_scalar(key, value, result.round)
        self.writer.flush()  # as the tables: what a round produced is on disk when the round ends
        return False

    def on_run_end(self) -> None:
        if self.writer is not None:
            self.writer.close()


def mlflow_tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite database beside the run directory (:data:`MLFLOW_DB`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir.parent / MLFLOW_DB).resolve()}"


class MLflowTracking(RoundCallback):
    """Per round, :func:`round_metrics` as MLflow metrics (the step is the server round); the run's config as
    its parameters; its method, dataset, model and seed as tags.

    ``config`` is the run's resolved config (what ``config.json`` holds). The MLflow run is recorded in ``RUN_DIR/mlflow_run.json``; a resumed run logs into it again. Tracking is
    a mirror of the tables: a tracker that cannot log (a database locked by a parallel sweep, a server
    gone) says so once and the run goes on.
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any] | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ImportError("tracking=mlflow needs MLflow: pip install 'maestro-fl[tracking]' "
                              "(or pip install mlflow)") from err
        self.run_dir = Path(run_dir)
        self.config = dict(config or {})
        record = self.run_dir / MLFLOW_RUN_FILE
        saved = json.loads(record.read_text()) if record.is_file() else {}
        self.uri = saved.get("tracking_uri") or mlflow_tracking_uri(self.run_dir)
        self.client: Any = MlflowClient(tracking_uri=self.uri)
        self.run_id: str = saved.get("run_id", "")
        self.logged_up_to = 0  # the last round the MLflow run already holds
        self.failed = False
        if not self.run_id:
            self.run_id = self._create_run()
            record.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}))
        else:
            history = self.client.get_metric_history(self.run_id, "round/ok")
            self.logged_up_to = max((m.step for m in history), default=0)

    def _create_run(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        config = self.config
        tags = {key: str(config[key]) for key in ("strategy", "dataset", "model", "seed") if key in config}
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name, tags=tags | {"run_dir": str(self.run_dir)})
        from mlflow.entities import Param

        # MLflow's parameters are strings of at most 6,000 characters: a long value (a device table) is cut
        params = [Param(key, json.dumps(value) if not isinstance(value, str) else value)
                  for key, value in sorted(config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(run.info.run_id, params=[Param(p.key, p.value[:6000]) for p in params[start:start + 100]])
        return str(run.info.run_id)

    def after_round(self, result: RoundResult) -> bool:
        if self.failed or result.round <= self.logged_up_to:
            return False
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)  # MLflow's timestamps are wall-clock milliseconds
        metrics = [Metric(key, value, stamp, result.round) for key, value in round_metrics(result).items()]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as err:  # noqa: BLE001  # any tracker failure: the tables are the record, the run goes on
            self.failed = True
            LOG.warning("tracking=mlflow stopped logging at round %d (%s); the run and its tables go on",
                        result.round, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False

    def on_run_end(self) -> None:
        if not self.failed:
            try:
                self.client.set_terminated(self.run_id)
            except Exception:  # noqa: BLE001  # as above: never the run's failure
                pass


TRACKER_CLASSES = {"tensorboard": TensorBoardTracking, "mlflow": MLflowTracking}


def make_trackers(tracking: str, run_dir: str | Path, config: Mapping[str, Any]) -> list[RoundCallback]:
    """The callbacks ``tracking`` names, in its order, for the run at ``run_dir`` with resolved ``config``."""
    return [TRACKER_CLASSES[name](run_dir, config) for name in tracker_names(tracking)]
