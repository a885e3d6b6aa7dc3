"""`LayerGeometry`: a layer's statistics with the work on its damped factors done once, on demand."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch

from ..stats.container import DenseLayerStats, LayerStats
from ..stats.linalg import (
    SymmetricRoots,
    Whitening,
    cholesky_whitening,
    damp,
    fisher_norm_squared_damped,
    symmetric_roots,
    whitened_norm_squared,
)
from ..stats.sketch import LowRankFactor
from ..stats.top_r import top_eigenpairs, top_singular_triplets
from ..stats.weight_gram import gram_dtype, weight_gram


class FactorCache:
    """Work on factors that several layers share (the `A` of query/key/value is one tensor), kept
    while a layer that reads the factor is still to come and dropped after its last one, so the
    cache never holds more than the shared factors' work.

    Keyed by the factor's id, the kind of work, the damping and the device; the factor is kept with
    its entries so that its id stays unique.
    """

    def __init__(self, layers: Iterable[LayerStats]) -> None:
        self.readers: dict[int, int] = {}
        for layer in layers:
            for factor in (layer.act_cov, layer.grad_cov):
                self.readers[id(factor)] = self.readers.get(id(factor), 0) + 1
        self.shared = {key for key, count in self.readers.items() if count > 1}
        self.entries: dict[tuple[int, str, float, str], tuple[torch.Tensor | LowRankFactor, Any]] = {}

    def get(self, factor: torch.Tensor | LowRankFactor, kind: str, damping: float, device: Any,
            compute: Callable[[], Any]) -> Any:
        if id(factor) not in self.shared:  # read by one layer only: nothing to keep
            return compute()
        key = (id(factor), kind, damping, str(device))
        hit = self.entries.get(key)
        if hit is not None and hit[0] is factor:
            return hit[1]
        value = compute()
        self.entries[key] = (factor, value)
        return value

    def done(self, layer: LayerStats) -> None:
        """`layer` is finished: drop the work on the factors no later layer reads."""
        for factor in (layer.act_cov, layer.grad_cov):
            left = self.readers.get(id(factor), 0) - 1
            self.readers[id(factor)] = left
            if left <= 0:
                self.entries = {key: value for key, value in self.entries.items() if key[0] != id(factor)}


@dataclass(frozen=True)
class WeightSpectrum:
    """The leading singular triplets of a layer's weight in the Fisher norm, `U S V^T =
    svd(R_G^T W R_A)` for square roots `R R^T` of the damped factors, un-whitened as the
    initializers use them (the same for every choice of roots, see `linalg.Whitening`).

    Attributes:
        left: `R_G^-T U_k` `(d_out, k)` float64.
        values: `S_k` `(k,)` float64, descending.
        right: `R_A^-T V_k` `(d_in, k)` float64; `left diag(S_k) right^T` is the best rank-`k`
            approximation of `W` in the Fisher norm.
        total: `||R_G^T W R_A||_F^2 = ||G^1/2 W A^1/2||_F^2` over all components.
    """

    left: torch.Tensor
    values: torch.Tensor
    right: torch.Tensor
    total: float

    @property
    def count(self) -> int:
        return int(self.values.shape[0])

    def leading(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(left, values, right)` of the first `count <= self.count` triplets."""
        return self.left[:, :count], self.values[:count], self.right[:, :count]


class LayerGeometry:
    """A layer's statistics with the work on its damped factors done once, on demand.

    Dense or sketched (`LowRankFactor`) statistics: initializers see `stats` with dense factors,
    formed only when they ask for them, one layer at a time. Each factor's square root is its
    Cholesky factor when dense (`linalg.Whitening`), its symmetric root when sketched
    (`U f(lambda + delta) U^T + f(tail + delta) (I - U U^T)`, kept in low-rank form: no `d x d` matrix).

    A geometry serves one layer and its weight `W`: `weight_spectrum` keeps what it computed for
    the weight it was first given.

    Attributes:
        source: the `LayerStats` as given (dense or sketched, on any device).
        damping: relative damping applied to both factors.
        device: where the matrices are formed (the weight's device); None: where the statistics are.
        cache: work shared with other layers' geometries (see `FactorCache`), or None.
        spectrum: the weight's `WeightSpectrum` when already known (Fisher rank allocation computes it
            for its energies), or None.
        fisher_norm_of_weight: `||G^{1/2} W A^{1/2}||_F^2` (damped factors) when an initializer had it
            as a by-product, else None (`fisher_norm_squared` computes it).
    """

    def __init__(self, stats: LayerStats, damping: float, device: torch.device | str | None = None,
                 cache: FactorCache | None = None, spectrum: WeightSpectrum | None = None) -> None:
        self.source = stats
        self.damping = damping
        self.device = device
        self.cache = cache
        self.spectrum = spectrum
        self.fisher_norm_of_weight: float | None = None
        self._weight_gram: torch.Tensor | None = None

    def _shared(self, factor: torch.Tensor | LowRankFactor, kind: str, compute: Callable[[], Any]) -> Any:
        if self.cache is None:
            return compute()
        return self.cache.get(factor, kind, self.damping, self.device, compute)

    @cached_property
    def stats(self) -> DenseLayerStats:
        """The statistics with dense factors on `device` (the given object itself when it already is)."""
        return self.source.dense(self.device)

    @cached_property
    def grad_mean(self) -> torch.Tensor | None:
        """The mean gradient `M` `(d_out, d_in)` on `device`, None when it was not collected. Read from the
        statistics as given: a sketched layer's factors are not formed for it (`stats` would form both
        `d x d` matrices, which the natural gradient on low-rank roots never reads)."""
        mean = self.source.grad_mean
        return mean if mean is None else self._on_device(mean)

    def _on_device(self, factor: torch.Tensor) -> torch.Tensor:
        return factor if self.device is None else factor.to(self.device)

    def _roots(self, factor: torch.Tensor | LowRankFactor) -> SymmetricRoots:
        if isinstance(factor, LowRankFactor):
            return self._shared(factor, "roots", lambda: factor.roots(self.damping, self.device))
        return self._shared(factor, "roots", lambda: symmetric_roots(self._on_device(factor), self.damping))

    def _damped(self, factor: torch.Tensor | LowRankFactor, side: Literal["act", "grad"]) -> torch.Tensor:
        """`F + damping * mean(diag F) I` `(d, d)` float64 for `side` "act" or "grad" (a dense factor as it
        is; a sketched one formed from `stats`, which forms a sketched other side too)."""
        def compute() -> torch.Tensor:
            dense = self._on_device(factor) if isinstance(factor, torch.Tensor) else getattr(self.stats, f"{side}_cov")
            return damp(dense, self.damping, torch.float64)[0]
        return self._shared(factor, "damped", compute)

    def _whitening(self, factor: torch.Tensor | LowRankFactor, damped: Callable[[], torch.Tensor]) -> Whitening:
        """`damped` returns the damped factor, kept by this geometry (the Cholesky factor and the
        Fisher norms read the same copy: a 1536-wide one costs ~10 ms to convert and damp)."""
        if isinstance(factor, LowRankFactor):
            roots = self._roots(factor)
            return Whitening(lower=None, roots=roots, damping_added=roots.damping_added)
        return self._shared(factor, "cholesky", lambda: cholesky_whitening(
            self._on_device(factor), self.damping, damped=damped()))

    @cached_property
    def damped_act_cov(self) -> torch.Tensor:
        """The damped `A` `(d_in, d_in)` float64 (the Cholesky factor's input)."""
        return self._damped(self.source.act_cov, "act")

    @cached_property
    def damped_grad_cov(self) -> torch.Tensor:
        """The damped `G` `(d_out, d_out)` float64 (the Cholesky factor's input)."""
        return self._damped(self.source.grad_cov, "grad")

    @cached_property
    def act_roots(self) -> SymmetricRoots:
        """Symmetric roots of the damped `A`, `(d_in, d_in)` float64 (a full eigendecomposition: the
        initializers here use `act_whitening`)."""
        return self._roots(self.source.act_cov)

    @cached_property
    def grad_roots(self) -> SymmetricRoots:
        """Symmetric roots of the damped `G`, `(d_out, d_out)` float64 (see `act_roots`)."""
        return self._roots(self.source.grad_cov)

    @cached_property
    def act_whitening(self) -> Whitening:
        """A square root `R_A` of the damped `A` (Cholesky when dense)."""
        return self._whitening(self.source.act_cov, lambda: self.damped_act_cov)

    @cached_property
    def grad_whitening(self) -> Whitening:
        """A square root `R_G` of the damped `G` (Cholesky when dense)."""
        return self._whitening(self.source.grad_cov, lambda: self.damped_grad_cov)

    @cached_property
    def act_inverse(self) -> torch.Tensor:
        """The damped `A`'s inverse `(d_in, d_in)` float64, from its Cholesky factor (shared like it)."""
        return self._shared(self.source.act_cov, "inverse", self.act_whitening.inverse)

    def top_act_eigenpairs(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `count` leading eigenpairs of (undamped) `A`: values descending, vectors `(d_in, count)`.

        Taken from the damped float64 copy that the captured energy reads anyway (the same
        eigenvectors, the values less the damping), so the factor is converted to float64 once
        (a 1536-wide one: 19 MB, ~2 ms). A sketched factor gives its own (`LowRankFactor.leading_eigenpairs`)."""
        return self._shared(self.source.act_cov, f"top{count}", lambda: self._leading(
            self.source.act_cov, count, lambda: self.damped_act_cov, self.damping_added[0]))

    def top_grad_eigenpairs(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `count` leading eigenpairs of (undamped) `G`: values descending, vectors `(d_out, count)`
        (from the damped copy, see `top_act_eigenpairs`)."""
        return self._shared(self.source.grad_cov, f"top{count}", lambda: self._leading(
            self.source.grad_cov, count, lambda: self.damped_grad_cov, self.damping_added[1]))

    def _leading(self, factor: torch.Tensor | LowRankFactor, count: int, damped: Callable[[], torch.Tensor],
                 amount: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A sketch's own leading eigenpairs when it holds them (no `(d, d)` matrix formed), else those of
        the damped dense copy less the damping `amount`."""
        if isinstance(factor, LowRankFactor):
            held = factor.leading_eigenpairs(count)
            if held is not None:
                return held if self.device is None else (held[0].to(self.device), held[1].to(self.device))
        return _less_damping(top_eigenpairs(damped(), count), amount)

    def whitened_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`R_G^T W R_A` `(d_out, d_in)` float64: its singular values are those of `G^{1/2} W A^{1/2}`
        (both roots: `weight_spectrum` needs only the narrower side's)."""
        act_side = self.act_whitening.transpose_times(weight.T.double())  # R_A^T W^T
        return self.grad_whitening.transpose_times(act_side.T)

    def weight_gram(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight's Gram matrix on its narrower side in the metric of the wider side's damped factor,
        `W^T G W` `(d_in, d_in)` for `d_out >= d_in`, else `W A W^T` `(d_out, d_out)`, float64 (in float32
        arithmetic for a large layer, `weight_gram.weight_gram`; from a sketched factor's own eigenpairs,
        `LowRankFactor.weight_gram`). Kept for the next call (one weight per geometry)."""
        if self._weight_gram is None:
            tall = weight.shape[0] >= weight.shape[1]
            matrix = weight if tall else weight.T
            dtype = gram_dtype(*matrix.shape)
            wide = self.source.grad_cov if tall else self.source.act_cov
            amount = self.damping_added[1 if tall else 0]
            if isinstance(wide, LowRankFactor):  # from the sketch itself: no (d, d) matrix formed
                self._weight_gram = wide.weight_gram(matrix, amount, dtype)
            elif dtype == torch.float64:  # the damped float64 copy, which the captured energy reads anyway
                self._weight_gram = weight_gram(matrix, self.damped_grad_cov if tall else self.damped_act_cov, 0.0,
                                                dtype)
            else:
                self._weight_gram = weight_gram(matrix, self._on_device(wide), amount, dtype)
        return self._weight_gram

    def weight_spectrum(self, weight: torch.Tensor, count: int) -> WeightSpectrum:
        """The leading `count` singular triplets of `W` `(d_out, d_in)` in the Fisher norm, from the
        Gram matrix of the whitened weight on its narrower side: for `d_out >= d_in`,
        `C = R_A^T (W^T G W) R_A` `(d_in, d_in)` (damped `G`; `U_k S_k = R_G^T W R_A V_k`, so the left
        factor `R_G^-T U_k = W R_A V_k / S_k` needs no root of `G`), else `R_G^T (W A W^T) R_G`.
        So only the narrower factor is Cholesky-factorized, and the wider one enters through one
        product with `W` (`weight_gram`, in float32 for a large layer); `C` is applied to the Krylov
        blocks as three products and formed only for a full decomposition (`Whitening.congruence`).
        `C` squares the condition number: when `S_k < 1e-4 S_1` the triplets come from the whitened
        weight's SVD instead (both roots, float64). Kept for the next call (a call for fewer triplets
        slices it).
        """
        if self.spectrum is not None and self.spectrum.count >= count:
            return self.spectrum
        matrix = weight.double()
        tall = matrix.shape[0] >= matrix.shape[1]
        narrow = self.act_whitening if tall else self.grad_whitening
        fisher_gram = self.weight_gram(matrix)
        # tr C = tr(F R R^T) = <F, damped narrow factor>: C itself is applied, never formed (the
        # congruence would cost d^3, a converged top-r solve ~100 products of 3 d^2 each).
        total = float((fisher_gram * (self.damped_act_cov if tall else self.damped_grad_cov)).sum())
        eigenvalues, vectors = top_eigenpairs(narrow.congruence(fisher_gram), count)
        values = eigenvalues.clamp_min(0).sqrt()
        if float(values[-1]) <= 1e-4 * float(values[0]):  # also a zero weight
            left, values, right = top_singular_triplets(self.whitened_weight(matrix), count)
            spectrum = WeightSpectrum(self.grad_whitening.solve_transpose(left), values,
                                      self.act_whitening.solve_transpose(right), total)
        else:
            near = narrow.solve_transpose(vectors)  # R^-T V_k on the narrow side
            far = (matrix if tall else matrix.T) @ narrow.times(vectors) / values  # W R_A V_k / S_k
            spectrum = WeightSpectrum(far, values, near, total) if tall else WeightSpectrum(near, values, far, total)
        self.spectrum = spectrum
        return spectrum

    def fisher_norm_squared(self, weight: torch.Tensor) -> float:
        """`||G^{1/2} W A^{1/2}||_F^2` of this layer's weight with the damped factors: the spectrum's
        total when `weight_spectrum` has run (or `fisher_norm_of_weight`), else `||R_G^T W R_A||_F^2`
        when an initializer has formed both roots (`linalg.whitened_norm_squared`), else `<G W, W A>`
        in float32 (no root; relative error ~1e-6, enough for the captured-energy ratio it feeds)."""
        if self.spectrum is not None:
            return self.spectrum.total
        if self.fisher_norm_of_weight is not None:
            return self.fisher_norm_of_weight
        if "grad_whitening" in self.__dict__ and "act_whitening" in self.__dict__:  # cached_property values
            return whitened_norm_squared(weight, self.grad_whitening, self.act_whitening)
        return fisher_norm_squared_damped(weight, self.stats.grad_cov, self.stats.act_cov, self.damping,
                                          dtype=torch.float32)

    @property
    def damping_added(self) -> tuple[float, float]:
        """The absolute damping added to `(A, G)`: `damping * mean(diag)` of each."""
        return (self.damping * _mean_diagonal(self.source.act_cov),
                self.damping * _mean_diagonal(self.source.grad_cov))



def _less_damping(pairs: tuple[torch.Tensor, torch.Tensor], amount: float) -> tuple[torch.Tensor, torch.Tensor]:
    return pairs[0] - amount, pairs[1]


def _mean_diagonal(factor: torch.Tensor | LowRankFactor) -> float:
    mean = factor.trace / factor.dim if isinstance(factor, LowRankFactor) else float(factor.diagonal().double().mean())
    return mean if mean > 0 else 1.0
