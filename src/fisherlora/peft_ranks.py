"""Fisher rank allocation applied to a PEFT model: choose each layer's rank, re-create its adapter at
that rank, and record it in the adapter's config so the saved adapter loads with plain PEFT.

The scaling rule: every layer keeps the scaling `s` it had (`alpha / r`, or `alpha / sqrt(r)` with
rsLoRA, at the rank the model was created with), so its alpha becomes `s * r_layer` (`s * sqrt(r_layer)`)
and goes into PEFT's `alpha_pattern` next to the rank in `rank_pattern`. This is PEFT's own choice for
EVA's rank redistribution (`EvaConfig.adjust_scaling_factors=True`): each direction of every adapter
learns at the rate the learning rate was tuned for, and the allocation changes only how many
directions a layer gets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .config import FisherConfig
from .init.allocation import allocate_ranks, layer_fisher_energy
from .init.geometry import FactorCache, LayerGeometry, WeightSpectrum
from .stats.container import FisherStats
from .stats.layers import TargetLayer, weight_matrix


def fisher_ranks(targets: Sequence[TargetLayer], stats: FisherStats, config: FisherConfig,
                 adapter_name: str = "default") -> tuple[dict[str, int], dict[str, WeightSpectrum]]:
    """Each targeted layer's rank under Fisher rank allocation.

    The budget is the sum of the layers' current ranks (`r` times the number of layers for a model
    created with one rank), spread by `allocate_ranks` in proportion to `layer_fisher_energy` at the
    layer's current rank, each layer between 1 and `min(d_in, d_out)`. A factor shared by layers is
    factorized once (`FactorCache`).

    Returns:
        base-model layer name -> rank, and -> the `WeightSpectrum` its energy came from (its top
        triplets at the current rank: `fisher_svd`'s factors at that rank or below, not computed again).
    """
    energies, caps, budget = [], [], 0
    spectra = {}
    cache = FactorCache([stats.layers[target.name] for target in targets])
    for target in targets:
        layer: Any = target.hook_module
        rank = int(layer.r[adapter_name])
        weight = weight_matrix(target.weight_module, target.layer_type)
        layer_stats = stats.layers[target.name]
        geometry = LayerGeometry(layer_stats, config.damping, device=weight.device, cache=cache)
        energies.append(layer_fisher_energy(weight.detach().double(), geometry, min(rank, min(weight.shape))))
        cache.done(layer_stats)
        assert geometry.spectrum is not None
        spectra[target.name] = geometry.spectrum
        caps.append(int(min(weight.shape)))
        budget += rank
    ranks = allocate_ranks(energies, caps, min(budget, sum(caps)))
    return {target.name: rank for target, rank in zip(targets, ranks, strict=True)}, spectra


def alpha_for(rank: int, scaling: float, use_rslora: bool) -> float:
    """The `lora_alpha` that gives scaling `s` at `rank`: `s * r`, or `s * sqrt(r)` with rsLoRA."""
    return scaling * (math.sqrt(rank) if use_rslora else rank)


def resize_adapter(layer: Any, adapter_name: str, rank: int, peft_config: Any) -> None:
    """Re-create `adapter_name`'s `lora_A`/`lora_B` of one LoRA layer at `rank`, keeping its scaling,
    dtype and device (PEFT's `update_layer`, as EVA does). The new factors are PEFT's default
    initialization (`B = 0`) until the caller writes its own; the global random number generator is
    left as it was, so training draws the same random numbers with or without the allocation.
    """
    scaling = float(layer.scaling[adapter_name])
    old = layer.lora_A[adapter_name].weight
    with torch.random.fork_rng(devices=[]):
        layer.update_layer(adapter_name=adapter_name, r=rank,
                           lora_alpha=alpha_for(rank, scaling, bool(peft_config.use_rslora)), config=peft_config)
    for factors in (layer.lora_A, layer.lora_B):
        factors[adapter_name] = factors[adapter_name].to(device=old.device, dtype=old.dtype)


def record_ranks(peft_config: Any, layers: dict[str, tuple[int, float]]) -> None:
    """Write every layer's rank and alpha into the adapter config's `rank_pattern`/`alpha_pattern`.

    Both patterns are rebuilt from the layers' full names (PEFT matches a pattern key as a suffix of the
    module name and takes the first key that matches, so an earlier, shorter key of the user's would
    shadow them); a layer equal to the config's `r`/`lora_alpha` needs no entry.

    Args:
        layers: base-model layer name -> `(rank, alpha)`, for every layer of the adapter.
    """
    peft_config.rank_pattern = {name: rank for name, (rank, _) in layers.items() if rank != peft_config.r}
    peft_config.alpha_pattern = {name: alpha for name, (_, alpha) in layers.items()
                                 if alpha != peft_config.lora_alpha}
