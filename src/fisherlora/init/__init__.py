"""Initializers: pure functions `(W, statistics, r, s, options) -> (A, B)` in one method catalogue.

Every module of this package is imported here, so a new initializer is one decorated function in
one file (see docs/architecture.md, "Recipe: add an initialization method").
"""

import importlib
import pkgutil

from .registry import INITIALIZERS, InitResult, LayerGeometry, register_initializer, run_initializer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["INITIALIZERS", "InitResult", "LayerGeometry", "register_initializer", "run_initializer"]
