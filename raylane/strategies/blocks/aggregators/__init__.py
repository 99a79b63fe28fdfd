"""Robust aggregators: importing this package registers every rule (see base.py for the contract)."""

from raylane.strategies.blocks.aggregators import caf, clipping, flag, geomed, krum, monna, simple, subsets  # noqa: F401
from raylane.strategies.blocks.aggregators.base import Aggregator, Result, build, gram, registry
from raylane.strategies.blocks.aggregators.nnm import NNM, mixing_matrix

__all__ = ["Aggregator", "NNM", "Result", "build", "gram", "mixing_matrix", "registry"]
