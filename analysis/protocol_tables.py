"""The README's comparison tables from a protocol directory (``maestro-fl sweep`` with a ``[protocol]`` table).

    python -m analysis.protocol_tables runs/protocol/digits     # markdown on stdout

Three tables: per method and tier, test accuracy (mean ± std over seeds),
parameters, MACs and bytes per round (``comparison.csv``); the selected
local-training values with their validation score (``selected.csv``); and
FedLoD's standing at equal or smaller footprint against each other method's
tiers (``matched.csv``), from which the README's statements are read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def _k(value: float) -> str:
    return f"{value / 1e3:.1f}k" if value < 1e6 else f"{value / 1e6:.2f}M"


def comparison_markdown(root: Path) -> str:
    table = pd.read_csv(root / "comparison.csv")
    tiers = sorted(table["tier"].unique())
    lines = ["| method | " + " | ".join(f"tier {t}" for t in tiers) + " |",
             "|---|" + "---|" * len(tiers)]
    for method, rows in table.groupby("method", sort=False):
        cells = []
        for t in tiers:
            row = rows[rows["tier"] == t]
            if row.empty:
                cells.append("–")
                continue
            r = row.iloc[0]
            std = 0.0 if pd.isna(r["acc_std"]) else r["acc_std"]
            served = "" if r["unaffordable"] == 0 else f" ({int(r['unaffordable'])} unaffordable)"
            cells.append(f"**{100 * r['acc_mean']:.1f} ± {100 * std:.1f}**{served}<br>{_k(r['params'])} p, "
                         f"{_k(r['macs'])} MACs, {_k(r['bytes_per_round'])}B")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selected_markdown(root: Path) -> str:
    selected = pd.read_csv(root / "selected.csv")
    tuned = [c for c in selected.columns if c not in ("method", "run", "val_score")]
    lines = ["| method | " + " | ".join(tuned) + " | validation accuracy |", "|---|" + "---|" * (len(tuned) + 1)]
    for _, r in selected.iterrows():
        lines.append(f"| `{r['method']}` | " + " | ".join(f"{r[k]:g}" for k in tuned) + f" | {100 * r['val_score']:.1f} |")
    return "\n".join(lines)


def matched_markdown(root: Path) -> str:
    path = root / "matched.csv"
    if not path.exists():
        return "(no matched.csv: the protocol ran without FedLoD or without other methods)"
    matched = pd.read_csv(path)
    lines = ["| against | per tier: FedLoD − theirs (pp), at their footprint or smaller |", "|---|---|"]
    for method, rows in matched.groupby("method", sort=False):
        cells = ", ".join(f"t{int(r['tier'])} {100 * r['difference']:+.1f}" for _, r in rows.iterrows())
        lines.append(f"| `{method}` | {cells} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m analysis.protocol_tables PROTOCOL_DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    print(comparison_markdown(root), selected_markdown(root), matched_markdown(root), sep="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
