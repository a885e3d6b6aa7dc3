"""The public entry points: `collect_fisher` and `initialize_lora_fisher`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .config import FisherConfig
from .init.catalog import get_method
from .init.registry import get_initializer
from .peft import LayerReport, check_can_initialize, find_target_layers, write_adapters
from .stats.collect import collect_statistics
from .stats.container import FisherStats
from .stats.objective import LossFn, SampleFn
from .zero_adapters import zero_adapters_bypassed


def collect_fisher(
    model: nn.Module,
    dataloader: Iterable[Any],
    config: FisherConfig | None = None,
    *,
    target_modules: Iterable[str] | str | None = None,
    adapter_name: str = "default",
    loss_fn: LossFn | None = None,
    sample_fn: SampleFn | None = None,
) -> FisherStats:
    """Collect Kronecker-factored Fisher statistics for every LoRA-targeted layer.

    Args:
        model: a PEFT model (its LoRA layers for `adapter_name` are the targets) or a plain model
            with `target_modules` (PEFT's matching rules).
        dataloader: batches for `model(**batch)` (HF convention, `labels` inside) or
            `(inputs, labels)` pairs.
        config: `FisherConfig`; `grad_mean` is collected when `config.collect_grad_mean` is true,
            or when it is None and `config.method` needs it.
        loss_fn: `loss_fn(model, batch) -> loss` for models whose outputs are not classification
            or causal-LM logits (declare a mean reduction with `config.loss_reduction="mean"`).
        sample_fn: `sample_fn(model, batch, generator) -> batch` with sampled labels, for the true
            Fisher with a `loss_fn`.

    Returns:
        `FisherStats`: base-model module name -> `LayerStats` (`act_cov`, `grad_cov`, ...). Factors wider
        than `config.sketch_threshold` are `stats.sketch.LowRankFactor` sketches (`O(k d)` memory);
        the initializers take either form.

    Data parallel: when `torch.distributed` is initialized (`torchrun`, `accelerate launch`), give each
    rank its own share of the batches; the sums and token counts are all-reduced, so every rank
    returns the statistics of all the batches (and `initialize_lora_fisher` writes identical
    adapters on every rank).

    Raises:
        ValueError: an unknown `config.method` (naming the closest known one), before any data is read.
    """
    config = config or FisherConfig()
    entry = get_method(config.method)  # a misspelled method fails here, not after the pass over the data
    targets = find_target_layers(model, adapter_name, target_modules)
    with_grad_mean = config.collect_grad_mean
    if with_grad_mean is None:
        with_grad_mean = "grad_mean" in entry.statistics_needed(config)
    with zero_adapters_bypassed(targets):
        return collect_statistics(model, targets, dataloader, config, loss_fn, sample_fn, with_grad_mean)


def initialize_lora_fisher(
    model: nn.Module,
    stats_or_dataloader: FisherStats | Iterable[Any] | None,
    config: FisherConfig | None = None,
    *,
    adapter_name: str = "default",
    loss_fn: LossFn | None = None,
    sample_fn: SampleFn | None = None,
) -> list[LayerReport]:
    """Initialize the LoRA adapter of a PEFT model in the Fisher subspace of the data.

    Writes `lora_A`, `lora_B` and the residual base weight `W - s B A` of every LoRA layer of
    `adapter_name`, in each layer's dtype; the model's outputs are unchanged (except for a method that
    declares a real first step, `preserves_function=False`, which writes no residual). With
    `config.rank_allocation="fisher"` each layer's adapter is first re-created at its allocated rank
    (same total rank, same scaling; recorded in the adapter config's `rank_pattern`/`alpha_pattern`),
    so create any optimizer after this call. All layers are
    computed before any is written, so an error leaves the model untouched. A layer whose weight
    is tied to another parameter (e.g. `lm_head` with `tie_word_embeddings=True`) gets its own copy
    first, with a warning and `LayerReport.untied_from`. A `torch.compile`d model works as the
    model inside it.

    Args:
        model: a `PeftModel` with a LoRA adapter.
        stats_or_dataloader: `FisherStats` from `collect_fisher` (checked against the model's
            weights), or a dataloader to collect them from now, or None for data-free methods.
        config: `FisherConfig` (method, damping, scale rules).

    Returns:
        one `LayerReport` per layer (captured Fisher energy, damping used).

    Raises:
        ValueError: before reading any data, if a targeted layer also holds another adapter
            (writing the residual would change its outputs) or the adapter is not at zero (created
            with `init_lora_weights="pissa"` etc., trained, or already initialized).
    """
    config = config or FisherConfig()
    initializer = get_initializer(config.method)
    check_can_initialize(model, adapter_name)
    stats: FisherStats | None
    if stats_or_dataloader is None or isinstance(stats_or_dataloader, FisherStats):
        stats = stats_or_dataloader
    elif isinstance(stats_or_dataloader, Mapping):
        raise TypeError("pass a FisherStats (from collect_fisher or FisherStats.load) or a dataloader, not a dict")
    elif initializer.statistics_needed(config):
        stats = collect_fisher(model, stats_or_dataloader, config, adapter_name=adapter_name,
                               loss_fn=loss_fn, sample_fn=sample_fn)
    else:
        stats = None
    return write_adapters(model, stats, config, adapter_name)
