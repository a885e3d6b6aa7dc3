"""Fisher rank allocation: one budget of LoRA ranks spread over the layers by their Fisher energy.

EVA (arXiv 2410.07170) redistributes ranks by how much activation variance each layer's components
explain; here the measure is curvature: the Fisher energy a layer's adapter can capture. Both
functions are pure; `peft_ranks.py` applies the result to a PEFT model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .registry import LayerGeometry


def layer_fisher_energy(weight: torch.Tensor, geometry: LayerGeometry, rank: int) -> float:
    """The Fisher energy a rank-`r` adapter captures in this layer.

    `E = sum_{i <= r} sigma_i^2`, the singular values of `G^1/2 W A^1/2` (damped factors): by
    Eckart-Young in whitened coordinates, the largest value of `||G^1/2 dW A^1/2||_F^2` (twice the
    KL change of the predictions under K-FAC) over rank-`r` parts `dW` of `W`, i.e. the numerator of
    `fisher_svd`'s captured energy. Why this measure: it is in the same unit (KL) for every layer,
    so energies are comparable across layers of different shapes; it needs only `A` and `G`, which
    every statistics-based method has; and it counts only what `r` directions can hold, so a layer
    whose energy is spread thin over many directions does not draw ranks it could not use.

    Args:
        weight: `(d_out, d_in)`.
        geometry: the layer's statistics with their damped roots.
        rank: `r`, the number of leading components counted (the layer's rank before allocation).

    Returns:
        `E >= 0` (float).
    """
    # The top-r singular values of G^1/2 W A^1/2 (LayerGeometry.weight_spectrum, kept by the geometry
    # for fisher_svd's factors at this rank or below).
    return float(geometry.weight_spectrum(weight, rank).values[:rank].square().sum())


def _proportional_quotas(energies: torch.Tensor, caps: torch.Tensor, budget: int) -> torch.Tensor:
    """`q_i = clamp(t e_i, 1, c_i)` with the `t >= 0` for which `sum q_i == budget`.

    `f(t) = sum clamp(t e_i, 1, c_i)` is continuous, piecewise linear and non-decreasing, with kinks
    at `1 / e_i` and `c_i / e_i`; `t` is found exactly on the segment where `f` crosses `budget`.
    """
    count = len(energies)
    if budget == count:
        return torch.ones(count, dtype=torch.float64)
    positive = energies > 0
    kinks = torch.cat([1 / energies[positive], caps[positive] / energies[positive]]).unique()  # sorted

    def total(t: torch.Tensor) -> torch.Tensor:  # f at every t, (k,)
        return torch.minimum(torch.clamp(t[:, None] * energies[None, :], min=1.0), caps[None, :]).sum(dim=1)

    points = torch.cat([torch.zeros(1, dtype=torch.float64), kinks])
    values = total(points)
    upper = int(torch.nonzero(values >= budget)[0])  # f(0) = count < budget, f(last kink) = sum caps >= budget
    t_low, t_high = float(points[upper - 1]), float(points[upper])
    f_low, f_high = float(values[upper - 1]), float(values[upper])
    t = t_low + (budget - f_low) * (t_high - t_low) / (f_high - f_low)
    return torch.minimum(torch.clamp(t * energies, min=1.0), caps)


def allocate_ranks(energies: Sequence[float], caps: Sequence[int], budget: int) -> list[int]:
    """Spread `budget` ranks over layers in proportion to their energies, within bounds.

    Each layer `i` gets `r_i` with `1 <= r_i <= caps[i]` and `sum r_i == budget`: first the real
    quotas `q_i = clamp(t e_i, 1, c_i)` with `sum q_i == budget` (proportional to `e_i` wherever no
    bound binds), then the largest-remainder rounding (Hamilton's method): every layer gets
    `floor(q_i)`, and the ranks left go one each to the largest fractional parts (ties: the larger
    energy, then the earlier layer). So a layer with more energy never gets fewer ranks than one with
    less, unless its own cap stops it: `e_i > e_j` implies `r_i >= min(r_j, c_i)` (equal energies: at
    most one rank apart, unless a cap binds). Layers with zero energy get 1 (more only once every other
    layer is at its cap); when every energy is zero, all layers count as equal.

    Args:
        energies: `e_i >= 0` per layer (e.g. `layer_fisher_energy`).
        caps: the largest rank per layer, `min(d_in, d_out)`, each >= 1.
        budget: the total number of ranks (e.g. `r` times the number of layers).

    Returns:
        `r_i` per layer, in the order given.

    Raises:
        ValueError: lengths differ, no layer, a negative or non-finite energy, a cap below 1, or a
        budget outside `[number of layers, sum of caps]`.
    """
    if len(energies) != len(caps) or not energies:
        raise ValueError(f"allocate_ranks: need one cap per energy and at least one layer, got {len(energies)} "
                         f"energies and {len(caps)} caps")
    for index, energy in enumerate(energies):
        if not math.isfinite(energy) or energy < 0:
            raise ValueError(f"allocate_ranks: layer {index} has energy {energy}; energies must be finite and >= 0")
    if min(caps) < 1:
        raise ValueError(f"allocate_ranks: every cap must be >= 1, got {list(caps)}")
    if not len(caps) <= budget <= sum(caps):
        raise ValueError(f"allocate_ranks: the budget {budget} must be between the number of layers ({len(caps)}) "
                         f"and the sum of their caps ({sum(caps)})")
    zero = [index for index, value in enumerate(energies) if value == 0]
    if len(zero) == len(energies):
        energies = [1.0] * len(energies)
    elif zero and budget > sum(caps) - sum(caps[index] for index in zero) + len(zero):
        # The layers with energy are all at their caps: the rest is shared equally by the others.
        ranks = list(caps)
        shares = allocate_ranks([1.0] * len(zero), [caps[index] for index in zero],
                                budget - sum(ranks) + sum(caps[index] for index in zero))
        for index, share in zip(zero, shares, strict=True):
            ranks[index] = share
        return ranks
    quotas = _proportional_quotas(torch.tensor(energies, dtype=torch.float64),
                                  torch.tensor(caps, dtype=torch.float64), budget)
    ranks = [int(value) for value in torch.floor(quotas).clamp(min=1.0)]
    remainders = [float(quota) - rank for quota, rank in zip(quotas, ranks, strict=True)]
    order = sorted(range(len(ranks)), key=lambda i: (-remainders[i], -energies[i], i))
    left = budget - sum(ranks)
    while left > 0:  # one pass in exact arithmetic; more only to absorb floating-point rounding
        for index in order:
            if left > 0 and ranks[index] < caps[index]:
                ranks[index] += 1
                left -= 1
    return ranks
