"""Low-rank (Nystrom) statistics: convergence to the exact factors, exactness at k = d, O(k d) size,
initializers on sketched statistics, save/load, and layer groups (several passes over the data)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fisherlora as fl
from fisherlora.init.registry import INITIALIZERS, run_initializer
from fisherlora.stats.collect import layer_groups
from fisherlora.stats.linalg import (
    FactorRoots,
    Whitening,
    cholesky_whitening,
    inverse_whitened_triplets,
    symmetric_roots,
)
from fisherlora.stats.sketch import LowRankFactor, NystromSketch, _spectral_function, layer_statistics_bytes
from fisherlora.stats.top_r import top_eigenpairs
from fisherlora.stats.weight_gram import weight_gram
from models import TinyMLP, pair_batches

D_IN, HIDDEN, CLASSES = 12, 10, 6
TARGETS = ["fc1", "fc2"]


def model() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(d_in=D_IN, hidden=HIDDEN, classes=CLASSES)


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return pair_batches(count=3, batch_size=16, d_in=D_IN, classes=CLASSES)


def collect(net: torch.nn.Module, batches, **options) -> fl.FisherStats:  # noqa: ANN001
    config = fl.FisherConfig(progress=False, collect_grad_mean=True, **options)
    return fl.collect_fisher(net, batches, config, target_modules=TARGETS)


def relative_error(approximation: torch.Tensor, exact: torch.Tensor) -> float:
    """`||approximation - exact|| / ||exact||`; 0 when both are zero (a zero-start method's B)."""
    difference = float((approximation.double() - exact.double()).norm())
    scale = float(exact.double().norm())
    return difference / scale if scale > 0 else difference


def test_sketched_factors_converge_and_are_exact_at_full_rank():
    net, batches = model(), data()
    exact = collect(net, batches)
    errors: dict[tuple[str, str], list[float]] = {}
    for k in (1, 2, 4, 8, D_IN):
        sketched = collect(net, batches, sketch_threshold=1, sketch_rank=k)
        for name in TARGETS:
            for side in ("act_cov", "grad_cov"):
                factor = getattr(sketched[name], side)
                reference = getattr(exact[name], side)
                assert isinstance(factor, LowRankFactor) and isinstance(reference, torch.Tensor)
                assert factor.rank == min(k, factor.dim)
                # the exact trace is kept whatever k (it sets the damping)
                assert factor.trace == pytest.approx(float(reference.double().trace()), rel=1e-5)
                errors.setdefault((name, side), []).append(relative_error(factor.dense(), reference))
    for key, values in errors.items():
        assert values[0] > 1e-2, (key, values)  # k = 1 is a real approximation
        assert all(b <= a * 1.05 + 1e-6 for a, b in zip(values, values[1:], strict=False)), (key, values)
        assert values[-1] < 1e-5, (key, values)  # k >= d: exact to float32 rounding
        assert values[0] > 10 * values[-1]


def test_low_rank_roots_match_dense_roots():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 9, generator=generator) * torch.logspace(0, -2, 9)
    for k in (3, 9):
        sketch = NystromSketch(9, k, seed=5, device="cpu")
        sketch.add(rows[:25])
        sketch.add(rows[25:])
        factor = sketch.finalize(40)
        reference = symmetric_roots(factor.dense(), 1e-2)
        roots = factor.roots(1e-2)
        assert roots.damping_added == pytest.approx(reference.damping_added, rel=1e-6)
        assert torch.allclose(roots.root, reference.root, rtol=1e-6, atol=1e-8)
        assert torch.allclose(roots.inverse_root, reference.inverse_root, rtol=1e-5, atol=1e-6)


