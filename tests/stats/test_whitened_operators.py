"""The matrix-free operators of `stats/linalg.py` and `stats/top_r.py`: `R^T F R` and `R^-1 F R^-T`
applied as products equal the formed matrices (Cholesky and symmetric roots alike), and
`top_eigenpairs` of an operator forms the matrix only for the full decomposition it falls back to."""

from __future__ import annotations

import pytest
import torch

from fisherlora.stats import top_r
from fisherlora.stats.linalg import Whitening, cholesky_whitening, inverse_whitened_triplets, symmetric_roots
from fisherlora.stats.top_r import SymmetricOperator, top_eigenpairs


def random_factor(dim: int, seed: int, decay: float = 1e-3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    half = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * torch.logspace(
        0, torch.log10(torch.tensor(decay)).item(), dim, dtype=torch.float64)
    return half @ half.T


def whitenings(factor: torch.Tensor) -> list[Whitening]:
    roots = symmetric_roots(factor, 1e-3)
    return [cholesky_whitening(factor, 1e-3), Whitening(lower=None, roots=roots, damping_added=roots.damping_added)]


@pytest.mark.parametrize("kind", [0, 1])  # Cholesky factor; symmetric root
def test_congruences_applied_equal_the_formed_matrices(kind: int):
    factor, inner = random_factor(40, 0), random_factor(40, 1)
    whitening = whitenings(factor)[kind]
    root = whitening.lower if whitening.lower is not None else whitening.roots.root  # R with R R^T = damped F
    block = torch.randn(40, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = root.T @ inner @ root
    operator = whitening.congruence(inner)
    torch.testing.assert_close(operator.apply(block), expected @ block, rtol=1e-10, atol=0)
    torch.testing.assert_close(operator.dense(), expected, rtol=1e-10, atol=0)
    inverse = torch.linalg.inv(root)
    expected = inverse @ inner @ inverse.T
    operator = whitening.inverse_congruence(inner)
    scale = float(expected.abs().max())
    torch.testing.assert_close(operator.apply(block), expected @ block, rtol=0, atol=1e-9 * scale * 40)
    torch.testing.assert_close(operator.dense(), expected, rtol=0, atol=1e-9 * scale)


def test_an_operator_is_formed_only_for_the_full_decomposition(monkeypatch: pytest.MonkeyPatch):
    matrix = random_factor(500, 3)
    formed = []
    operator = SymmetricOperator(500, matrix.__matmul__, lambda: formed.append(1) or matrix, matrix.device)
    values, vectors = top_eigenpairs(operator, 6)  # implicit, 500 wide: the block Krylov method converges
    assert formed == []
    full_values, full_vectors = torch.linalg.eigh(matrix)
    torch.testing.assert_close(values, full_values.flip(0)[:6], rtol=1e-10, atol=0)
    monkeypatch.setattr(top_r, "krylov_steps", lambda dim, block: 0)  # the full decomposition instead
    again, _ = top_eigenpairs(operator, 6)
    assert formed == [1]
    torch.testing.assert_close(again, values, rtol=1e-10, atol=0)


@pytest.mark.parametrize("krylov", [True, False])
@pytest.mark.parametrize("shape", [(300, 260), (260, 300), (30, 20)])  # narrower side either; too narrow to iterate
def test_inverse_whitened_triplets_are_those_of_the_formed_whitened_matrix(shape: tuple[int, int], krylov: bool,
                                                                          monkeypatch: pytest.MonkeyPatch):
    if krylov:  # else a CPU's dense subset solver at these widths
        monkeypatch.setattr(top_r, "KRYLOV_MIN_DIM", 0)
    d_out, d_in = shape
    generator = torch.Generator().manual_seed(d_out)
    matrix = (torch.randn(d_out, 30, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, 30)) @ \
        torch.randn(30, d_in, generator=generator, dtype=torch.float64)
    output, inputs = cholesky_whitening(random_factor(d_out, 4), 1e-3), cholesky_whitening(random_factor(d_in, 5), 1e-3)
    left, values, right = inverse_whitened_triplets(matrix, output, inputs, 5)
    whitened = output.solve(inputs.solve(matrix.T).T)
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    expected = output.solve_transpose(u[:, :5]) @ torch.diag(s[:5]) @ inputs.solve_transpose(vh[:5].T).T
    torch.testing.assert_close(values, s[:5], rtol=1e-9, atol=0)
    product = left @ torch.diag(values) @ right.T
    assert float((product - expected).norm() / expected.norm()) <= 1e-9


def test_a_cpu_takes_the_dense_solve_for_an_explicit_matrix_up_to_the_krylov_width(monkeypatch: pytest.MonkeyPatch):
    matrix = random_factor(384, 6)
    products = []
    explicit = SymmetricOperator(384, lambda block: products.append(block.shape[1]) or matrix @ block, lambda: matrix,
                                 matrix.device, explicit=True)
    values, _ = top_eigenpairs(explicit, 8)
    assert products == []  # LAPACK's subset solver, no Krylov product
    implicit = SymmetricOperator(384, lambda block: products.append(block.shape[1]) or matrix @ block, lambda: matrix,
                                 matrix.device)
    again, _ = top_eigenpairs(implicit, 8)
    assert products  # iterated: forming an implicit operator would cost ~d^3
    torch.testing.assert_close(again, values, rtol=1e-10, atol=0)
    torch.testing.assert_close(values, torch.linalg.eigh(matrix)[0].flip(0)[:8], rtol=1e-10, atol=0)
    monkeypatch.setattr(top_r, "KRYLOV_MIN_DIM", 383)  # one column wider than the limit: iterated
    products.clear()
    top_eigenpairs(explicit, 8)
    assert products
