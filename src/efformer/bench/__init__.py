"""Speed, memory and scaling of every mixer on this device: sweeps, analysis, advice."""

from efformer.bench.cells import Cell, run_cell

__all__ = ["Cell", "run_cell"]