def test_low_rank_roots_apply_like_their_dense_matrices():
    """`LowRankRoots` never forms `(d, d)`: applied to columns, in float64 and float32, it equals the
    dense spectral function of the same eigenpairs (with and without a tail), and a `Whitening` on it
    gives the same natural-gradient triplets as one on the dense roots."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(60, 12, generator=generator) * torch.logspace(0, -3, 12)
    columns = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    grad_mean = torch.randn(7, 12, generator=generator, dtype=torch.float64)
    output = cholesky_whitening(torch.eye(7, dtype=torch.float64) + 0.1, 1e-3)
    for k in (4, 12):
        sketch = NystromSketch(12, k, seed=2, device="cpu")
        sketch.add(rows)
        factor = sketch.finalize(60)
        roots = factor.roots(1e-3)
        values = factor.eigenvalues.double() + roots.damping_added
        tail = factor.tail + roots.damping_added
        for power, apply in ((0.5, roots.root_times), (-0.5, roots.inverse_root_times)):
            dense = _spectral_function(factor, lambda v, power=power: v.pow(power), torch.float64, None,
                                       eigenvalues=values, tail=tail)
            assert torch.allclose(apply(columns), dense @ columns, rtol=1e-10, atol=1e-12)
            single = apply(columns, torch.float32)
            assert single.dtype == torch.float32
            assert torch.allclose(single.double(), dense @ columns, rtol=1e-4, atol=1e-5)
        dense_roots = FactorRoots(root=roots.root, inverse_root=roots.inverse_root, damping_added=roots.damping_added)
        low_rank = inverse_whitened_triplets(grad_mean, output, Whitening(None, roots, roots.damping_added), 3)
        reference = inverse_whitened_triplets(grad_mean, output, Whitening(None, dense_roots, roots.damping_added), 3)
        for ours, theirs in zip(low_rank, reference, strict=True):
            assert torch.allclose(ours, theirs, rtol=1e-8, atol=1e-10)


def _eigen_sketch(dim: int, rank: int, values: list[float], trace: float, seed: int) -> LowRankFactor:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0][:, :rank]
    return LowRankFactor(basis.float().contiguous(), torch.tensor(values, dtype=torch.float32), trace)


def test_leading_eigenpairs_are_those_of_the_dense_factor():
    factor = _eigen_sketch(300, 6, [9.0, 5.0, 4.0, 2.0, 1.5, 1.2], trace=40.0, seed=0)  # tail 17.3 / 294
    values, vectors = factor.leading_eigenpairs(4)
    expected_values, expected_vectors = top_eigenpairs(factor.dense(), 4)
    torch.testing.assert_close(values, expected_values, rtol=1e-6, atol=0)
    torch.testing.assert_close(vectors, expected_vectors, rtol=0, atol=1e-6)  # same sign convention
    assert values.dtype == vectors.dtype == torch.float64


def test_leading_eigenpairs_refuse_what_the_sketch_does_not_hold():
    factor = _eigen_sketch(50, 4, [3.0, 2.0, 1.0, 0.5], trace=60.0, seed=1)  # tail 53.5 / 46 = 1.16
    assert factor.leading_eigenpairs(5) is None  # more than k
    assert factor.leading_eigenpairs(3) is None  # the tail (1.16) outranks lambda_3 = 1.0
    assert factor.leading_eigenpairs(2) is not None


@pytest.mark.parametrize("rank", [6, 300])  # a tail, and k = d (no tail)
def test_low_rank_weight_gram_equals_the_dense_one(rank: int):
    factor = _eigen_sketch(300, rank, list(torch.logspace(1, -2, rank).tolist()), trace=60.0, seed=3)
    matrix = torch.randn(300, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = weight_gram(matrix, factor.dense(), 0.25, torch.float64)
    torch.testing.assert_close(factor.weight_gram(matrix, 0.25, torch.float64), expected, rtol=1e-10, atol=1e-10)
    found32 = factor.weight_gram(matrix, 0.25, torch.float32)
    assert found32.dtype == torch.float64 and relative_error(found32, expected) < 1e-5


@pytest.mark.parametrize("method", ["fisher_select", "fisher_svd"])
def test_weight_gram_methods_on_a_sketched_wide_factor_form_no_dense_sketch(method: str,
                                                                            monkeypatch: pytest.MonkeyPatch):
    net, batches = model(), data()
    weight = net.fc1.weight.detach()  # (10, 12): the input side is the wider one
    only_wide = collect(net, batches, sketch_threshold=weight.shape[0], sketch_rank=5)
    assert isinstance(only_wide["fc1"].act_cov, LowRankFactor) and not isinstance(only_wide["fc1"].grad_cov,
                                                                                  LowRankFactor)
    config = fl.FisherConfig(method=method, damping=1e-2)
    expected = run_initializer(method, weight, only_wide["fc1"].dense(), 2, 2.0, config)

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a (d, d) matrix was formed from a sketch")
    monkeypatch.setattr(LowRankFactor, "dense", refuse)
    found = run_initializer(method, weight, only_wide["fc1"], 2, 2.0, config)
    product = found.lora_b.double() @ found.lora_a.double()
    assert relative_error(product, expected.lora_b.double() @ expected.lora_a.double()) < 1e-6


def test_fisher_eig_on_sketched_statistics_forms_no_dense_sketch(monkeypatch: pytest.MonkeyPatch):
    net, batches = model(), data()
    small = collect(net, batches, sketch_threshold=1, sketch_rank=3)
    config = fl.FisherConfig(method="fisher_eig", damping=1e-2)
    weight = net.fc1.weight.detach()
    expected = run_initializer("fisher_eig", weight, small["fc1"], 2, 2.0, config)

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a (d, d) matrix was formed from a sketch")
    monkeypatch.setattr(LowRankFactor, "dense", refuse)
    found = run_initializer("fisher_eig", weight, small["fc1"], 2, 2.0, config)
    assert torch.equal(found.lora_a, expected.lora_a) and torch.equal(found.lora_b, expected.lora_b)


@pytest.mark.parametrize("method", ["fisher_zero", "fisher_grad", "fisher_step", "lora_one", "lora_ga_paper"])
def test_mean_gradient_methods_on_sketched_statistics_form_no_dense_sketch(method: str,
                                                                           monkeypatch: pytest.MonkeyPatch):
    # They read M and the low-rank roots only; reading M through the dense view formed both (d, d) factors.
    net, batches = model(), data()
    small = collect(net, batches, sketch_threshold=1, sketch_rank=3)
    config = fl.FisherConfig(method=method, damping=1e-2)
    weight = net.fc1.weight.detach()
    expected = run_initializer(method, weight, small["fc1"], 2, 2.0, config)

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a (d, d) matrix was formed from a sketch")
    monkeypatch.setattr(LowRankFactor, "dense", refuse)
    found = run_initializer(method, weight, small["fc1"], 2, 2.0, config)
    assert torch.equal(found.lora_a, expected.lora_a) and torch.equal(found.lora_b, expected.lora_b)


@pytest.mark.parametrize("method", sorted(name for name, init in INITIALIZERS.items() if init.needs_statistics))
def test_initializers_on_sketched_statistics(method: str):
    net, batches = model(), data()
    exact = collect(net, batches)
    full = collect(net, batches, sketch_threshold=1, sketch_rank=D_IN)  # k = d: exact
    small = collect(net, batches, sketch_threshold=1, sketch_rank=3)
    config = fl.FisherConfig(method=method, damping=1e-2, captured_energy=True)
    weight = net.fc1.weight.detach()
    reference = run_initializer(method, weight, exact["fc1"], 2, 2.0, config)
    at_full = run_initializer(method, weight, full["fc1"], 2, 2.0, config)
    for attribute in ("lora_a", "lora_b", "residual"):
        assert relative_error(getattr(at_full, attribute), getattr(reference, attribute)) < 1e-4, attribute
    assert at_full.captured_energy == pytest.approx(reference.captured_energy, rel=1e-4)
    approximate = run_initializer(method, weight, small["fc1"], 2, 2.0, config)
    assert torch.isfinite(approximate.lora_a).all() and torch.isfinite(approximate.lora_b).all()
    product = 2.0 * approximate.lora_b.double() @ approximate.lora_a.double()
    if INITIALIZERS[method].preserves_function:
        assert torch.allclose(approximate.residual.double() + product, weight.double(), atol=1e-5)
    else:
        assert torch.equal(approximate.residual, weight)


def test_sketched_statistics_hold_o_kd_floats():
    net = TinyMLP(d_in=40, hidden=30, classes=4)
    batches = pair_batches(count=2, batch_size=8, d_in=40, classes=4)
    k = 5
    stats = fl.collect_fisher(net, batches, fl.FisherConfig(progress=False, sketch_threshold=8, sketch_rank=k),
                              target_modules=TARGETS)
    fc1, fc2 = stats["fc1"], stats["fc2"]
    assert isinstance(fc1.act_cov, LowRankFactor) and isinstance(fc1.grad_cov, LowRankFactor)
    assert fc1.act_cov.eigenvectors.shape == (40, k) and fc1.act_cov.eigenvalues.shape == (k,)
    assert fc1.grad_cov.eigenvectors.shape == (30, k)
    assert fc1.numel() == (40 + 30) * k + 2 * k  # instead of 40^2 + 30^2
    assert fc1.act_cov.eigenvectors.dtype == torch.float32
    # fc2: d_in = 30 is sketched, d_out = 4 <= threshold stays dense
    assert isinstance(fc2.act_cov, LowRankFactor) and isinstance(fc2.grad_cov, torch.Tensor)
    assert fc2.grad_cov.shape == (4, 4)
    assert 4 * fc1.numel() == layer_statistics_bytes(30, 40, threshold=8, rank=k)
    assert layer_statistics_bytes(30, 40) == 4 * (40 * 40 + 30 * 30)


def test_sketched_statistics_save_and_load(tmp_path: Path):
    net, batches = model(), data()
    stats = collect(net, batches, sketch_threshold=HIDDEN, sketch_rank=4)  # fc1's A (d_in 12) only
    assert isinstance(stats["fc1"].act_cov, LowRankFactor)
    assert isinstance(stats["fc1"].grad_cov, torch.Tensor) and isinstance(stats["fc2"].act_cov, torch.Tensor)
    stats.save(tmp_path / "stats.safetensors")
    loaded = fl.FisherStats.load(tmp_path / "stats.safetensors")
    original, again = stats["fc1"].act_cov, loaded["fc1"].act_cov
    assert isinstance(original, LowRankFactor) and isinstance(again, LowRankFactor)
    assert torch.equal(original.eigenvectors, again.eigenvectors)
    assert torch.equal(original.eigenvalues, again.eigenvalues)
    assert original.trace == again.trace
    assert torch.equal(loaded["fc1"].grad_cov, stats["fc1"].grad_cov)  # type: ignore[arg-type]
    config = fl.FisherConfig(method="fisher_svd")
    weight = net.fc1.weight.detach()
    first = run_initializer("fisher_svd", weight, stats["fc1"], 2, 1.0, config)
    second = run_initializer("fisher_svd", weight, loaded["fc1"], 2, 1.0, config)
    assert torch.equal(first.lora_a, second.lora_a) and torch.equal(first.residual, second.residual)


class CountingLoader:
    """A re-iterable list of batches that counts its passes."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.passes = 0

    def __iter__(self):  # noqa: ANN204
        self.passes += 1
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@pytest.mark.parametrize("options", [{"fisher": "empirical"}, {"fisher": "true", "n_samples": 2},
                                     {"fisher": "empirical", "sketch_threshold": 8, "sketch_rank": 4}],
                         ids=["dense", "true-fisher", "sketched"])
