"""The server's optimizer: what the server does with a round's merged model (FedAvgM).

A method's server rule (:meth:`maestro_fl.methods.base.Method.merge`) turns the
round's replies into a merged model. FedAvg takes it as the new global model.
FedAvgM (Hsu, Qi and Brown, 2019, arXiv 1909.06335; Reddi et al., ICLR 2021,
"Adaptive Federated Optimization", their FedAvgM with server learning rate 1)
treats ``Δ = before − merged`` as a pseudo-gradient and keeps a velocity::

    v ← β·v + Δ,    global ← before − v

With ``β = 0`` this is FedAvg. The rule is method-agnostic: it runs after
every method's merge, on every array whose shape the merge kept, so
"same server optimizer" holds across methods. For a sub-model method, an
element no client held this round has ``Δ = 0``; its velocity decays by β
instead of stopping at once.

Arrays whose shape the merge changed (DLRT's adaptive ranks, server-side
shrinking) restart their velocity; running statistics of batch norm and
integer counters are taken as merged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Arrays = dict[str, np.ndarray]

#: state-dict entries that are statistics, not weights: no pseudo-gradient is defined for them
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def has_velocity(name: str, before: np.ndarray, merged: np.ndarray) -> bool:
    """Whether ``name`` takes a momentum step: a floating weight whose shape the merge kept."""
    return (merged.shape == before.shape and merged.dtype.kind == "f"
            and name.rsplit(".", 1)[-1] not in STATISTICS)


def momentum_step(
    before: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray],
    velocity: Mapping[str, np.ndarray], beta: float,
) -> tuple[Arrays, Arrays]:
    """One FedAvgM step: the new global arrays and the new velocity (float64, per weight).

    Parameters
    ----------
    before : the global model the round started from.
    merged : the method's merge of the round's replies (same keys).
    velocity : the velocity after the previous round (missing keys: zero).
    beta : the server momentum, in ``[0, 1)``.
    """
    new, vel = dict(merged), {}
    for name, m in merged.items():
        b = before.get(name)
        if b is None or not has_velocity(name, b, m):
            continue
        previous = velocity.get(name)
        v = b.astype(np.float64) - m.astype(np.float64)
        if previous is not None and previous.shape == v.shape:
            v += beta * previous
        vel[name] = v
        new[name] = (b - v).astype(b.dtype)
    return new, vel


class ServerMomentum:
    """The server's velocity across rounds, stepped once per merged round and saved with the checkpoint."""

    def __init__(self, beta: float, velocity: Mapping[str, np.ndarray] | None = None) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {beta}")
        self.beta = beta
        self.velocity: Arrays = {k: np.asarray(v, dtype=np.float64) for k, v in (velocity or {}).items()}

    def step(self, before: Mapping[str, np.ndarray], merged: Arrays) -> Arrays:
        """The new global model from the round's merge (the merge itself when ``beta`` is 0)."""
        if self.beta == 0.0:
            return merged
        new, self.velocity = momentum_step(before, merged, self.velocity, self.beta)
        return new

    def state(self) -> Arrays:
        """What a checkpoint stores so a resumed run steps exactly as an uninterrupted one."""
        return dict(self.velocity)
