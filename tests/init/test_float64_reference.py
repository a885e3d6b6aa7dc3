"""Every Fisher initializer against the float64 path it replaced (full eigendecompositions and SVDs).

The initializers now whiten with Cholesky factors, take top-`r` eigen- and singular vectors by
checked subspace iteration, and compute the captured energy without roots. The reference below
is the previous implementation, written out: symmetric roots `F^{+-1/2}` from a full `eigh` of each
damped factor, full SVDs. Stated tolerance: the adapter product `s B A` (and so the residual) agrees
to `PRODUCT_RTOL` relative (Frobenius), the captured energy (a fraction in [0, 1], now summed from
float32 products) to `ENERGY_RTOL` relative or `ENERGY_ATOL` absolute, the damping exactly.
Statistics come from tiny models (a Llama, `conftest.py`, with query/key/value and gate/up
sharing their input factor; a BERT), from random factors with a rank-deficient `G` (one set wide
enough for the block Krylov solver), and from Nystrom sketches.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fisherlora as fl
from fisherlora.init import fisher, geometry, run_initializer
from fisherlora.init.geometry import FactorCache
from fisherlora.init.registry import compute_factors
from fisherlora.stats import top_r
from fisherlora.stats.container import LayerStats
from fisherlora.stats.linalg import FactorRoots, fisher_norm_squared, symmetric_roots
from fisherlora.stats.sketch import LowRankFactor
from fisherlora.stats.top_r import top_eigenpairs, top_singular_triplets
from models import text_batches, tiny_bert

PRODUCT_RTOL = 1e-6
ENERGY_RTOL = 1e-5
ENERGY_ATOL = 1e-9
RANK = 4
SCALING = 2.0

VARIANTS = {
    "fisher_svd": None,
    "fisher_select": None,
    "fisher_eig": fl.FisherEigOptions(scale="projection"),
    "fisher_eig/unit": fl.FisherEigOptions(scale="unit", gamma=0.7),
    "fisher_grad": fl.FisherGradOptions(scale="stable"),
    "fisher_grad/unit": fl.FisherGradOptions(scale="unit"),
    "fisher_grad/spectrum": fl.FisherGradOptions(scale="spectrum", step=0.3),
}


# ------------------------------------------------------------------ the previous float64 path


def signed(vectors: torch.Tensor) -> torch.Tensor:
    """The sign convention of the new eigenvectors (largest-magnitude entry positive); the previous
    path took LAPACK's, an arbitrary one that only the 'unit' rule of fisher_eig exposed."""
    largest = vectors.abs().argmax(dim=0)
    return vectors * torch.sign(vectors.gather(0, largest[None, :]))


def roots(factor: torch.Tensor | LowRankFactor, damping: float) -> FactorRoots:
    return factor.roots(damping) if isinstance(factor, LowRankFactor) else symmetric_roots(factor, damping)


def dense(factor: torch.Tensor | LowRankFactor) -> torch.Tensor:
    return factor.dense(torch.float64) if isinstance(factor, LowRankFactor) else factor.double()


