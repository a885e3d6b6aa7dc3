"""Configuration dataclasses, one per concern.

- `CollectionConfig`: how statistics are collected (Fisher type, batches, sketches, passes).
- `FisherConfig(CollectionConfig)`: what the user passes: the collection settings plus the method,
  the damping every statistics-based initializer applies, and that method's own options.
- Each initializer declares its own options dataclass (like PEFT's `LoraGAConfig`/`EvaConfig`);
  `FisherConfig.options` holds an instance of it, `None` meaning the method's defaults.

Closed sets are `Literal` types (mypy checks callers, `__post_init__` checks values at run time);
open sets (methods, tasks) are registries. Field metadata drives the command line (`help`, `flag`)
and run identity (`identity`, `neutral`): see `identity_fields`.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, Literal, get_args, get_origin

FisherType = Literal["empirical", "true"]
LossReduction = Literal["sum", "mean"]
RankAllocation = Literal["uniform", "fisher"]

FISHER_TYPES: tuple[str, ...] = get_args(FisherType)


def check_choice(owner: str, field_name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise `ValueError` naming `owner.field_name` when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{owner}.{field_name} must be one of {choices}, got {value!r}")


def check_literals(instance: Any) -> None:
    """Check every `Literal`-typed field of a dataclass instance against its allowed values."""
    hints = typing.get_type_hints(type(instance))
    for item in fields(instance):
        hint = hints.get(item.name)
        if typing.get_origin(hint) is Literal:
            check_choice(type(instance).__name__, item.name, getattr(instance, item.name), get_args(hint))


def field_value_type(field_type: Any) -> tuple[Any, tuple[Any, ...] | None, bool]:
    """`(base type, choices, optional)` of a dataclass field's annotation: a `Literal` gives its values
    as the choices (and their type as the base), `X | None` is optional."""
    optional = False
    if get_origin(field_type) in (typing.Union, UnionType):
        members = [member for member in get_args(field_type) if member is not type(None)]
        optional = len(members) < len(get_args(field_type))
        field_type = members[0]
    if get_origin(field_type) is Literal:
        choices = get_args(field_type)
        return type(choices[0]), choices, optional
    return field_type, None, optional


_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def field_from_text(owner: type, name: str, text: str) -> Any:
    """The value of field `name` of the dataclass `owner`, written as `text` (e.g. in a benchmark
    method name): one of a `Literal`'s values, an int, a finite float, a bool (true/false, yes/no,
    on/off, 1/0) or a str; `none` for a field that may be None.

    Raises:
        ValueError: `owner` has no such field (the message lists its fields), or `text` is not a value
            of the field's type (the message gives the allowed values or the type).
    """
    hints = typing.get_type_hints(owner)
    known = [item.name for item in fields(owner) if item.init]
    if name not in known:
        raise ValueError(f"{owner.__name__} has no field {name!r} (known: {', '.join(known)})")
    base, choices, optional = field_value_type(hints[name])
    if optional and text.lower() == "none":
        return None
    allowed = (" or ".join(repr(choice) for choice in choices) if choices is not None
               else {bool: "true or false", int: "an integer", float: "a finite number", str: "text"}.get(base))
    if allowed is None:
        raise ValueError(f"{owner.__name__}.{name} ({base}) cannot be given as text")
    allowed += " or none" if optional else ""
    value: Any = None
    if base is bool:
        if text.lower() in _TRUE_WORDS + _FALSE_WORDS:
            value = text.lower() in _TRUE_WORDS
    else:
        try:
            value = base(text)
        except ValueError:
            pass
        if isinstance(value, float) and not math.isfinite(value):
            value = None
    if value is None or (choices is not None and value not in choices):
        raise ValueError(f"{owner.__name__}.{name} must be {allowed}, got {text!r}")
    return value


def identity_fields(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass that identify a result (a benchmark run id hashes them).

    A field is left out when its metadata says `identity=False` (it cannot change a result, e.g. a
    progress bar), or when it declares a `neutral` value and has it: a field added after results
    exist declares the value under which it changes nothing, so adding it keeps every existing run
    id. Nested dataclasses (method options) are expanded the same way.

    Returns:
        field name -> JSON-able value.
    """
    values: dict[str, Any] = {}
    for item in fields(config):
        if not item.metadata.get("identity", True):
            continue
        value = getattr(config, item.name)
        if "neutral" in item.metadata and value == item.metadata["neutral"]:
            continue
        values[item.name] = identity_fields(value) if is_dataclass(value) and not isinstance(value, type) else value
    return values


