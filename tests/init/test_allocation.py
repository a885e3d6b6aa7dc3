"""Fisher rank allocation as pure functions: the budget is exact, bounds hold, more energy never
gets fewer ranks, quotas are proportional where no bound binds, and the energy is the Fisher
energy a rank-r part of W can hold."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fisherlora.init.allocation import allocate_ranks, layer_fisher_energy
from fisherlora.init.registry import LayerGeometry

from .test_initializers import make_stats


def random_case(seed: int) -> tuple[list[float], list[int], int]:
    generator = random.Random(seed)
    count = generator.randint(1, 12)
    caps = [generator.choice([1, 2, 3, 8, 16, 64]) for _ in range(count)]
    # Heavy-tailed energies with exact ties and zeros, as real layers give.
    energies = [generator.choice([0.0, 1.0, generator.lognormvariate(0, 3)]) for _ in range(count)]
    budget = generator.randint(count, sum(caps))
    return energies, caps, budget


@pytest.mark.parametrize("seed", range(300))
def test_allocation_is_exact_bounded_and_monotone(seed: int):
    energies, caps, budget = random_case(seed)
    ranks = allocate_ranks(energies, caps, budget)
    assert sum(ranks) == budget
    assert all(1 <= rank <= cap for rank, cap in zip(ranks, caps, strict=True))
    for i in range(len(ranks)):
        for j in range(len(ranks)):
            if energies[i] > energies[j]:  # more energy, never fewer ranks unless the cap stops it
                assert ranks[i] >= min(ranks[j], caps[i]), (i, j, energies, caps, ranks)
            elif energies[i] == energies[j]:  # equal energy: one rank apart at most (the rounding)
                assert ranks[i] >= min(ranks[j], caps[i]) - 1, (i, j, energies, caps, ranks)


def test_allocation_is_proportional_when_no_bound_binds():
    # Quotas 24 * (1, 2, 3) / 6 = 4, 8, 12: integers, so the ranks are exactly proportional.
    assert allocate_ranks([1.0, 2.0, 3.0], [100, 100, 100], 24) == [4, 8, 12]
    # Quotas 10 * (1, 1, 3) / 5 = 2, 2, 6 scaled: proportional within one rank (largest remainders).
    ranks = allocate_ranks([1.0, 1.5, 2.5], [100, 100, 100], 10)
    for rank, energy in zip(ranks, [1.0, 1.5, 2.5], strict=True):
        assert abs(rank - 10 * energy / 5.0) < 1


def test_capped_layers_give_their_share_to_the_others():
    # Layer 0 would get 18 of 20 but is capped at 4; the rest is split 1:1 between the others.
    assert allocate_ranks([9.0, 0.5, 0.5], [4, 100, 100], 20) == [4, 8, 8]


def test_minimum_of_one_rank_and_zero_energies():
    assert allocate_ranks([0.0, 5.0, 0.0], [8, 8, 8], 6) == [1, 4, 1]
    # Every layer with energy at its cap: the layers without energy share the rest.
    assert allocate_ranks([0.0, 5.0, 0.0], [8, 2, 8], 12) == [5, 2, 5]
    assert allocate_ranks([0.0, 0.0, 0.0], [8, 8, 8], 9) == [3, 3, 3]


def test_uniform_energies_keep_the_uniform_ranks():
    assert allocate_ranks([2.0] * 5, [16] * 5, 40) == [8] * 5


@pytest.mark.parametrize(("energies", "caps", "budget", "message"), [
    ([1.0, 2.0], [4], 4, "one cap per energy"),
    ([], [], 0, "at least one layer"),
    ([1.0, -1.0], [4, 4], 4, "layer 1 has energy -1.0"),
    ([1.0, math.nan], [4, 4], 4, "layer 1 has energy nan"),
    ([1.0, 1.0], [4, 0], 3, "every cap must be >= 1"),
    ([1.0, 1.0], [4, 4], 9, "budget 9 must be between the number of layers \\(2\\) and the sum of their caps \\(8\\)"),
    ([1.0, 1.0], [4, 4], 1, "budget 1"),
])
def test_bad_allocation_input_is_refused(energies: list[float], caps: list[int], budget: int, message: str):
    with pytest.raises(ValueError, match=message):
        allocate_ranks(energies, caps, budget)


def test_layer_energy_is_the_top_r_whitened_spectrum():
    stats = make_stats(9, 7, seed=2, grad_rank=4)
    weight = torch.randn(9, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    geometry = LayerGeometry(stats, 1e-2)
    damped = [factor.double() + 1e-2 * factor.double().diagonal().mean() * torch.eye(factor.shape[0],
                                                                                      dtype=torch.float64)
              for factor in (stats.grad_cov, stats.act_cov)]
    # ||G^1/2 dW A^1/2||_F^2 = tr(G dW A dW^T): the best rank-r dW of W by brute force over the
    # whitened SVD equals the sum of the top-r squared singular values; here the whole spectrum
    # (r = 7) is the trace form itself, computed without any matrix root.
    grad, act = damped
    total = float(torch.trace(grad @ weight @ act @ weight.T))
    assert layer_fisher_energy(weight, geometry, 7) == pytest.approx(total, rel=1e-9)
    energies = [layer_fisher_energy(weight, geometry, rank) for rank in range(1, 8)]
    assert all(later > earlier for earlier, later in zip(energies, energies[1:], strict=False))
    # The rank-2 energy is the Fisher norm of fisher_svd's rank-2 part, the Eckart-Young optimum.
    from fisherlora.config import FisherConfig
    from fisherlora.init import run_initializer

    config = FisherConfig(damping=1e-2, captured_energy=True)
    result = run_initializer("fisher_svd", weight.float(), stats, 2, 1.0, config)
    assert result.captured_energy is not None
    assert result.captured_energy * total == pytest.approx(energies[1], rel=1e-4)