def balanced(left: torch.Tensor, core: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    left_q, left_r = torch.linalg.qr(left)
    right_q, right_r = torch.linalg.qr(right)
    core_u, core_s, core_vh = torch.linalg.svd(left_r @ torch.diag(core) @ right_r.T)
    return left_q @ core_u, core_s, core_vh @ right_q.T  # B0, sigma, A0


def reference(variant: str, weight: torch.Tensor, stats: LayerStats, damping: float,
              rank: int) -> tuple[torch.Tensor, float]:
    """`(s B A, captured energy)` of the previous implementation."""
    method = variant.split("/")[0]
    options = VARIANTS[variant]
    matrix = weight.double()
    grad, act = roots(stats.grad_cov, damping), roots(stats.act_cov, damping)
    if method == "fisher_svd":
        u, s, vh = torch.linalg.svd(grad.root @ matrix @ act.root, full_matrices=False)
        product = grad.inverse_root @ u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] @ act.inverse_root
    elif method == "fisher_select":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        damped_grad = dense(stats.grad_cov) + grad.damping_added * torch.eye(matrix.shape[0], dtype=torch.float64)
        damped_act = dense(stats.act_cov) + act.damping_added * torch.eye(matrix.shape[1], dtype=torch.float64)
        scores = s.square() * ((damped_grad @ u) * u).sum(0) * ((vh @ damped_act) * vh).sum(1)
        chosen = torch.argsort(scores, descending=True)[:rank]
        product = u[:, chosen] @ torch.diag(s[chosen]) @ vh[chosen]
    elif method == "fisher_eig":
        _, output_vectors = torch.linalg.eigh(dense(stats.grad_cov))
        _, input_vectors = torch.linalg.eigh(dense(stats.act_cov))
        output = signed(output_vectors.flip(1)[:, :rank])
        inputs = signed(input_vectors.flip(1)[:, :rank])
        if options.scale == "unit":
            product = SCALING * options.gamma**2 * output @ inputs.T
        else:
            product = output @ output.T @ matrix @ inputs @ inputs.T
    else:
        whitened = grad.inverse_root @ stats.grad_mean.double() @ act.inverse_root
        u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
        left, right = grad.inverse_root @ u[:, :rank], act.inverse_root @ vh[:rank].T
        if options.scale == "spectrum":
            product = options.step * left @ torch.diag(s[:rank]) @ right.T
        else:
            directions_b, _, directions_a = balanced(left, s[:rank], right)
            factor = 1.0 if options.scale == "unit" else matrix.shape[0] ** 0.25 / options.gamma**0.5
            product = SCALING * factor**2 * directions_b @ directions_a
    total = fisher_norm_squared(matrix, grad.root, act.root)
    return product, fisher_norm_squared(product, grad.root, act.root) / total


# ------------------------------------------------------------------ statistics of tiny models


@pytest.fixture(scope="module")
def bert_stats() -> tuple[torch.nn.Module, fl.FisherStats]:
    model = tiny_bert()
    config = fl.FisherConfig(progress=False, collect_grad_mean=True, num_batches=None)
    targets = ["query", "key", "value", "dense", "classifier"]
    return model, fl.collect_fisher(model, text_batches(count=3), config, target_modules=targets)


def sketched(stats: LayerStats, rank: int) -> LayerStats:
    """The same layer with both factors as rank-`rank` eigen-sketches plus an isotropic tail."""
    def sketch(factor: torch.Tensor) -> LowRankFactor:
        values, vectors = torch.linalg.eigh(factor.double())
        return LowRankFactor(vectors[:, -rank:].flip(1).float().contiguous(), values[-rank:].flip(0).float(),
                             float(factor.double().trace()))

    return LayerStats(sketch(stats.act_cov), sketch(stats.grad_cov), stats.grad_mean, stats.num_tokens,
                      stats.num_examples, stats.layer_type, stats.weight_shape, stats.fingerprint)


