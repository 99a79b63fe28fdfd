"""Training strategies, one package per family; the registry (base.py) imports a built-in strategy's
module the first time its name is asked for.

Layout (arrows point down; a family never imports another family's strategy module):
- base.py: the contract (WorkerStrategy, DriverStrategy, Layout) and the registry; ddp.py: the baseline.
- diloco/, gradient_coding/, robust/, lgreco/, gnn/, replicas/: the families.
- blocks/: what any sync path may call: aggregators ((n, d) rows -> a d vector, with their
  preconditions), attacks on a row, compression_plan (a compression level per named tensor, L-GreCo's
  dynamic program over the comm layer's compressors).
"""

from raylane.strategies.base import BUILTIN, Layout, get, names, register

__all__ = ["BUILTIN", "Layout", "get", "names", "register"]
