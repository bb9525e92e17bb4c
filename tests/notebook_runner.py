"""Run a notebook's code cells in this process, as a kernel with matplotlib's inline backend would.

Each code cell runs in one namespace, in order; the figures open when a cell
ends are what the inline backend would display (then close), so their count is
the notebook's number of drawn images. No kernel starts (one costs a fresh
Python with torch and matplotlib imported, seconds per notebook) and nothing
waits on a wall-clock timeout, so a loaded machine changes only how long it
takes. A cell with IPython syntax (a magic, a shell escape) fails here: the
shipped notebooks are plain Python.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def run_in_process(nb: Any, cwd: Path) -> int:
    """Execute ``nb``'s code cells (an ``nbformat`` notebook) with ``cwd`` as the working directory; the figure count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    namespace: dict[str, Any] = {"__name__": "__main__"}
    images = 0
    before = Path.cwd()
    os.chdir(cwd)
    try:
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            exec(compile(cell.source, f"<cell {index}>", "exec"), namespace)  # noqa: S102 - the notebook's own code
            images += len(plt.get_fignums())
            plt.close("all")
    finally:
        os.chdir(before)
    return images
