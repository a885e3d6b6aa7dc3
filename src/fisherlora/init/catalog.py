"""The method catalogue: one entry per initialization method, whoever implements it.

Everything that lists, validates, builds, benchmarks, tests or documents methods reads this one
catalogue: `fisherlora.METHODS`, `fisherlora methods`, the command-line choices, the benchmark
presets' method lists and learning-rate rules, the report's notion of a baseline, the README's
methods table and the test sweeps. An entry comes from one decorated function:

- `register_initializer` (in `init/registry.py`) for this project's pure-function initializers
  (families "fisher", "paper", "weight"),
- `register_method` with a `build` function for methods run through PEFT's own code (family "peft",
  see `fisherlora/peft_baselines.py`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

Family = Literal["peft", "paper", "fisher", "weight"]
"""Where a method comes from: PEFT's own implementation, a paper re-implemented here, this project's
Fisher family, or a weight-only method that PEFT does not ship."""
FAMILIES: tuple[str, ...] = get_args(Family)

Statistic = Literal["act_cov", "grad_cov", "grad_mean"]
"""The statistics a method reads: `A` (input second moment), `G` (output-gradient second moment),
`M` (mean weight gradient per example)."""
KRONECKER: tuple[Statistic, ...] = ("act_cov", "grad_cov")
KRONECKER_AND_GRADIENT: tuple[Statistic, ...] = ("act_cov", "grad_cov", "grad_mean")

# The collection settings that change the statistics a method sees (progress bars, layer groups
# and the statistics' device cannot change a result and are not listed).
STATISTICS_SETTINGS: tuple[str, ...] = ("fisher", "num_batches", "n_samples", "collect_grad_mean",
                                        "loss_reduction", "seed", "sketch_threshold", "sketch_rank",
                                        "sketch_seed", "damping")
# Fisher rank allocation (`FisherConfig.rank_allocation="fisher"`) reads A and G for every layer, whatever
# the method; it applies to this project's pure-function initializers only.
ALLOCATION_STATISTICS: tuple[Statistic, ...] = KRONECKER
ALLOCATION_SETTINGS: tuple[str, ...] = ("rank_allocation",)


@dataclass(frozen=True)
class MethodEntry:
    """One initialization method.

    Attributes:
        name: what users pass (`FisherConfig.method`, `--method`, `--methods`).
        family: "peft", "paper", "fisher" or "weight" (see `Family`).
        description: one line for `fisherlora methods` and the README.
        zero_start: the adapter starts at zero (`B = 0`), so the base weight is untouched.
        preserves_function: the model's outputs are unchanged at step 0 (zero start, or a residual
            `W - s B A` written into the base weight). False for methods that take a real first step.
        balanced_factors: a non-zero adapter starts with `||A||_F == ||B||_F` (checked by the tests);
            False for a published method whose own factors are not balanced (e.g. LoRA-DA).
        statistics: the Fisher statistics it may read (empty: none of ours); the union over its options
            when `statistics_for` narrows it per run.
        statistics_for: `statistics_for(options) -> statistics` for a method whose needs depend on its
            options (e.g. `fisher_zero` reads `M` only for its gradient sources); None: `statistics`.
        uses_data: it sees the calibration batches (every method with `statistics`, and PEFT's
            data-aware initializers).
        linear_only: PEFT implements it for `nn.Linear` only (the vision benchmark runs it on 1x1
            convolutions rewritten as linear layers).
        options: its options dataclass (`FisherConfig.options`), or None when it has none.
        function: this project's pure function `(W, geometry, r, s, options) -> (A, B)`, or None.
        build: for PEFT's methods, `build(base, adapter_spec, calibration, config) -> PeftModel`.
        benchmark_variants: suffixes the benchmark also runs it with (e.g. "@true": the true Fisher).
    """

    name: str
    family: Family
    description: str
    zero_start: bool = False
    preserves_function: bool = True
    balanced_factors: bool = True
    statistics: tuple[Statistic, ...] = ()
    uses_data: bool = False
    linear_only: bool = False
    options: type | None = None
    function: Callable[..., Any] | None = None
    build: Callable[..., Any] | None = None
    benchmark_variants: tuple[str, ...] = ()
    statistics_for: Callable[[Any], tuple[Statistic, ...]] | None = None

    @property
    def needs_statistics(self) -> bool:
        """Whether it may read statistics (and so may need `collect_fisher`); see `statistics_needed`
        for what one run reads."""
        return bool(self.statistics)

    @property
    def needs_grad_mean(self) -> bool:
        return "grad_mean" in self.statistics

    @property
    def allows_rank_allocation(self) -> bool:
        """Fisher rank allocation applies to this project's pure-function initializers (PEFT's methods
        build their own adapters)."""
        return self.function is not None

    def statistics_with(self, options: Any) -> tuple[Statistic, ...]:
        """The statistics the method itself reads with these (resolved) options."""
        return self.statistics_for(options) if self.statistics_for is not None else self.statistics

    def statistics_needed(self, config: Any) -> tuple[Statistic, ...]:
        """The statistics a run of this method with `config` (a `FisherConfig`) reads: the method's own
        (per its options) and, with `rank_allocation="fisher"`, `A` and `G` for the allocation.

        Raises:
            TypeError: options of another method. ValueError: Fisher rank allocation asked of a
            method built by PEFT.
        """
        own = self.statistics_with(self.resolve_options(config.options))
        if getattr(config, "rank_allocation", "uniform") == "uniform":
            return own
        if not self.allows_rank_allocation:
            raise ValueError(f"method {self.name!r} is built by PEFT: Fisher rank allocation "
                             "(rank_allocation='fisher') applies to this project's initializers only")
        return (*own, *(name for name in ALLOCATION_STATISTICS if name not in own))

    @property
    def is_baseline(self) -> bool:
        """Every method outside this project's Fisher family is a baseline in the benchmark."""
        return self.family != "fisher"

    @property
    def reads(self) -> tuple[str, ...]:
        """The `FisherConfig` fields that can change its result under any config (its benchmark run
        identity); `reads_for` adds what one config makes it read."""
        settings = STATISTICS_SETTINGS if self.statistics else ()
        settings = (*settings, *ALLOCATION_SETTINGS) if self.allows_rank_allocation else settings
        return (*settings, "options") if self.options is not None else settings

    def reads_for(self, config: Any) -> tuple[str, ...]:
        """`reads`, plus the statistics settings when `config` makes a method without statistics of its
        own read some (Fisher rank allocation)."""
        if self.statistics or not self.statistics_needed(config):
            return self.reads
        return (*STATISTICS_SETTINGS, *self.reads)

    def resolve_options(self, options: Any) -> Any:
        """`options` checked against this method's options dataclass; None -> its defaults.

        Raises:
            TypeError: options of another method (named in the message).
        """
        if self.options is None:
            if options is not None:
                raise TypeError(f"method {self.name!r} takes no options, got {type(options).__name__}")
            return None
        if options is None:
            return self.options()
        if not isinstance(options, self.options):
            raise TypeError(f"method {self.name!r} takes {self.options.__name__} options, "
                            f"got {type(options).__name__}")
        return options