@dataclass
class CollectionConfig:
    """How Kronecker-factored statistics are collected.

    Attributes:
        fisher: "empirical" (gradients of the data's own labels) or "true" (labels sampled from
            the model's predictive distribution, `n_samples` draws per input; needs no labels).
        num_batches: batches of the dataloader to use; `None` uses all of them.
        n_samples: label draws per input for the true Fisher.
        collect_grad_mean: also collect `M` (mean gradient per example). `None` collects it only
            when the method needs it.
        loss_reduction: only for a custom `loss_fn`: "mean" says the loss is averaged over its
            loss units (labels != -100 after the causal shift for 2-D labels, else examples), and
            is multiplied back so statistics do not depend on the batch size.
        seed: seed of the label sampling of the true Fisher.
        progress: show a progress bar while collecting and while computing the layers' factors (on a
            terminal; when stderr is not one, e.g. a log file, one line per pass and one for the factors).
        sketch_threshold: a Kronecker factor whose dimension (`d_in` for `A`, `d_out` for `G`)
            exceeds it is kept as a low-rank Nystrom sketch (`stats.sketch.LowRankFactor`, `d * k`
            floats) instead of a dense `d x d` matrix; `None` keeps every factor dense.
        sketch_rank: `k`, the sketch size (clipped to `d`; `k = d` reproduces the exact factor).
        sketch_seed: seed of the sketches' Gaussian test matrices (per layer and side; identical on
            every `torch.distributed` rank).
        layer_groups: collect the layers in this many contiguous groups, one pass over the data per
            group: the accumulators of one group only are alive at a time (peak memory divided by
            about `layer_groups`) for `layer_groups` times the forward/backward time.
        stats_device: where finished statistics are kept (e.g. "cpu"); `None` keeps them on the
            layer's device.
    """

    fisher: FisherType = field(default="empirical", metadata={"help": "Fisher type"})
    num_batches: int | None = field(default=32, metadata={"help": "calibration batches (none: all)",
                                                          "flag": "--batches"})
    n_samples: int = field(default=1, metadata={"help": "label draws per input for --fisher true",
                                                "flag": "--samples"})
    collect_grad_mean: bool | None = field(default=None, metadata={"cli": False})
    loss_reduction: LossReduction = field(default="sum", metadata={"cli": False})
    seed: int = field(default=0, metadata={"cli": False})
    progress: bool = field(default=True, metadata={"identity": False, "cli": False})
    sketch_threshold: int | None = field(default=None, metadata={
        "help": "keep factors wider than this as rank --sketch-rank sketches (none: all dense)"})
    sketch_rank: int = field(default=256, metadata={"help": "sketch size k"})
    sketch_seed: int = field(default=0, metadata={"cli": False})
    layer_groups: int = field(default=1, metadata={
        "identity": False, "help": "collect in this many passes, one group of layers each (less memory)"})
    stats_device: str | None = field(default=None, metadata={"identity": False, "cli": False})

    def __post_init__(self) -> None:
        check_literals(self)
        owner = type(self).__name__
        if self.num_batches is not None and self.num_batches < 1:
            raise ValueError(f"{owner}.num_batches must be >= 1 or None, got {self.num_batches}")
        if self.n_samples < 1:
            raise ValueError(f"{owner}.n_samples must be >= 1, got {self.n_samples}")
        if self.sketch_threshold is not None and self.sketch_threshold < 1:
            raise ValueError(f"{owner}.sketch_threshold must be >= 1 or None, got {self.sketch_threshold}")
        if self.sketch_rank < 1:
            raise ValueError(f"{owner}.sketch_rank must be >= 1, got {self.sketch_rank}")
        if self.layer_groups < 1:
            raise ValueError(f"{owner}.layer_groups must be >= 1, got {self.layer_groups}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FisherConfig(CollectionConfig):
    """What to collect (see `CollectionConfig`) and how to initialize the adapter.

    Attributes:
        method: initializer name, one of `fisherlora.INITIALIZERS`. The default, `fisher_svd`, is the
            pick of the benchmark's default-method rule on its stage-2 validation metrics: the best
            mean rank over the text, lm and vision tasks among the Fisher variants never ranked last
            among them on a task (`bench/default_rule.py`; README, "Which variant is the default").
        damping: relative damping `lambda`: factors become `F + lambda * mean(diag F) * I` before
            any root or inverse (dimensionless).
        options: the method's options dataclass (e.g. `FisherGradOptions(scale="unit")`); `None`
            uses that method's defaults. An instance of another method's options is refused.
        rank_allocation: "uniform" keeps each layer's rank as the PEFT model was created; "fisher"
            spreads the same total number of ranks over the layers in proportion to each layer's
            Fisher energy, re-creating each adapter at its rank (`init/allocation.py`; recorded as
            PEFT's `rank_pattern`). Needs `A` and `G`, whatever the method.
        captured_energy: also compute each layer's captured Fisher energy (`LayerReport.captured_energy`,
            the fraction of `||G^1/2 W A^1/2||_F^2` the adapter holds). A diagnostic, off by default:
            where the method did not form it, its denominator costs a product of `W` with both
            K-FAC factors per layer (about a third of `fisher_eig`'s initialization on SmolLM2-135M
            with every linear layer targeted). It changes no factor.
    """

    method: str = field(default="fisher_svd", metadata={"cli": False})
    damping: float = field(default=1e-3, metadata={"help": "relative damping of A and G"})
    options: Any = field(default=None, metadata={"cli": False})
    # Added after results existed: "uniform" (what every earlier run did) leaves run ids unchanged.
    rank_allocation: RankAllocation = field(default="uniform", metadata={
        "neutral": "uniform", "help": "'fisher': spread the total rank over layers by Fisher energy"})
    captured_energy: bool = field(default=False, metadata={
        "identity": False, "help": "report each layer's captured Fisher energy (a diagnostic; costs a product "
                                   "of W with both factors per layer)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.damping < 0:
            raise ValueError(f"FisherConfig.damping must be >= 0, got {self.damping}")
        if self.options is not None and not is_dataclass(self.options):
            raise TypeError(f"FisherConfig.options must be a method's options dataclass, got {self.options!r}")
