"""The defaults check: each default the protocol's grid does not tune, against its one-change alternative.

    python -m analysis.defaults_table runs/sweeps/defaults_digits runs/sweeps/defaults_mnist1d

Reads the ``results.csv`` of sweeps such as ``benchmarks/sweeps/defaults_*.toml``, where a method
``fedlod_momentum_05`` is ``fedlod`` with one key changed. Per task and variant it prints the score the
protocol selects by (validation accuracy, mean over seeds and tiers), the same for test accuracy, and the
test accuracy per tier, each as the variant minus its reference (the longest other method name that
prefixes it, followed by ``_``). A default keeps its place where no alternative beats it on both tasks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def reference_of(method: str, methods: list[str]) -> str | None:
    """The method that ``method`` changes one key of: the longest ``name`` with ``method.startswith(name + '_')``."""
    prefixes = [m for m in methods if method.startswith(m + "_")]
    return max(prefixes, key=len) if prefixes else None


def defaults_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Per method: validation and test accuracy (mean over seeds and tiers), per-tier test accuracy, and the
    difference of each to its reference's (NaN for a reference itself)."""
    ok = results[results["status"] == "ok"]
    per_tier = ok.groupby(["method", "tier"], sort=False)["accuracy"].mean().unstack("tier")
    scores = ok.groupby("method", sort=False).agg(val=("val_accuracy", "mean"), test=("accuracy", "mean"),
                                                   seeds=("seed", "nunique"))
    frame = scores.join(per_tier.add_prefix("tier_"))
    methods = list(frame.index)
    references = [reference_of(m, methods) for m in methods]
    for column in [c for c in frame.columns if c in ("val", "test") or c.startswith("tier_")]:
        frame[f"d_{column}"] = [frame.at[m, column] - frame.at[r, column] if r else float("nan")
                                for m, r in zip(methods, references)]
    frame["reference"] = [r or "" for r in references]
    return frame


def _pp(value: float, signed: bool = False) -> str:
    """Percentage points, or a dash for a tier the variant did not serve."""
    return "–" if pd.isna(value) else f"{100 * value:{'+' if signed else ''}.1f}"


def defaults_markdown(root: Path) -> str:
    frame = defaults_frame(pd.read_csv(root / "results.csv"))
    tiers = [c for c in frame.columns if c.startswith("tier_")]
    lines = [f"**{root.name}**", "",
             "| method | seeds | validation (Δ) | test (Δ) | test per tier, Δ pp |", "|---|---|---|---|---|"]
    for method, r in frame.iterrows():
        if not r["reference"]:
            lines.append(f"| `{method}` | {r['seeds']} | {_pp(r['val'])} | {_pp(r['test'])} | "
                         + " / ".join(_pp(r[t]) for t in tiers) + " |")
        else:
            lines.append(f"| `{method}` | {r['seeds']} | {_pp(r['val'])} ({_pp(r['d_val'], True)}) | "
                         f"{_pp(r['test'])} ({_pp(r['d_test'], True)}) | "
                         + " / ".join(_pp(r["d_" + t], True) for t in tiers) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m analysis.defaults_table SWEEP_DIR [SWEEP_DIR ...]", file=sys.stderr)
        return 2
    print("\n\n".join(defaults_markdown(Path(a)) for a in argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