def test_layer_groups_give_the_same_statistics(options: dict):
    net, batches = model(), data()
    one_loader, two_loader = CountingLoader(batches), CountingLoader(batches)
    one = collect(net, one_loader, **options)
    two = collect(net, two_loader, layer_groups=2, **options)
    assert one_loader.passes == 1 and two_loader.passes == 2
    assert list(one) == list(two) == TARGETS and two.num_batches == one.num_batches == 3
    for name in TARGETS:
        for side in ("act_cov", "grad_cov", "grad_mean"):
            first, second = getattr(one[name], side), getattr(two[name], side)
            if isinstance(first, LowRankFactor):
                assert isinstance(second, LowRankFactor)
                first, second = first.dense(), second.dense()
            assert torch.equal(first, second), (name, side)
        assert one[name].num_tokens == two[name].num_tokens


def test_layer_groups_need_a_reiterable_dataloader():
    net, batches = model(), data()
    with pytest.raises(ValueError, match="one-shot iterator"):
        collect(net, (batch for batch in batches), layer_groups=2)
    collect(net, (batch for batch in batches), layer_groups=1)  # one pass: a generator is fine


def test_layer_groups_split_contiguously():
    from fisherlora.peft import find_target_layers

    net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])
    targets = find_target_layers(net, target_modules=[str(i) for i in range(5)])
    for count in (1, 2, 3, 5, 9):
        groups = layer_groups(targets, fl.FisherConfig(layer_groups=count))
        assert len(groups) == min(count, 5) and all(groups)
        assert [t.name for group in groups for t in group] == [t.name for t in targets]


