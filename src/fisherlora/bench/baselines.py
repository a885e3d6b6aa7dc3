"""Benchmark method names: a catalogue method plus suffixes, and the model each one builds.

A method name may carry a Fisher type: `fisher_svd@true` is `fisher_svd` with the true Fisher,
a sketch: `fisher_svd+sketch64` keeps every factor wider than 64 as a rank-64 Nystrom sketch,
a view: `pissa+linear` runs PiSSA on targeted 1x1 convolutions rewritten as `nn.Linear`, and
Fisher rank allocation: `fisher_zero+alloc` spreads the same total rank over the layers by their
Fisher energy (`FisherConfig.rank_allocation="fisher"`), and method options: `+KEY=VALUE` sets field
KEY of the method's options dataclass (`MethodEntry.options`, e.g. `FisherZeroOptions`) to VALUE,
read as the field's type (a `Literal`'s values, int, float, bool as true/false, `none` where None is
allowed): `fisher_zero+source=gradient` is `fisher_zero` with `FisherZeroOptions(source="gradient")`,
and `fisher_step+gamma=64+alloc` combines with the other suffixes. A VALUE holds no `+` or `@`
(write `1e3`, not `1e+3`). Suffixes may come in any order; `@FISHER` comes last. The
methods themselves (and how each is built) are the catalogue's (`fisherlora.init.catalog`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..config import FISHER_TYPES, FisherConfig, FisherType, RankAllocation, field_from_text, identity_fields
from ..init.catalog import CATALOG, MethodEntry, get_method, ordered_entries
from ..peft_baselines import AdapterSpec, build_lora_model
from .pointwise import pointwise_convs_as_linear_


@dataclass(frozen=True)
class MethodName:
    """A benchmark method name taken apart: ``NAME[+sketchK][+linear][+alloc][+KEY=VALUE...][@FISHER]``.

    Attributes:
        name: the registered method (`pissa`, `fisher_svd`, ...).
        fisher: "empirical" (no suffix) or "true" (``@true``).
        sketch_rank: K of a ``+sketchK`` suffix (sketched statistics), else None.
        linear_view: ``+linear``: targeted 1x1 convolutions are presented as ``nn.Linear``
            (:mod:`.pointwise`), so PEFT's linear-only initializers can run on them.
        rank_allocation: "fisher" for ``+alloc``, else "uniform".
        options: the ``+KEY=VALUE`` suffixes as ``(KEY, VALUE)`` text pairs sorted by KEY (typed and
            checked against the method's options dataclass by :func:`effective_config`).
    """

    name: str
    fisher: FisherType = "empirical"
    sketch_rank: int | None = None
    linear_view: bool = False
    rank_allocation: RankAllocation = "uniform"
    options: tuple[tuple[str, str], ...] = ()


def parse_method(method: str) -> MethodName:
    """``"fisher_svd+sketch64@true"`` -> ``MethodName("fisher_svd", "true", 64, False, "uniform")``;
    ``"fisher_zero+source=gradient"`` -> ``MethodName("fisher_zero", options=(("source", "gradient"),))``.

    Raises:
        ValueError: for an unknown suffix, a malformed ``+sketchK`` or ``+KEY=VALUE``, or a KEY given twice.
    """
    body, _, fisher = method.partition("@")
    name, *suffixes = body.split("+")
    sketch_rank = None
    linear_view = False
    rank_allocation: RankAllocation = "uniform"
    options: dict[str, str] = {}
    for index, suffix in enumerate(suffixes):
        if "=" in suffix:
            key, _, value = suffix.partition("=")
            if not key or not value:
                raise ValueError(f"method {method!r}: write a method option as +KEY=VALUE, "
                                 "e.g. fisher_zero+source=gradient")
            if key in options:
                raise ValueError(f"method {method!r}: option {key!r} is given twice")
            options[key] = value
        elif suffix == "linear":
            linear_view = True
        elif suffix == "alloc":
            rank_allocation = "fisher"
        elif suffix.startswith("sketch"):
            digits = suffix[len("sketch"):]
            if not digits.isdigit() or int(digits) < 1:
                raise ValueError(f"method {method!r}: write the sketch rank as +sketchK, e.g. fisher_svd+sketch64")
            sketch_rank = int(digits)
        else:
            exponent = index > 0 and suffixes[index - 1][-1:] in ("e", "E") and "=" in suffixes[index - 1]
            hint = " (a VALUE holds no '+': write 1e3, not 1e+3)" if exponent else ""
            raise ValueError(f"method {method!r}: unknown suffix '+{suffix}' (known: +sketchK, +linear, +alloc, "
                             f"+KEY=VALUE){hint}")
    fisher = fisher or "empirical"
    if fisher not in FISHER_TYPES:
        raise ValueError(f"method {method!r}: the suffix after '@' must be one of {FISHER_TYPES}")
    return MethodName(name, fisher, sketch_rank, linear_view, rank_allocation,  # type: ignore[arg-type]
                      tuple(sorted(options.items())))


def split_method(method: str) -> tuple[str, FisherType]:
    """`"fisher_svd@true"` -> `("fisher_svd", "true")`; no suffix means the empirical Fisher."""
    parsed = parse_method(method)
    return parsed.name, parsed.fisher


def sketch_rank_of(method: str) -> int | None:
    """`"fisher_svd+sketch64"` -> 64; None without a `+sketchK` part."""
    return parse_method(method).sketch_rank


def fisher_statistics_mb(model: nn.Module, method: str, fisher: FisherConfig) -> float | None:
    """MiB of the data statistics one of our methods holds (A and G, dense or sketched, and M for the
    methods that read it), from the model's layer shapes; None for a method that is not ours.

    The sketch comes from a `+sketchK` suffix, else from `fisher.sketch_threshold/sketch_rank`.
    """
    from ..peft import find_target_layers
    from ..stats.layers import weight_matrix
    from ..stats.sketch import layer_statistics_bytes

    initializer = CATALOG.get(parse_method(method).name)
    if initializer is None or initializer.function is None:
        return None
    needed = initializer.statistics_needed(effective_config(method, fisher)[1])
    if not needed:
        return 0.0
    sketch = sketch_rank_of(method)
    threshold, rank = (sketch, sketch) if sketch is not None else (fisher.sketch_threshold, fisher.sketch_rank)
    total = 0
    for target in find_target_layers(model):
        d_out, d_in = (int(v) for v in weight_matrix(target.weight_module, target.layer_type).shape)
        total += layer_statistics_bytes(d_out, d_in, threshold, rank, "grad_mean" in needed)
    return total / 2**20


def known_methods() -> list[str]:
    """Every catalogue method, in the catalogue's order (suffixes not included)."""
    return [entry.name for entry in ordered_entries()]


def method_options(method: str, entry: MethodEntry, options: Any, assignments: Sequence[tuple[str, str]]) -> Any:
    """`options` (None: the defaults) of `entry`'s method with the ``+KEY=VALUE`` assignments of the
    benchmark name `method` applied, each VALUE read as its field's type (`config.field_from_text`).

    Raises:
        ValueError: naming `method`: a method without options, an unknown KEY (with the known ones), a
            VALUE its field does not take (with the allowed values), or options the method refuses.
        TypeError: `options` of another method.
    """
    if not assignments:
        return options
    if entry.options is None:
        raise ValueError(f"method {method!r}: {entry.name!r} takes no options, so no +KEY=VALUE suffix")
    base = entry.resolve_options(options)
    try:
        return replace(base, **{key: field_from_text(entry.options, key, text) for key, text in assignments})
    except ValueError as error:  # an unknown field, a bad value, or the options' own __post_init__ check
        raise ValueError(f"method {method!r}: {error}") from None


def effective_config(method: str, fisher_config: FisherConfig | None = None) -> tuple[MethodEntry, FisherConfig]:
    """The catalogue entry of a benchmark method name and the `FisherConfig` it runs with (the
    method, and the Fisher type, sketch, rank allocation and options of its suffixes, filled in).

    Raises:
        ValueError: unknown method or suffix, a suffix the method cannot take, or a bad option
            (see `method_options`).
    """
    parsed = parse_method(method)
    entry = get_method(parsed.name)
    if parsed.rank_allocation != "uniform" and not entry.allows_rank_allocation:
        raise ValueError(f"method {method!r}: +alloc (Fisher rank allocation) is for this project's initializers; "
                         f"{parsed.name!r} is built by PEFT")
    config = fisher_config or FisherConfig()
    config = replace(config, method=parsed.name, fisher=parsed.fisher, rank_allocation=parsed.rank_allocation,
                     options=method_options(method, entry, config.options, parsed.options))
    if not entry.statistics_needed(config) and ("@" in method or parsed.sketch_rank is not None):
        raise ValueError(f"method {method!r}: a method without Fisher statistics takes no Fisher type or sketch")
    if parsed.sketch_rank is not None:
        config = replace(config, sketch_rank=parsed.sketch_rank, sketch_threshold=parsed.sketch_rank)
    return entry, config


def method_identity(method: str, fisher_config: FisherConfig) -> dict[str, Any]:
    """The settings that identify a run of `method`: only the `FisherConfig` fields its catalogue
    entry declares it reads (`MethodEntry.reads`), so adding a field elsewhere changes no run id."""
    entry, config = effective_config(method, fisher_config)
    if entry.options is not None:
        config = replace(config, options=entry.resolve_options(config.options))
    values = identity_fields(config)
    return {key: values[key] for key in entry.reads_for(config) if key in values}


def build_model(method: str, base: nn.Module, spec: AdapterSpec, calibration: Sequence[Any],
                fisher_config: FisherConfig | None = None) -> nn.Module:
    """Wrap `base` in a PEFT LoRA model initialized by `method` (a catalogue name with suffixes).

    Args:
        method: e.g. `lora`, `pissa+linear`, `fisher_svd@true`, `fisher_eig+sketch64`,
            `fisher_zero+source=gradient`.
        base: a fresh base model (it is modified in place by residual-based methods).
        spec: rank, alpha, targets shared by every method.
        calibration: batches (`model(**batch)` with labels) seen by every data-aware method.
        fisher_config: settings for our methods (method and Fisher type are filled in here).

    Returns:
        the PEFT model, ready to train.
    """
    _, config = effective_config(method, fisher_config)
    if parse_method(method).linear_view:
        spec = replace(spec, target_modules=pointwise_convs_as_linear_(base, spec.target_modules))
    return build_lora_model(base, spec, calibration, config)
