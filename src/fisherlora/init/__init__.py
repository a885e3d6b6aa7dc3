"""Initializers: one registry of pure functions `(W, statistics, r, s, config) -> (A, B, W_res)`."""

from . import fisher, weight_only  # noqa: F401  (registers the initializers)
from .registry import INITIALIZERS, InitResult, LayerGeometry, register_initializer, run_initializer

__all__ = ["INITIALIZERS", "InitResult", "LayerGeometry", "register_initializer", "run_initializer"]