def test_sketch_config_is_validated():
    with pytest.raises(ValueError, match="sketch_rank"):
        fl.FisherConfig(sketch_rank=0)
    with pytest.raises(ValueError, match="layer_groups"):
        fl.FisherConfig(layer_groups=0)
    with pytest.raises(ValueError, match="sketch_threshold"):
        fl.FisherConfig(sketch_threshold=0)


@pytest.mark.parametrize("count", [0, -1])
def test_leading_eigenpairs_refuses_a_count_below_one(count: int):
    """`count = 0` read `lambda[-1]`, the smallest held eigenvalue, and returned empty pairs or None by chance."""
    factor = LowRankFactor(torch.eye(6, 3), torch.tensor([3.0, 2.0, 1.0]), trace=7.0)
    with pytest.raises(ValueError, match="count >= 1"):
        factor.leading_eigenpairs(count)


def test_sketch_trace_is_the_float64_sum_of_squares_of_every_row_added():
    """The trace sets the damping and the isotropic tail: it is summed in float64 from float32 rows,
    so rows whose squares overflow float32 (1e20^2) stay finite, while a non-finite row is caught."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 50, generator=generator) * scale for n, scale in ((7, 1.0), (13, 1e-3), (4, 1e20))]
    sketch = NystromSketch(50, 4, seed=1, device="cpu")
    for rows in batches:
        sketch.add(rows)
    expected = sum(float(rows.double().square().sum()) for rows in batches)
    assert sketch.finite() and float(sketch.trace) == pytest.approx(expected, rel=1e-12)
    for bad in (float("nan"), float("inf")):
        broken = NystromSketch(50, 4, seed=1, device="cpu")
        rows = torch.ones(3, 50)
        rows[1, 7] = bad
        broken.add(rows)
        assert not broken.finite()