def assert_matches_reference(variant: str, weight: torch.Tensor, stats: LayerStats, damping: float = 1e-3,
                             cache: FactorCache | None = None) -> None:
    method = variant.split("/")[0]
    rank = min(RANK, *weight.shape)
    config = fl.FisherConfig(method=method, damping=damping, options=VARIANTS[variant], captured_energy=True)
    factors = compute_factors(method, weight, stats, rank, SCALING, config, cache=cache)
    product = SCALING * factors.lora_b.double() @ factors.lora_a.double()
    expected, energy = reference(variant, weight, stats, damping, rank)
    error = float((product - expected).norm() / expected.norm())
    assert error <= PRODUCT_RTOL, f"{variant}: relative error of s B A {error:.2e}"
    residual = factors.residual(weight)
    torch.testing.assert_close(residual.double(), weight.double() - expected, rtol=0,
                               atol=PRODUCT_RTOL * float(expected.abs().max()) + 1e-6 * float(weight.abs().max()))
    assert factors.captured_energy == pytest.approx(energy, rel=ENERGY_RTOL, abs=ENERGY_ATOL), variant
    reference_grad, reference_act = roots(stats.grad_cov, damping), roots(stats.act_cov, damping)
    assert factors.damping_added == pytest.approx((reference_act.damping_added, reference_grad.damping_added),
                                                  rel=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_layers_match_the_float64_path(variant: str, llama_stats, monkeypatch: pytest.MonkeyPatch):
    model, stats = llama_stats
    factorized, damped = [], []
    cholesky, damp = geometry.cholesky_whitening, geometry.damp
    monkeypatch.setattr(geometry, "cholesky_whitening", lambda *args, **kwargs: factorized.append(args[0]) or
                        cholesky(*args, **kwargs))
    monkeypatch.setattr(geometry, "damp", lambda *args: damped.append(id(args[0])) or damp(*args))
    if variant.startswith("fisher_grad"):  # the Fisher norm of W from the roots at hand, not from <G W, W A>
        monkeypatch.setattr(geometry, "fisher_norm_squared_damped", None)
    cache = FactorCache(stats.values())  # shared by the layers, as write_adapters shares it
    for name in stats:
        assert_matches_reference(variant, model.get_submodule(name).weight.detach(), stats[name], cache=cache)
        cache.done(stats[name])
    assert cache.entries == {}, "every entry is dropped after its factor's last layer"
    assert len(damped) == len(set(damped)), "each factor is converted and damped once (Cholesky and norms share it)"
    if variant.startswith("fisher_grad"):  # one Cholesky for the input of q/k/v, one for gate/up
        distinct_inputs = {id(stats[name].act_cov) for name in stats}
        assert len(distinct_inputs) == 4 and len(factorized) == len(distinct_inputs) + len(stats)
    if variant.startswith("fisher_svd"):  # only the narrower side's factor, once per distinct factor
        narrow = {id(layer.act_cov if layer.weight_shape[0] >= layer.weight_shape[1] else layer.grad_cov)
                  for layer in stats.values()}
        assert len(narrow) == 6 and len(factorized) == len(narrow)


def test_fisher_eig_reads_each_factor_as_one_float64_copy(llama_stats, monkeypatch: pytest.MonkeyPatch):
    # The top eigenvectors come from the damped float64 copy the captured energy reads anyway (the
    # same vectors): the solver gets float64 (no conversion of its own), once per distinct factor.
    model, stats = llama_stats
    seen: list[torch.Tensor] = []
    solver = geometry.top_eigenpairs
    monkeypatch.setattr(geometry, "top_eigenpairs", lambda factor, count: seen.append(factor) or solver(factor, count))
    cache = FactorCache(stats.values())
    config = fl.FisherConfig(method="fisher_eig", captured_energy=True)
    for name in stats:
        compute_factors("fisher_eig", model.get_submodule(name).weight.detach(), stats[name], RANK, SCALING, config,
                        cache=cache)
        cache.done(stats[name])
    distinct = {id(factor) for layer in stats.values() for factor in (layer.act_cov, layer.grad_cov)}
    assert all(factor.dtype == torch.float64 for factor in seen)
    assert len(seen) == len({id(factor) for factor in seen}) == len(distinct)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bert_layers_match_the_float64_path(variant: str, bert_stats):
    model, stats = bert_stats
    for name in stats:
        assert_matches_reference(variant, model.get_submodule(name).weight.detach(), stats[name])


@pytest.mark.parametrize(("variant", "seed"), itertools.product(VARIANTS, range(3)))
def test_random_statistics_with_a_rank_deficient_g_match(variant: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    d_out, d_in = (72, 56) if seed < 2 else (420, 300)  # the last: wide enough for the Krylov solver
    grad_half = torch.randn(d_out, 5, generator=generator, dtype=torch.float64)  # rank 5, like a small head
    act_half = torch.randn(d_in, 200, generator=generator, dtype=torch.float64) * torch.linspace(2, 0.01, 200,
                                                                                               dtype=torch.float64)
    stats = LayerStats((act_half @ act_half.T / 200).float(), (grad_half @ grad_half.T).float(),
                       torch.randn(d_out, d_in, generator=generator), 10, 10, "linear", (d_out, d_in))
    weight = torch.randn(d_out, d_in, generator=generator)
    assert_matches_reference(variant, weight, stats)
    assert_matches_reference(variant, weight, stats, damping=1e-1)


@pytest.mark.parametrize(("method", "shape"), itertools.product(["fisher_svd", "fisher_select"], [(80, 50), (50, 80)]))
def test_a_weight_of_lower_rank_than_the_adapter_matches(method: str, shape: tuple[int, int],
                                                         monkeypatch: pytest.MonkeyPatch):
    # Rank 2 < RANK: the Gram matrices' trailing eigenvalues are rounding noise, and vectors like
    # `W R V_k / S_k` would divide noise by noise; the triplets come from a full SVD instead (of the
    # whitened weight for fisher_svd, of W for fisher_select), and the product matches.
    generator = torch.Generator().manual_seed(sum(shape))
    d_out, d_in = shape
    weight = torch.randn(d_out, 2, generator=generator) @ torch.randn(2, d_in, generator=generator)
    act_half, grad_half = torch.randn(d_in, 90, generator=generator), torch.randn(d_out, 90, generator=generator)
    stats = LayerStats(act_half @ act_half.T / 90, grad_half @ grad_half.T / 90, None, 10, 10, "linear", shape)
    full_svds = []
    module, name = (geometry, "top_singular_triplets") if method == "fisher_svd" else (fisher, "_select_from_svd")
    solver = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: full_svds.append(args[1:]) or solver(*args))
    assert_matches_reference(method, weight, stats)
    assert len(full_svds) == 1


@pytest.mark.parametrize("shape", [(80, 50), (50, 80)])
def test_a_gradient_of_lower_rank_than_the_adapter_matches(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch):
    # Rank 2 < RANK: the whitened gradient's trailing singular values are rounding noise, so its
    # triplets come from a full SVD of it (formed only then); the spectrum-weighted product matches
    # (the unweighted rules' directions of noise singular values are arbitrary in either path).
    generator = torch.Generator().manual_seed(sum(shape) + 1)
    d_out, d_in = shape
    gradient = torch.randn(d_out, 2, generator=generator) @ torch.randn(2, d_in, generator=generator)
    act_half, grad_half = torch.randn(d_in, 90, generator=generator), torch.randn(d_out, 90, generator=generator)
    stats = LayerStats(act_half @ act_half.T / 90, grad_half @ grad_half.T / 90, gradient, 10, 10, "linear", shape)
    full_svds = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda matrix, **kwargs: full_svds.append(tuple(matrix.shape)) or
                        svd(matrix, **kwargs))
    assert_matches_reference("fisher_grad/spectrum", torch.randn(d_out, d_in, generator=generator), stats)
    assert full_svds.count(shape) == 2  # ours and the reference's


