"""Configuration dataclasses. Closed sets are checked strings; open sets (methods) are registries."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FISHER_TYPES = ("empirical", "true")
LOSS_REDUCTIONS = ("sum", "mean")
GRAD_SCALES = ("stable", "unit", "spectrum")
EIG_SCALES = ("projection", "unit")


def _check_choice(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"FisherConfig.{field_name} must be one of {choices}, got {value!r}")


@dataclass
class FisherConfig:
    """How statistics are collected and how the adapter is initialized.

    Attributes:
        method: initializer name, one of `fisherlora.METHODS` (Fisher variants and `milora`). The
            default, `fisher_eig`, is the Fisher variant whose worst validation rank over the
            text, lm and vision benchmarks is best (never last of the four; `fisher_grad` has a
            better mean rank but is last on text). See README, "Which variant is the default".
        fisher: "empirical" (gradients of the data's own labels) or "true" (labels sampled from
            the model's predictive distribution, `n_samples` draws per input; needs no labels).
        num_batches: batches of the dataloader to use; `None` uses all of them.
        n_samples: label draws per input for the true Fisher.
        damping: relative damping `lambda`: factors become `F + lambda * mean(diag F) * I` before
            any root or inverse.
        collect_grad_mean: also collect `M` (mean gradient per example). `None` collects it only
            when the method needs it (`fisher_grad`).
        loss_reduction: only for a custom `loss_fn`: "mean" says the loss is averaged over its
            loss units (labels != -100 after the causal shift for 2-D labels, else examples), and
            is multiplied back so statistics do not depend on the batch size.
        grad_scale: `fisher_grad` factor scale rule: "stable" (LoRA-GA's: each factor has
            orthonormal directions times `d_out**0.25 / sqrt(grad_gamma)`), "unit" (orthonormal
            directions), "spectrum" (product equals `grad_step` times the rank-r natural-gradient
            approximation).
        grad_gamma: the `gamma` of the "stable" rule (LoRA-GA's default is 16).
        grad_step: learning-rate-like multiplier for the "spectrum" rule.
        eig_scale: `fisher_eig` scale rule: "projection" (adapter holds `W` projected onto the
            sensitive output/input eigenspaces) or "unit" (factors are the eigenvectors times
            `eig_gamma`).
        eig_gamma: factor multiplier of the "unit" rule.
        seed: seed of the label sampling of the true Fisher.
        progress: show a progress bar while collecting.
        sketch_threshold: a Kronecker factor whose dimension (`d_in` for `A`, `d_out` for `G`)
            exceeds it is kept as a low-rank Nystrom sketch (`stats.sketch.LowRankFactor`, `d * k`
            floats) instead of a dense `d x d` matrix; `None` keeps every factor dense.
        sketch_rank: `k`, the sketch size (clipped to `d`; `k = d` reproduces the exact factor).
        sketch_seed: seed of the sketches' Gaussian test matrices (per layer and side; identical on
            every `torch.distributed` rank).
        layer_groups: collect the layers in this many contiguous groups, one pass over the data per
            group: the accumulators of one group only are alive at a time (peak memory divided by
            about `layer_groups`) for `layer_groups` times the forward/backward time. The dataloader
            must be re-iterable and yield the same batches each pass.
        stats_device: where finished statistics are kept (e.g. "cpu": each group's statistics leave
            the accelerator as soon as it is done); `None` keeps them on the layer's device.
    """

    method: str = "fisher_eig"
    fisher: str = "empirical"
    num_batches: int | None = 32
    n_samples: int = 1
    damping: float = 1e-3
    collect_grad_mean: bool | None = None
    loss_reduction: str = "sum"
    grad_scale: str = "stable"
    grad_gamma: float = 16.0
    grad_step: float = 1.0
    eig_scale: str = "projection"
    eig_gamma: float = 1.0
    seed: int = 0
    progress: bool = True
    sketch_threshold: int | None = None
    sketch_rank: int = 256
    sketch_seed: int = 0
    layer_groups: int = 1
    stats_device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("fisher", self.fisher, FISHER_TYPES)
        _check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        _check_choice("grad_scale", self.grad_scale, GRAD_SCALES)
        _check_choice("eig_scale", self.eig_scale, EIG_SCALES)
        if self.num_batches is not None and self.num_batches < 1:
            raise ValueError(f"FisherConfig.num_batches must be >= 1 or None, got {self.num_batches}")
        if self.n_samples < 1:
            raise ValueError(f"FisherConfig.n_samples must be >= 1, got {self.n_samples}")
        if self.damping < 0:
            raise ValueError(f"FisherConfig.damping must be >= 0, got {self.damping}")
        if self.grad_gamma <= 0:
            raise ValueError(f"FisherConfig.grad_gamma must be > 0, got {self.grad_gamma}")
        if self.sketch_threshold is not None and self.sketch_threshold < 1:
            raise ValueError(f"FisherConfig.sketch_threshold must be >= 1 or None, got {self.sketch_threshold}")
        if self.sketch_rank < 1:
            raise ValueError(f"FisherConfig.sketch_rank must be >= 1, got {self.sketch_rank}")
        if self.layer_groups < 1:
            raise ValueError(f"FisherConfig.layer_groups must be >= 1, got {self.layer_groups}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
