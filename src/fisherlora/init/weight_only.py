"""Weight-only initializers that PEFT does not ship (PiSSA and OLoRA run through PEFT itself)."""

from __future__ import annotations

import torch

from .registry import LayerGeometry, register_initializer


def singular_triplet_factors(
    weight: torch.Tensor, indices: torch.Tensor, scaling: float,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA-style factors from chosen singular triplets of `W`.

    Args:
        weight: `(d_out, d_in)`.
        indices: `(r,)` indices into the singular values (descending order).
        scaling: LoRA scaling `s`.
        svd: `torch.linalg.svd(weight, full_matrices=False)` when the caller has it already.

    Returns:
        `A = sqrt(S_i / s) V_i^T` `(r, d_in)` and `B = U_i sqrt(S_i / s)` `(d_out, r)`.
    """
    left, singular_values, right_transposed = svd or torch.linalg.svd(weight, full_matrices=False)
    half = torch.sqrt(singular_values[indices] / scaling)
    return half[:, None] * right_transposed[indices], left[:, indices] * half


@register_initializer(
    "milora",
    "MiLoRA: the r smallest singular triplets of W (minor components), PiSSA-style factors; no data",
    family="weight",
    statistics=(),
)
def milora(weight: torch.Tensor, geometry: LayerGeometry | None, rank: int, scaling: float,
           options: object) -> tuple[torch.Tensor, torch.Tensor]:
    count = min(weight.shape)
    indices = torch.arange(count - rank, count)
    return singular_triplet_factors(weight, indices, scaling)
