"""A federated method as one unit: its sub-model family, client trainer, server rule and cost model.

As pfl-research's ``FederatedAlgorithm``, one class holds both halves:

* **sub-model family** (:attr:`FederatedMethod.family`, :mod:`maestro_fl.submodels`):
  what a client at a budget receives (:meth:`~FederatedMethod.index`,
  :meth:`~FederatedMethod.assign`), the module it trains
  (:meth:`~FederatedMethod.client_model`) and what a tier deploys
  (:meth:`~FederatedMethod.deploy`);
* **client trainer** (:meth:`~FederatedMethod.train`): local training of that
  sub-model, through the one epoch loop :func:`maestro_fl.training.run_epoch`;
* **server rule** (:meth:`~FederatedMethod.merge`): how the good replies merge,
  calling the pure functions of :mod:`maestro_fl.aggregation`;
* **cost model** (:meth:`~FederatedMethod.cost_table`, :attr:`~FederatedMethod.passes`):
  the compute, memory and bytes a budget is checked against, and by which the
  server charges what the client's loop ran (:mod:`maestro_fl.server`).

The Flower side (``strategies.SubModelStrategy`` and the ClientApp) only
orchestrates: it never branches on the method. Nothing here imports Flower.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .. import message_keys as P
from ..aggregation import aggregate_robust
from ..budget import BudgetCheck, Cost, DeviceCapability, affordable, explain_budget
from ..config import ConfigError, SimConfig, parse_options
from ..convert import Ranks
from ..data import Split
from ..footprint import Inputs
from ..submodels import Arrays, Index, ModelAtWidth, SubModelFamily
from ..training import EpochStats, SGDStep, Step, SubModelDraw, run_epoch


@dataclass(frozen=True)
class Assignment:
    """What one client trains in one round; it travels to the client in the train message.

    Attributes
    ----------
    fraction : float
        The budget's rank (or width) fraction.
    ranks : dict
        Per LoD layer, the rank of the client's sub-model (rank families; empty otherwise).
    levels : tuple of float
        The fractions the client's ordered dropout draws from, its own last
        (FjORD's ``p_s ≤ p_max``); empty when it trains only its own sub-model.
    level_ranks : tuple of dict
        For rank families, the ranks of every level.
    label_mask : bool
        Train only the logits of the client's own classes (HeteroFL's masked classifier).
    """

    fraction: float
    ranks: Mapping[str, int] = field(default_factory=dict)
    levels: tuple[float, ...] = ()
    level_ranks: tuple[Mapping[str, int], ...] = ()
    label_mask: bool = False

    def to_config(self, layer_names: Sequence[str]) -> dict[str, Any]:
        """ConfigRecord entries (ranks as lists in ``layer_names`` order)."""
        return {
            P.FRACTION: float(self.fraction),
            P.RANKS: [int(self.ranks[n]) for n in layer_names] if self.ranks else [],
            P.LEVELS: [float(p) for p in self.levels],
            P.LEVEL_RANKS: [int(r[n]) for r in self.level_ranks for n in layer_names],
            P.LABEL_MASK: bool(self.label_mask),
        }

    @classmethod
    def from_config(cls, conf: Mapping[str, Any], layer_names: Sequence[str]) -> Assignment:
        """The inverse of :meth:`to_config`; raises ``ValueError`` on entries of the wrong length."""
        ranks = [int(r) for r in conf[P.RANKS]]
        if ranks and len(ranks) != len(layer_names):
            raise ValueError(f"{P.RANKS}: expected {len(layer_names)} values (one per LoD layer), got {len(ranks)}")
        flat = [int(r) for r in conf[P.LEVEL_RANKS]]
        n = len(layer_names)
        if flat and (not n or len(flat) % n):
            raise ValueError(f"{P.LEVEL_RANKS}: {len(flat)} values are not whole levels of {n} layers")
        return cls(
            fraction=float(conf[P.FRACTION]),
            ranks=dict(zip(layer_names, ranks)),
            levels=tuple(float(p) for p in conf[P.LEVELS]),
            level_ranks=tuple(dict(zip(layer_names, flat[i : i + n])) for i in range(0, len(flat), n)) if n else (),
            label_mask=bool(conf[P.LABEL_MASK]),
        )


@dataclass(frozen=True)
class ClientTask:
    """The server's record of what one client was given in one round (never sent)."""

    node: int
    partition: int
    device: DeviceCapability
    cost: Cost
    assignment: Assignment
    index: Index  # where each array the client holds sits in the global one
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    bytes_down: int


