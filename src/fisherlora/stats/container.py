"""`LayerStats` and `FisherStats`: the collected statistics, their fingerprint and safetensors form."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write
from .sketch import LowRankFactor

FORMAT_VERSION = 1
LAYER_TYPES = ("linear", "conv1d", "conv2d")


def weight_fingerprint(weight: torch.Tensor) -> list[float]:
    """A cheap summary of a `(d_out, d_in)` weight that changes when the weight does.

    Returns `[sum, Frobenius norm, position-weighted sum]` in float64, the last
    `sum_ij i cos(j) W_ij` (rows counted from 1), which a permutation of rows or columns changes.
    Compare with `fingerprints_match`: dtype rounding of the same checkpoint (bf16 vs fp32) matches,
    a different checkpoint or a weight already replaced by a residual does not.
    """
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    rows = torch.arange(1, matrix.shape[0] + 1, dtype=torch.float64, device=matrix.device)
    cols = torch.cos(torch.arange(matrix.shape[1], dtype=torch.float64, device=matrix.device))
    weighted = float(rows @ (matrix @ cols))  # sum_ij rows_i W_ij cols_j, without a (d_out, d_in) temporary
    return [float(matrix.sum()), float(matrix.norm()), weighted]


def fingerprints_match(expected: list[float], actual: list[float], shape: tuple[int, int],
                       rtol: float = 2e-2) -> bool:
    """Whether two `weight_fingerprint`s of a `shape = (d_out, d_in)` weight are of the same weights.

    Each entry may differ by `rtol` times its scale: `||W||_F` (the second entry) for the sum and the
    norm, and `||W||_F rms(i) rms(cos j)` for the position-weighted sum, which is how much that sum
    moves when the weight changes by `||W||_F` spread over its entries. Its weights grow with the row
    index, so without that factor the tolerance would shrink with `d_out` against the rounding noise
    (the bug this replaces: bf16 and fp32 of SmolLM2 did not match on 193 of 210 layers). bf16
    rounding (relative `2^-9` per entry) moves each entry by about 0.002 of its scale, a tenth of the
    default `rtol`.
    """
    d_out, d_in = shape
    rows = torch.arange(1, d_out + 1, dtype=torch.float64)
    cols = torch.cos(torch.arange(d_in, dtype=torch.float64))
    weights_rms = float(rows.square().mean().sqrt() * cols.square().mean().sqrt())
    scale = max(abs(expected[1]), 1e-12)
    scales = (scale, scale, scale * weights_rms)
    return all(abs(e - a) <= rtol * s for e, a, s in zip(expected, actual, scales, strict=True))


@dataclass
class LayerStats:
    """Kronecker-factored Fisher statistics of one layer `y = W x`.

    Attributes:
        act_cov: `A = (1/T) sum_t x_t x_t^T`, `(d_in, d_in)` float32, or a `LowRankFactor` (a Nystrom
            sketch in `O(k d_in)`, for layers wider than `FisherConfig.sketch_threshold`).
        grad_cov: `G = (1/T) sum_t g_t g_t^T`, `(d_out, d_out)` float32, or a `LowRankFactor`.
        grad_mean: `M = (1/E) sum_t g_t x_t^T`, `(d_out, d_in)` float32, or None if not collected.
        num_tokens: `T`, unmasked tokens (positions x batch for Conv2d).
        num_examples: `E`, examples with at least one loss term.
        layer_type: "linear", "conv1d" (HF transposed) or "conv2d" (unfolded patches).
        weight_shape: `(d_out, d_in)` of the layer as a matrix.
        fingerprint: `weight_fingerprint` of the weight the statistics were collected on.
    """

    act_cov: torch.Tensor | LowRankFactor
    grad_cov: torch.Tensor | LowRankFactor
    grad_mean: torch.Tensor | None
    num_tokens: int
    num_examples: int
    layer_type: str
    weight_shape: tuple[int, int]
    fingerprint: list[float] = field(default_factory=list)

    @property
    def d_in(self) -> int:
        return self.weight_shape[1]

    @property
    def d_out(self) -> int:
        return self.weight_shape[0]

    @property
    def is_sketched(self) -> bool:
        return isinstance(self.act_cov, LowRankFactor) or isinstance(self.grad_cov, LowRankFactor)

    def numel(self) -> int:
        """Floats held by the statistics (`d^2` per dense factor, `d k + k` per sketch, `M`)."""
        total = sum(factor.numel() for factor in (self.act_cov, self.grad_cov))
        return total + (self.grad_mean.numel() if self.grad_mean is not None else 0)

    def dense(self, device: torch.device | str | None = None) -> DenseLayerStats:
        """These statistics with both factors as dense float32 matrices on `device` (default: where
        they are). Dense statistics already there are returned as they are (no copy)."""
        if isinstance(self, DenseLayerStats) and (device is None or self.act_cov.device == torch.device(device)):
            return self

        def densify(factor: torch.Tensor | LowRankFactor) -> torch.Tensor:
            if isinstance(factor, LowRankFactor):
                return factor.dense(torch.float32, device)
            return factor if device is None else factor.to(device)

        return DenseLayerStats(
            act_cov=densify(self.act_cov),
            grad_cov=densify(self.grad_cov),
            grad_mean=self.grad_mean if self.grad_mean is None or device is None else self.grad_mean.to(device),
            num_tokens=self.num_tokens,
            num_examples=self.num_examples,
            layer_type=self.layer_type,
            weight_shape=self.weight_shape,
            fingerprint=self.fingerprint,
        )


@dataclass
class DenseLayerStats(LayerStats):
    """`LayerStats` whose factors are dense tensors (what the initializers see)."""

    act_cov: torch.Tensor
    grad_cov: torch.Tensor

    def __post_init__(self) -> None:
        for label, factor in (("act_cov", self.act_cov), ("grad_cov", self.grad_cov)):
            if not isinstance(factor, torch.Tensor):
                raise TypeError(f"DenseLayerStats.{label} must be a tensor, got {type(factor).__name__}")


@dataclass
class FisherStats(Mapping[str, LayerStats]):
    """Statistics of every targeted layer, keyed by the module name in the *base* model
    (PEFT's `base_model.model.` prefix removed, so stats move between a plain and a PEFT model).

    Attributes:
        layers: name -> `LayerStats`.
        fisher: "empirical" or "true".
        num_batches: batches used.
        n_samples: label draws per input (true Fisher).
        model_dtype: dtype of the model's weights during collection (accumulation is float32).
        world_size: processes whose statistics were summed (1 without torch.distributed).
    """

    layers: dict[str, LayerStats]
    fisher: str
    num_batches: int
    n_samples: int = 1
    model_dtype: str = "torch.float32"
    world_size: int = 1

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "fisher": self.fisher,
            "num_batches": self.num_batches,
            "n_samples": self.n_samples,
            "model_dtype": self.model_dtype,
            "world_size": self.world_size,
            "layers": {
                name: {
                    "num_tokens": layer.num_tokens,
                    "num_examples": layer.num_examples,
                    "layer_type": layer.layer_type,
                    "weight_shape": list(layer.weight_shape),
                    "fingerprint": layer.fingerprint,
                    "has_grad_mean": layer.grad_mean is not None,
                    **_factor_metadata(layer),
                }
                for name, layer in self.layers.items()
            },
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (tensors + JSON metadata); atomic: temp file, then rename."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        written: set[int] = set()

        def stored(tensor: torch.Tensor) -> torch.Tensor:
            # Layers reading one tensor share their `A`: safetensors refuses shared storage, so each
            # later one is written as a copy (and loads as its own tensor).
            result = tensor.detach().float().contiguous().cpu()
            if result.untyped_storage().data_ptr() in written:
                result = result.clone()
            written.add(result.untyped_storage().data_ptr())
            return result

        for name, layer in self.layers.items():
            for label in ("act_cov", "grad_cov"):
                factor = getattr(layer, label)
                if isinstance(factor, LowRankFactor):
                    tensors[f"{name}::{label}::eigenvectors"] = stored(factor.eigenvectors)
                    tensors[f"{name}::{label}::eigenvalues"] = stored(factor.eigenvalues)
                else:
                    tensors[f"{name}::{label}"] = stored(factor)
            if layer.grad_mean is not None:
                tensors[f"{name}::grad_mean"] = layer.grad_mean.detach().float().contiguous().cpu()
        metadata = {"fisherlora": json.dumps(self.metadata())}
        atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FisherStats:
        """Read a file written by `save`; raises `ValueError` naming the file if it is not one."""
        from safetensors import safe_open

        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"statistics file {source} does not exist")
        try:
            with safe_open(str(source), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("fisherlora")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{source} is not a readable safetensors file: {error}") from error
        if raw is None:
            raise ValueError(f"{source} has no fisherlora metadata: it was not written by FisherStats.save")
        meta = json.loads(raw)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        layers = {}
        shared = _SharedFactors()
        for name, info in meta["layers"].items():
            layers[name] = LayerStats(
                act_cov=shared.get(_load_factor(tensors, name, "act_cov", info)),
                grad_cov=shared.get(_load_factor(tensors, name, "grad_cov", info)),
                grad_mean=tensors.get(f"{name}::grad_mean"),
                num_tokens=int(info["num_tokens"]),
                num_examples=int(info["num_examples"]),
                layer_type=info["layer_type"],
                weight_shape=(int(info["weight_shape"][0]), int(info["weight_shape"][1])),
                fingerprint=[float(v) for v in info["fingerprint"]],
            )
        return cls(
            layers=layers,
            fisher=meta["fisher"],
            num_batches=int(meta["num_batches"]),
            n_samples=int(meta.get("n_samples", 1)),
            model_dtype=meta.get("model_dtype", "torch.float32"),
            world_size=int(meta.get("world_size", 1)),
        )


class _SharedFactors:
    """Gives bit-identical dense factors one tensor object again on load.

    Layers that read one tensor (query/key/value, gate/up) share their `A` when collected, and the
    initializers factorize a shared factor once (`init.geometry.FactorCache`, keyed by the tensor).
    `save` writes each sharer as a copy (safetensors refuses shared storage), so a loaded file would
    factorize every copy again; equal factors are the same statistic whichever layer they came from,
    so sharing them is exact, and files stay readable by older versions.
    """

    def __init__(self) -> None:
        self.seen: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def get(self, factor: torch.Tensor | LowRankFactor) -> torch.Tensor | LowRankFactor:
        if not isinstance(factor, torch.Tensor):
            return factor
        # A cheap key first (shape, dtype, trace, a corner entry); `torch.equal` decides.
        key = (tuple(factor.shape), factor.dtype, float(factor.diagonal().sum()), float(factor.flatten()[-1]))
        candidates = self.seen.setdefault(key, [])
        for candidate in candidates:
            if torch.equal(candidate, factor):
                return candidate
        candidates.append(factor)
        return factor


def _factor_metadata(layer: LayerStats) -> dict[str, Any]:
    # Only sketched factors add keys: files of dense statistics are unchanged (readable by older versions).
    sketched = {}
    for label in ("act_cov", "grad_cov"):
        factor = getattr(layer, label)
        if isinstance(factor, LowRankFactor):
            sketched[label] = {"trace": factor.trace}
    return {"low_rank": sketched} if sketched else {}


def _load_factor(tensors: dict[str, torch.Tensor], name: str, label: str,
                 info: dict[str, Any]) -> torch.Tensor | LowRankFactor:
    low_rank = info.get("low_rank", {}).get(label)
    if low_rank is None:
        return tensors[f"{name}::{label}"]
    return LowRankFactor(eigenvectors=tensors[f"{name}::{label}::eigenvectors"],
                         eigenvalues=tensors[f"{name}::{label}::eigenvalues"], trace=float(low_rank["trace"]))