@pytest.mark.parametrize("variant", VARIANTS)
def test_sketched_statistics_match(variant: str, llama_stats):
    model, stats = llama_stats
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        assert_matches_reference(variant, model.get_submodule(name).weight.detach(), sketched(stats[name], 20))


def test_run_initializer_is_compute_factors_and_the_residual(llama_stats):
    model, stats = llama_stats
    name = "model.layers.0.mlp.gate_proj"
    weight = model.get_submodule(name).weight.detach()
    config = fl.FisherConfig(method="fisher_svd", captured_energy=True)
    result = run_initializer("fisher_svd", weight, stats[name], RANK, SCALING, config)
    factors = compute_factors("fisher_svd", weight, stats[name], RANK, SCALING, config)
    assert torch.equal(result.lora_a, factors.lora_a) and torch.equal(result.lora_b, factors.lora_b)
    assert torch.equal(result.residual, factors.residual(weight))


@pytest.mark.parametrize("dim", [30, 500, top_r.KRYLOV_MIN_DIM + 64])  # LAPACK's subset solver; the block Krylov method
def test_top_eigenpairs_match_a_full_decomposition(dim: int):
    generator = torch.Generator().manual_seed(dim)
    half = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, dim,
                                                                                           dtype=torch.float64)
    factor = half @ half.T
    values, vectors = top_eigenpairs(factor, 6)
    full_values, full_vectors = torch.linalg.eigh(factor)
    torch.testing.assert_close(values, full_values.flip(0)[:6], rtol=1e-10, atol=0)
    torch.testing.assert_close(vectors, signed(full_vectors.flip(1)[:, :6]), rtol=0, atol=1e-8)