@dataclass(frozen=True)
class Update:
    """One good reply: the client's trained arrays and what the server knows of it."""

    task: ClientTask
    arrays: Arrays
    num_examples: int
    labels: tuple[int, ...] = ()  # the classes of its training data, when its assignment masks labels


@dataclass(frozen=True)
class LocalTraining:
    """What a client's local training is given besides its sub-model, data and assignment: one object, so that
    every trainer has the same signature and a new setting reaches them all without touching any.

    Attributes
    ----------
    epochs, lr : int, float
        Local epochs and step size (the run's ``local_epochs`` and ``lr``).
    generator : torch.Generator
        The client's randomness this round (data order, sampled sub-models): seeded by (seed, round, client).
    augment : bool
        Whether the task augments its training inputs.
    device : torch.device or str
        Where the client trains.
    """

    epochs: int
    lr: float
    generator: torch.Generator
    augment: bool = False
    device: torch.device | str = "cpu"


@dataclass(frozen=True)
class LocalResult:
    """What local training produced: the trained sub-model (same shapes as received) and its statistics."""

    model: nn.Module
    epochs: tuple[EpochStats, ...]
    labels: tuple[int, ...] = ()

    @property
    def loss(self) -> float:
        return float(np.mean([e.loss for e in self.epochs])) if self.epochs else 0.0

    @property
    def forward_passes(self) -> int:
        return sum(e.forward_passes for e in self.epochs)

    @property
    def sample_passes(self) -> int:
        """Examples × passes over all epochs: what the cost model charges."""
        return sum(e.sample_passes for e in self.epochs)


@dataclass(frozen=True)
class NoParams:
    """A method without options of its own."""


#: the fields only the LoD methods (FedLoD and the methods built on it) read: how the factors start, and the
#: width floor below the smallest rank prefix
LOD_ONLY_FIELDS = frozenset({"init", "width_floor", "width_floor_rank", "level_top_share"})


