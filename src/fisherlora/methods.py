"""Every initialization the project knows: its own registry plus PEFT's baselines, one line each."""

from __future__ import annotations

from .init.registry import INITIALIZERS

# Baselines run through PEFT's own implementations (bench/baselines.py); listed here so that the
# CLI, the docs and the benchmark name every method from one place.
PEFT_BASELINES: dict[str, str] = {
    "lora": "PEFT default: Kaiming-uniform A, zero B (init_lora_weights=True)",
    "gaussian": "PEFT: Gaussian A scaled by 1/r, zero B (init_lora_weights='gaussian')",
    "pissa": "PEFT PiSSA: top-r singular triplets of W, residual subtracted",
    "olora": "PEFT OLoRA: QR decomposition of W, residual subtracted",
    "eva": "PEFT EVA: SVD of layer inputs on the data, zero B (initialize_lora_eva_weights)",
    "corda": "PEFT CorDA: context-oriented SVD with the input covariance (preprocess_corda)",
    "lora_ga": "PEFT LoRA-GA: SVD of the accumulated weight gradient (preprocess_loraga)",
}


def list_methods() -> dict[str, str]:
    """Name -> one-line description of every method, baselines first, then this project's."""
    ours = {name: initializer.description for name, initializer in INITIALIZERS.items()}
    return {**PEFT_BASELINES, **ours}


METHODS: tuple[str, ...] = tuple(list_methods())
