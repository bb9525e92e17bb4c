"""A tier's deployable model, standalone: what a device of that tier would ship.

From a finished run directory, the global model is deployed at one tier's
budget (or at the largest sub-model a given fraction buys) exactly as the
central evaluation deploys it, then made real: LoD layers are cut to their
ranks and turned dense where the dense form is smaller
(:func:`maestro_fl.convert.extract`, Maestro's ``model_to_full``), width
sub-models are already the narrower network. The result is saved with
``torch.export`` (a dynamic batch dimension), which loads with PyTorch alone::

    program = torch.export.load("model.pt2")
    logits = program.module()(x)

``model.json`` beside it records the tier, the ranks, the footprint (measured
on the exported model itself) and its test accuracy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .budget import Cost
from .convert import extract, lod_layers
from .federated import load_global_model
from .footprint import footprint
from .references import OBJECT_PREFIX, registered
from .results import TIERS, RunDir
from .training import evaluate

MODEL_FILE = "model.pt2"
INFO_FILE = "model.json"


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_tier` wrote, and the exported model's own measurements."""

    path: str
    run_dir: str
    strategy: str
    tier: int | None
    fraction: float
    ranks: dict[str, int]
    params: int
    macs: int
    bytes_fp32: int
    test_accuracy: float
    input_shape: tuple[int, ...]
    num_classes: int


def _tier_fraction(run: RunDir, tier: int) -> float:
    tiers = run.table(TIERS, required=["round", "tier", "fraction"])
    last = tiers[tiers["round"] == tiers["round"].max()]
    row = last[last["tier"] == tier]
    if row.empty:
        raise ValueError(f"tier {tier}: not in {run.path}/{TIERS.file}; its tiers are {sorted(last['tier'].tolist())}")
    fraction = float(row["fraction"].iloc[0])
    if math.isnan(fraction):
        raise ValueError(f"tier {tier}: no device of it affords a sub-model in this run, so there is none to export")
    return fraction


def _cost_at(table: list[Cost], fraction: float, exact: bool) -> Cost:
    """The tier's entry of the cost table (``exact``), or the largest sub-model a budget of ``fraction`` buys."""
    if exact:
        match = [c for c in table if math.isclose(c.fraction, fraction, rel_tol=0, abs_tol=1e-9)]
        if not match:
            raise ValueError(f"fraction {fraction}: no sub-model of the run's family has it")
        return match[0]
    fitting = [c for c in table if c.fraction <= fraction + 1e-12]
    if not fitting:
        raise ValueError(f"fraction {fraction}: below the smallest sub-model ({min(c.fraction for c in table):.4g})")
    return max(fitting, key=lambda c: c.fraction)


def export_tier(run_dir: str | Path, tier: int | None = None, fraction: float | None = None,
                out: str | Path | None = None) -> ExportedModel:
    """Write ``model.pt2`` and ``model.json`` for one tier of a finished run.

    Parameters
    ----------
    run_dir : path
        A run directory with its checkpoint (``maestro-fl simulate`` wrote it).
    tier : int, optional
        The device tier, as in ``tiers.csv``: its sub-model at the last round.
    fraction : float, optional
        Instead of a tier: the largest sub-model of the run's family whose
        fraction is at most this (what a budget of that fraction buys).
    out : path, optional
        The folder to write to; default ``RUN_DIR/export/tier-T`` (or ``fraction-P``).
    """
    if (tier is None) == (fraction is None):
        raise ValueError("export: give exactly one of tier or fraction")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    run = RunDir(run_dir)
    unknown = {key: value for key, value in run.config().items() if key in ("model", "dataset", "devices")
               and isinstance(value, str) and value.startswith(OBJECT_PREFIX) and value not in registered()}
    if unknown:
        raise ValueError(f"{run.path} was built from Python objects ({', '.join(f'{k}={v}' for k, v in unknown.items())}) "
                         f"that this process does not hold; pass the same objects again: strategies.api.export("
                         f"run_dir, tier=..., {', '.join(f'{k}=...' for k in unknown)})")
    cfg, fed, global_model = load_global_model(run_dir)
    arrays = {k: v.detach().cpu().numpy() for k, v in global_model.state_dict().items()}
    table = fed.method.family.cost_table(arrays)
    wanted = _tier_fraction(run, tier) if tier is not None else float(fraction)  # type: ignore[arg-type]  # one is set
    cost = _cost_at(table, wanted, exact=tier is not None)
    model, ranks = fed.method.deploy(global_model, cost)
    if lod_layers(model):
        model = extract(model, ranks or None)  # the real ranks, and dense where dense is smaller
    model = model.eval()
    test = fed.data.test
    _, accuracy = evaluate(model, test, None)
    fp = footprint(model, fed.data.spec.shape)

    target = Path(out) if out is not None else run.path / "export" / (
        f"tier-{tier}" if tier is not None else f"fraction-{wanted:g}")
    target.mkdir(parents=True, exist_ok=True)
    example = test.x[:2].clone()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, target / MODEL_FILE)
    result = ExportedModel(
        path=str(target / MODEL_FILE), run_dir=str(run.path), strategy=cfg.strategy, tier=tier,
        fraction=cost.fraction, ranks={k: int(v) for k, v in (ranks or {}).items()}, params=fp.params,
        macs=fp.macs, bytes_fp32=fp.bytes("fp32"), test_accuracy=accuracy,
        input_shape=tuple(fed.data.spec.shape), num_classes=fed.data.spec.num_classes,
    )
    info = asdict(result) | {"load": f"torch.export.load({MODEL_FILE!r}).module()(x), x of shape "
                                     f"(batch, {', '.join(map(str, result.input_shape))}), float32"}
    (target / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return result
