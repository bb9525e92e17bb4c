"""Experiment tracking: the tables' numbers, round by round, in TensorBoard.

The run directory's CSVs stay the record; a tracker mirrors them so that runs can be watched and compared
in TensorBoard's own UI (``tensorboard --logdir runs``). It is a round callback like the tables, installed
with ``pip install maestro-fl[tracking]`` and chosen with ``tracking=tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .callbacks import RoundCallback, RoundResult

#: the folder of a run directory that TensorBoard's event files go to
TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracking(RoundCallback):
    """Per round: each tier's test accuracy and loss (``tier_T/accuracy``), the round's training loss, bytes,
    simulated seconds and client counts by status (``round/...``), under ``RUN_DIR/tensorboard``.

    The step is the server round, so a resumed run continues its curves.
    """

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch's writer needs the tensorboard package
            raise ImportError("tracking=tensorboard needs TensorBoard: pip install 'maestro-fl[tracking]' "
                              "(or pip install tensorboard)") from err
        self.writer: Any = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def after_round(self, result: RoundResult) -> bool:
        step = result.round
        for tier in result.tiers:
            for key in ("accuracy", "loss", "val_accuracy"):
                value = tier.get(key)
                if value is not None and value == value:  # NaN (no validation split) is left out
                    self.writer.add_scalar(f"tier_{tier['tier']}/{key}", float(value), step)
        for key in ("train_loss", "bytes_down", "bytes_up", "sim_seconds_total", "wall_seconds", "ok", "failed",
                    "timeout", "malformed", "dropped", "unaffordable"):
            value = result.row.get(key)
            if value is not None and value == value:
                self.writer.add_scalar(f"round/{key}", float(value), step)
        self.writer.flush()  # as the tables: what a round produced is on disk when the round ends
        return False

    def on_run_end(self) -> None:
        self.writer.close()
