"""What sets the floor of FedLoD's smallest sub-model, and which design serves every tier a width method serves.

No training: for each task and candidate, the default device tiers are put
through the budget (the same :meth:`~maestro_fl.methods.base.FederatedMethod.budget`
a run uses) with the task's examples per client, and for each tier it
records the sub-model chosen (fraction, parameters, MACs, activations) or,
when none fits, what the smallest sub-model needs against what the device has.

Candidates (FedLoD's settings):

* ``rank_only``: ``keep_first=1 keep_classifier=true width_floor=false`` (the default before this design);
* ``factorize_all``: ``keep_first=0 keep_classifier=false width_floor=false``;
* ``width_floor``: the default: below the smallest rank prefix, the same prefix of a narrower model.

The tasks need no data, only input shapes and examples per client:

* ``digits``: the main job (8×8 images, the small CNN, 1,437 training images over 50 clients);
* ``digits_tight``: the same with ``compute_budget_s=2``: the tutorial's starved population;
* ``mnist1d``: MNIST-1D's 1-D CNN (4,000 training signals over 50 clients);
* ``lenet5_28``: LeNet-5 on 28×28 single-channel images with an MNIST-sized training set (54,000
  after validation) over 50 clients: the kind of held-out task where the floor was found.

    python benchmarks/width_floor.py        # JSON in benchmarks/results/width_floor.json, a table on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maestro_fl.config import SimConfig, resolve  # noqa: E402
from maestro_fl.federated import make_method  # noqa: E402
from maestro_fl.models import InputSpec  # noqa: E402
from maestro_fl.population import builtin_tiers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "width_floor.json"
#: task -> (config values, input spec, training examples per client)
TASKS: dict[str, tuple[dict[str, Any], InputSpec, int]] = {
    "digits": ({}, InputSpec.image(1, 8, 10), 26),
    "digits_tight": ({"compute_budget_s": 2.0}, InputSpec.image(1, 8, 10), 26),
    "mnist1d": ({"model": "cnn1d"}, InputSpec((1, 40), 10), 72),
    "lenet5_28": ({"model": "lenet5", "norm": "none"}, InputSpec.image(1, 28, 10), 1080),
}
CANDIDATES = {
    "rank_only": {"strategy": "fedlod", "keep_first": 1, "keep_classifier": True, "width_floor": False},
    "factorize_all": {"strategy": "fedlod", "keep_first": 0, "keep_classifier": False, "width_floor": False},
    "width_floor": {"strategy": "fedlod"},
    "fjord": {"strategy": "fjord"},
    "heterofl": {"strategy": "heterofl"},
}


def tiers(task: str, candidate: str) -> list[dict[str, Any]]:
    values, spec, samples = TASKS[task]
    cfg: SimConfig = resolve(SimConfig, overrides=values | CANDIDATES[candidate])
    method = make_method(cfg, spec)
    table = method.cost_table()
    dense = method.family.reference
    rows = []
    for device in builtin_tiers(cfg.tier_shares, cfg.tier_fractions):
        check = method.explain_budget(table, device, samples)
        chosen = check.chosen
        row: dict[str, Any] = {"task": task, "candidate": candidate, "tier": device.tier,
                               "binding": check.binding}
        if chosen is None:
            row |= {"served": False, "need_memory_mb": check.need_memory / 1e6, "have_memory_mb": device.memory_bytes / 1e6,
                    "need_seconds": check.need_seconds, "have_seconds": check.have_seconds}
        else:
            row |= {"served": True, "fraction": chosen.fraction, "params": chosen.params,
                    "params_ratio": chosen.params / dense.dense_params, "macs": chosen.macs,
                    "activations": chosen.activations}
        rows.append(row)
    return rows


def main() -> None:
    rows = [r for task in TASKS for cand in CANDIDATES for r in tiers(task, cand)]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "width_floor", "rows": rows}, indent=1) + "\n")
    for task in TASKS:
        print(f"\n{task}: tiers served (params of the sub-model, or what binds)")
        for cand in CANDIDATES:
            cells = []
            for r in (r for r in rows if r["task"] == task and r["candidate"] == cand):
                cells.append(f"{r['params']:>7,}" if r["served"] else f"{'-' + r['binding']:>7}")
            print(f"  {cand:<14}" + "  ".join(cells))
    print(f"\n{RESULTS}")


if __name__ == "__main__":
    main()