def krylov_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block Krylov method at every width, and a fall-back to the dense solve fails the test."""
    def refuse(matrix: torch.Tensor, count: int):
        raise AssertionError(f"fell back to the dense solve ({tuple(matrix.shape)}, {count} pairs)")
    monkeypatch.setattr(top_r, "KRYLOV_MIN_DIM", 0)
    monkeypatch.setattr(top_r, "_full", refuse)


@pytest.mark.parametrize("decay", [1e-1, 1e-3])
def test_top_eigenpairs_iterate_at_384_wide_and_match_a_full_decomposition(decay: float,
                                                                          monkeypatch: pytest.MonkeyPatch):
    # The width of MiniLM's factors and Gram matrices with r = 8 (where a CPU takes the dense solve
    # instead, `KRYLOV_MIN_DIM`; forced here): the block Krylov method converges.
    generator = torch.Generator().manual_seed(384)
    half = torch.randn(384, 384, generator=generator, dtype=torch.float64) * torch.logspace(0, math.log10(decay), 384,
                                                                                           dtype=torch.float64)
    factor = half @ half.T
    assert top_r.krylov_steps(384, 8 + 4) >= 6
    full_values, full_vectors = torch.linalg.eigh(factor)
    krylov_only(monkeypatch)
    values, vectors = top_eigenpairs(factor, 8)
    torch.testing.assert_close(values, full_values.flip(0)[:8], rtol=1e-10, atol=0)
    torch.testing.assert_close(vectors, signed(full_vectors.flip(1)[:, :8]), rtol=0, atol=1e-8)


def test_top_eigenpairs_of_a_rank_deficient_matrix_iterate(monkeypatch: pytest.MonkeyPatch):
    # Rank 5 < the block: the Krylov space is exhausted after one step, and the next blocks must still
    # be orthogonal to the basis (else Rayleigh-Ritz sees a non-orthonormal basis and never converges).
    generator = torch.Generator().manual_seed(5)
    half = torch.randn(400, 5, generator=generator, dtype=torch.float64)
    factor = half @ half.T
    krylov_only(monkeypatch)
    values, vectors = top_eigenpairs(factor, 4)
    full_values, full_vectors = torch.linalg.eigh(factor)
    torch.testing.assert_close(values, full_values.flip(0)[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(vectors, signed(full_vectors.flip(1)[:, :4]), rtol=0, atol=1e-8)


def test_top_eigenpairs_give_up_after_one_round_when_the_top_is_flat(monkeypatch: pytest.MonkeyPatch):
    # Like a whitened gradient of few examples: the top 100 eigenvalues within 1% of each other, no
    # gap at the cut. The first round's residual is far off course, so the full eigh follows at once.
    generator = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(384, 384, generator=generator, dtype=torch.float64))[0]
    spectrum = torch.cat([1 - 1e-2 * torch.rand(100, generator=generator, dtype=torch.float64),
                          torch.logspace(-1, -3, 284, dtype=torch.float64)])
    factor = basis * spectrum @ basis.T
    rounds = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(top_r, "KRYLOV_MIN_DIM", 0)
    monkeypatch.setattr(torch.linalg, "eigh", lambda matrix: rounds.append(matrix.shape[0]) or eigh(matrix))
    dense = top_r.subset_eigenpairs
    monkeypatch.setattr(top_r, "subset_eigenpairs",
                        lambda matrix, first, last: rounds.append(("dense", first, last)) or dense(matrix, first, last))
    values, vectors = top_eigenpairs(factor, 8)
    # One round's Rayleigh-Ritz checks (after the steps `_checked` names), then the dense solve.
    steps = top_r.krylov_steps(384, 12)
    one_round = [12 * (step + 1) for step in range(steps + 1) if top_r._checked(step, steps)]
    assert rounds == [*one_round, ("dense", 376, 383)]
    full_values, full_vectors = eigh(factor)
    torch.testing.assert_close(values, full_values.flip(0)[:8], rtol=1e-12, atol=0)


def test_top_eigenpairs_fall_back_when_the_krylov_solver_does_not_converge(monkeypatch: pytest.MonkeyPatch):
    # Two equal leading eigenvalues with a third close below: too few steps to separate them.
    monkeypatch.setattr(top_r, "KRYLOV_MIN_DIM", 0)
    monkeypatch.setattr(top_r, "krylov_steps", lambda dim, block: 1)
    monkeypatch.setattr(top_r, "_ROUNDS", 1)
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(120, 120, generator=generator, dtype=torch.float64))[0]
    spectrum = torch.linspace(1.0, 0.9, 120, dtype=torch.float64)
    factor = basis * spectrum @ basis.T
    values, vectors = top_eigenpairs(factor, 3)
    full_values, full_vectors = torch.linalg.eigh(factor)
    torch.testing.assert_close(values, full_values.flip(0)[:3], rtol=1e-12, atol=0)
    torch.testing.assert_close(vectors, signed(full_vectors.flip(1)[:, :3]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(90, 40), (40, 90)])
def test_top_singular_triplets_match_a_full_svd(shape: tuple[int, int]):
    generator = torch.Generator().manual_seed(1)
    matrix = torch.randn(*shape, generator=generator, dtype=torch.float64)
    left, values, right = top_singular_triplets(matrix, 5)
    full_left, full_values, full_right = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(values, full_values[:5], rtol=1e-10, atol=0)
    torch.testing.assert_close(left * values @ right.T, full_left[:, :5] * full_values[:5] @ full_right[:5],
                               rtol=0, atol=1e-9)
    zero_left, zero_values, _ = top_singular_triplets(torch.zeros(*shape, dtype=torch.float64), 3)
    assert torch.equal(zero_values, torch.zeros(3)) and torch.isfinite(zero_left).all()


def test_an_undamped_singular_factor_falls_back_to_the_eigenvalue_floor():
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    stats = LayerStats(torch.diag(torch.tensor([1.0, 2.0, 0.0, 3.0, 0.5])), torch.eye(6), None, 1, 1, "linear", (6, 5))
    assert_matches_reference("fisher_svd", weight, stats, damping=0.0)


@pytest.mark.parametrize("method", sorted(name for name, entry in fl.init.registry.INITIALIZERS.items()
                                          if entry.statistics_with(entry.resolve_options(None))))
def test_without_captured_energy_no_fisher_norm_is_formed_and_the_factors_are_the_same(
        method: str, llama_stats, monkeypatch: pytest.MonkeyPatch):
    # The diagnostic is off by default: it must cost nothing and change nothing.
    model, stats = llama_stats
    names = ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.k_proj")
    weights = {name: model.get_submodule(name).weight.detach() for name in names}
    asked = {name: compute_factors(method, weights[name], stats[name], RANK, SCALING,
                                   fl.FisherConfig(method=method, captured_energy=True)) for name in names}

    def refuse(*arguments):
        raise AssertionError("a Fisher norm was computed without captured_energy")
    monkeypatch.setattr(geometry.LayerGeometry, "fisher_norm_squared", refuse)
    monkeypatch.setattr(fl.init.registry, "low_rank_fisher_norm_squared", refuse)
    assert not fl.FisherConfig().captured_energy
    for name in names:
        factors = compute_factors(method, weights[name], stats[name], RANK, SCALING, fl.FisherConfig(method=method))
        assert factors.captured_energy is None and factors.damping_added == asked[name].damping_added
        assert asked[name].captured_energy is not None
        assert torch.equal(factors.lora_a, asked[name].lora_a) and torch.equal(factors.lora_b, asked[name].lora_b)
