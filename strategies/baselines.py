"""FedAvg baselines on the same engine, devices, partitions and accounting as FedLoD.

Each overrides one method of :class:`~strategies.fedlod.FedLoD`, :meth:`budget`:
what a device trains. Both train the dense model (``maestro_fl.federated``
builds it unfactorized for them), so the ordered-factor rule reduces to
FedAvg: no parameter has a rank axis.
"""

from __future__ import annotations

from maestro_fl.budget import Cost, DeviceCapability

from .fedlod import FedLoD


class FedAvgDense(FedLoD):
    """FedAvg with every client on the full dense model, budgets ignored: the upper bound."""

    def budget(self, device: DeviceCapability) -> Cost | None:
        return max(self.cost_table(), key=lambda c: c.fraction)


class FedAvgExclusive(FedLoD):
    """FedAvg over the clients whose device affords the full dense model; the others sit out."""

    def budget(self, device: DeviceCapability) -> Cost | None:
        cost = super().budget(device)
        return cost if cost is not None and cost.fraction == 1.0 else None


STRATEGY_CLASSES: dict[str, type[FedLoD]] = {
    "fedlod": FedLoD,
    "fedavg_dense": FedAvgDense,
    "fedavg_exclusive": FedAvgExclusive,
}