class FederatedMethod(ABC):
    """A heterogeneous federated method: sub-model family, client trainer, server rule, cost model.

    Parameters
    ----------
    cfg : SimConfig
        The run's settings (local training, budgets, the method's options).
    inputs : InputSpec or tuple
        What one input sample is (its :class:`~maestro_fl.models.InputSpec`: token
        ids need its integer dtype), or its shape (float inputs).
    build : callable
        ``build(p)``: the dense model at width fraction ``p`` (``build(1.0)`` is
        the full model); freshly initialized from torch's global RNG.
    """

    #: the ``strategy`` name of the method in configs
    name: ClassVar[str]
    #: the width methods want HeteroFL's static BatchNorm (running statistics of different widths cannot be averaged)
    static_batchnorm: ClassVar[bool] = False
    #: whether the client trainer may run on a GPU share (``num_gpus_per_client > 0``)
    runs_on_gpu: ClassVar[bool] = True
    #: SimConfig fields this method never reads: stored runs that differ only in these are the same
    #: experiment (a sweep reuses them when such a default changes)
    unread_fields: ClassVar[frozenset[str]] = frozenset()
    #: the method's own options: a frozen dataclass whose fields a config sets as ``method.NAME=VALUE`` (or in
    #: a ``[method]`` table), each default with its one-line reason as a comment, as SimConfig's
    Params: ClassVar[type] = NoParams
    #: runs of this method with other options that ``maestro-fl compare`` lists after it: name -> config values
    #: (a class's own: a subclass does not inherit its parent's)
    variants: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init__(self, cfg: SimConfig, inputs: Inputs, build: ModelAtWidth) -> None:
        self.cfg = cfg
        self.params: Any = self.parse_params(cfg)
        self.inputs = inputs
        self.build = build
        torch.manual_seed(cfg.seed)
        self.family: SubModelFamily = self.make_family(torch.Generator().manual_seed(cfg.seed))
        self._tables: dict[int, list[Cost]] = {}
        self._client_models: dict[tuple[Any, ...], nn.Module] = {}

    # -- sub-model family ------------------------------------------------------------------
    @property
    def rank_allocation(self) -> str:
        """How a budget's fraction becomes per-layer ranks (``maestro_fl.convert.RANK_RULES``); FedLoD reads its
        config's, the other rank methods keep their papers' one fraction for every layer."""
        return "uniform"

    @abstractmethod
    def make_family(self, generator: torch.Generator) -> SubModelFamily:
        """The family of sub-models, holding the server's initial model (seeded by ``generator``)."""

    @property
    def template(self) -> nn.Module:
        return self.family.template

    @property
    def passes(self) -> int:
        """Forward/backward passes per local step (the cost model charges each)."""
        return 1

    @property
    def live_graphs(self) -> int:
        """Autograd graphs alive at once in a step (activation memory)."""
        return 1

    def cost_table(self, global_arrays: Mapping[str, np.ndarray] | None = None) -> list[Cost]:
        """What training each sub-model a budget can pick costs with this method's trainer (largest first)."""
        table = self.family.cost_table(global_arrays)
        if id(table) not in self._tables:
            self._tables[id(table)] = [
                dataclasses.replace(c, passes=self.passes, live_graphs=self.live_graphs) for c in table
            ]
        return self._tables[id(table)]

    def budget(self, table: Sequence[Cost], device: DeviceCapability, samples: int) -> Cost | None:
        """The sub-model a device trains this round, or ``None`` when it affords none.

        With ``ignore_budgets`` (the homogeneous bound) every device trains the largest one.
        """
        if self.cfg.ignore_budgets:
            return table[0]
        return affordable(table, device, **self._budget_terms(samples))

    def explain_budget(self, table: Sequence[Cost], device: DeviceCapability, samples: int) -> BudgetCheck:
        """:meth:`budget`'s choice and the constraint that sets it (``maestro-fl plan``)."""
        check = explain_budget(table, device, **self._budget_terms(samples))
        if self.cfg.ignore_budgets:
            return dataclasses.replace(check, chosen=table[0], binding="ignored")
        return check

    def _budget_terms(self, samples: int) -> dict[str, Any]:
        return {"batch_size": self.cfg.batch_size, "samples": samples, "epochs": self.cfg.local_epochs,
                "deadline_s": self.cfg.compute_budget_s}

    def assign(self, cost: Cost, tier_costs: Sequence[Cost]) -> Assignment:
        """What a client at ``cost`` trains, given every tier's budget (the levels of ordered dropout)."""
        return Assignment(cost.fraction, dict(cost.ranks))

    def index(self, cost: Cost, server_round: int, current: Mapping[str, np.ndarray] | None = None) -> Index:
        """Which part of every global array a client at ``cost`` receives in ``server_round``.

        ``current``: the global arrays of the round, for families that choose by
        what the model holds (FIARSE's importance); ``None`` before the first round.
        """
        return self.family.index(cost, server_round)

    def client_model(self, assignment: Assignment) -> nn.Module:
        """The module a client trains (the shapes of what it received), built once per shape in a process.

        A Ray actor runs many clients: building (deep-copying) a module per
        message cost more than a small client's training. The caller loads
        every entry of its state dict before training (strict), the trainers
        start every step with ``zero_grad(set_to_none=True)`` and restore the
        ranks they draw, so a reused module trains exactly as a fresh one
        (``tests/test_client_reuse.py``).
        """
        key = (assignment.fraction, tuple(sorted(assignment.ranks.items())))
        model = self._client_models.get(key)
        if model is None:
            model = self._client_models[key] = self.family.client_model(assignment.fraction, assignment.ranks)
        return model

    def deploy(self, global_model: nn.Module, cost: Cost) -> tuple[nn.Module, Ranks | None]:
        """The model a tier at ``cost`` runs, and the ranks to run it at."""
        return self.family.deploy(global_model, cost)

    # -- client trainer --------------------------------------------------------------------
    @abstractmethod
    def train(self, model: nn.Module, data: Split, assignment: Assignment, local: LocalTraining) -> LocalResult:
        """Train the client's sub-model in place (or return a new one of the same shapes)."""

    def sgd(self, model: nn.Module, lr: float) -> SGDStep:
        """Local SGD with the run's momentum (reset every round), weight decay and clipping."""
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=self.cfg.momentum,
                              weight_decay=self.cfg.weight_decay)
        return SGDStep(opt, self.cfg.clip_grad_norm)

    def epochs(self, model: nn.Module, data: Split, draw: SubModelDraw, step: Step, local: LocalTraining,
               **options: Any) -> tuple[EpochStats, ...]:
        """``local.epochs`` passes of :func:`~maestro_fl.training.run_epoch` over the client's data."""
        model.train()
        return tuple(
            run_epoch(data, draw, step, batch_size=self.cfg.batch_size, generator=local.generator,
                      augment=local.augment, device=local.device, **options)
            for _ in range(local.epochs)
        )

    # -- server rule -----------------------------------------------------------------------
    @abstractmethod
    def merge(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        """The new global arrays from the good replies of ``server_round``."""

    @classmethod
    def elementwise_rule(cls, cfg: SimConfig) -> bool:
        """Whether the server rule averages each element over the clients holding it (robust merges may replace it)."""
        return True

    @classmethod
    def keeps_coordinates(cls, cfg: SimConfig) -> bool:
        """Whether the merged global arrays are in the coordinates of the previous round's, so that their
        difference is an update a server optimizer may accumulate (FedAvgM's velocity). A rule that
        re-factors the model every round (an SVD of the averaged products) returns new bases each time:
        a velocity of factors would add up unrelated directions, so server momentum is off for it."""
        return True

    @classmethod
    def parse_params(cls, cfg: SimConfig) -> Any:
        """The method's :attr:`Params` from the config's ``method`` options; a ConfigError names a bad one."""
        return parse_options(cls.Params, cfg.method, f"strategy {cls.name!r}")

    @classmethod
    def check_config(cls, cfg: SimConfig) -> None:
        """Refuse, in one line, options this method cannot honour (run before the method is built)."""
        cls.parse_params(cfg)
        if cfg.robust_merge != "none" and not cls.elementwise_rule(cfg):
            raise ConfigError(
                f"robust_merge applies to methods whose server rule averages each element over its holders; "
                f"{cfg.strategy!r} (aggregation {cfg.aggregation!r}) rebuilds products or masks rows")

    def merge_updates(self, current: Mapping[str, np.ndarray], updates: Sequence[Update], server_round: int) -> Arrays:
        """:meth:`merge`, or the run's robust merge (median, trimmed mean) over the same parts."""
        if self.cfg.robust_merge == "none":
            return self.merge(current, updates, server_round)
        return aggregate_robust(current, [(u.arrays, u.task.index) for u in updates], self.cfg.robust_merge,
                                self.cfg.trim_fraction)


def examples_weighted(updates: Sequence[Update]) -> list[tuple[Arrays, Index, float]]:
    """``(arrays, index, num_examples)`` per update, for :func:`~maestro_fl.aggregation.aggregate_indexed`."""
    return [(u.arrays, u.task.index, float(u.num_examples)) for u in updates]


def corners_weighted(updates: Sequence[Update]) -> list[tuple[Arrays, float]]:
    """``(arrays, num_examples)`` per update, for the rules on leading corners."""
    return [(u.arrays, float(u.num_examples)) for u in updates]