CATALOG: dict[str, MethodEntry] = {}

# Families in the order `fisherlora methods` and the README list them: baselines first.
_FAMILY_ORDER = {"peft": 0, "paper": 1, "weight": 2, "fisher": 3}


def add_entry(entry: MethodEntry) -> MethodEntry:
    """Add an entry; a second entry of the same name, an unknown family or a bad options type is refused."""
    if entry.name in CATALOG:
        raise ValueError(f"method {entry.name!r} is registered twice")
    if entry.family not in FAMILIES:
        raise ValueError(f"method {entry.name!r}: family must be one of {FAMILIES}, got {entry.family!r}")
    if entry.zero_start and not entry.preserves_function:
        raise ValueError(f"method {entry.name!r}: a zero-start adapter always preserves the function")
    if (entry.function is None) == (entry.build is None):
        raise ValueError(f"method {entry.name!r}: give exactly one of a pure function or a PEFT build function")
    if entry.options is not None:
        fields(entry.options)  # raises TypeError for a non-dataclass
    CATALOG[entry.name] = entry
    return entry


def remove_entry(name: str) -> None:
    """Forget a method (for tests that register a throwaway one)."""
    CATALOG.pop(name, None)


def register_method(name: str, family: Family, description: str, **properties: Any) -> Callable[[Any], Any]:
    """Decorator for a method built by a `build` function (PEFT's own initializers)."""

    def decorate(build: Callable[..., Any]) -> Callable[..., Any]:
        add_entry(MethodEntry(name=name, family=family, description=description, build=build, **properties))
        return build

    return decorate


def ordered_entries() -> list[MethodEntry]:
    """Every entry, baselines first (PEFT, paper, weight-only), then the Fisher family, each in
    registration order."""
    return sorted(CATALOG.values(), key=lambda entry: _FAMILY_ORDER[entry.family])


def unknown_name_error(kind: str, name: str, known: list[str]) -> ValueError:
    """`ValueError` for an unknown `kind` ("method", "initializer") called `name`: the closest known
    name when one is close (a typo), and every known one."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint}; choose one of {known}")


def get_method(name: str) -> MethodEntry:
    """The entry called `name`.

    Raises:
        ValueError: unknown name, with the closest known one and the list of known ones.
    """
    if name not in CATALOG:
        raise unknown_name_error("method", name, [entry.name for entry in ordered_entries()])
    return CATALOG[name]
