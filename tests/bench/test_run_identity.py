"""Run identity: a run id hashes only what can change the run's result, so adding a config field
(or changing a field a method does not read) never changes an existing run id."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import pytest

import fisherlora as fl
from fisherlora.bench.baselines import method_identity, parse_method
from fisherlora.bench.runner import RunSpec, TrainingConfig
from fisherlora.config import CollectionConfig, FisherConfig, identity_fields
from fisherlora.init.catalog import ordered_entries
from fisherlora.init.fisher_zero_step import FisherStepOptions, FisherZeroOptions
from fisherlora.init.paper import LoraDAOptions, LoraGAPaperOptions, LoraOneOptions

# The fields that existed when run identity was introduced. A field added later must declare the
# value under which it changes nothing (metadata "neutral") or that it never changes a result
# (metadata identity=False); otherwise every committed run id would change with it.
ORIGINAL_FIELDS = {
    TrainingConfig: {"rank", "alpha", "batch_size", "epochs", "max_steps", "calibration_batches",
                     "calibration_batch_size", "warmup_fraction", "weight_decay", "max_grad_norm", "curve_points"},
    FisherConfig: {"fisher", "num_batches", "n_samples", "collect_grad_mean", "loss_reduction", "seed", "progress",
                   "sketch_threshold", "sketch_rank", "sketch_seed", "layer_groups", "stats_device", "method",
                   "damping", "options"},
    fl.FisherGradOptions: {"scale", "gamma", "step"},
    fl.FisherEigOptions: {"scale", "gamma"},
    # The options a method was introduced with (no run of it existed before).
    LoraOneOptions: {"gamma"},
    LoraGAPaperOptions: {"gamma"},
    LoraDAOptions: {"gamma", "variance_beta", "population_size"},
    FisherZeroOptions: {"source"},
    FisherStepOptions: {"gamma"},
}


RESULTS = Path(__file__).resolve().parents[2] / "results"


def methods_with_committed_runs() -> set[str]:
    """The registered methods (suffixes stripped) that some committed benchmark record ran."""
    names = set()
    for path in RESULTS.glob("**/runs.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                names.add(parse_method(json.loads(line)["method"]).name)
    return names


def spec(method: str = "fisher_grad", **changes: object) -> RunSpec:
    settings: dict[str, object] = {"progress": False, **changes}
    return RunSpec(task="text", method=method, seed=0, lr=1e-3, fisher=FisherConfig(**settings))  # type: ignore[arg-type]


@pytest.mark.parametrize("config_class", [TrainingConfig, FisherConfig,
                                          *{entry.options for entry in ordered_entries() if entry.options}],
                         ids=lambda cls: cls.__name__)
def test_every_new_config_field_is_identity_neutral(config_class: type):
    owners = {entry.name for entry in ordered_entries() if entry.options is config_class}
    if config_class not in ORIGINAL_FIELDS and owners and not owners & methods_with_committed_runs():
        return  # a new method's options: no committed run id can read them (list them once runs exist)
    original = ORIGINAL_FIELDS.get(config_class, set())
    for item in fields(config_class):
        if item.name in original:
            continue
        declared = "neutral" in item.metadata or item.metadata.get("identity", True) is False
        name = config_class.__name__
        assert declared, (
            f"{name}.{item.name} is not among the fields ORIGINAL_FIELDS (tests/bench/test_run_identity.py) lists "
            f"for {name}. If {name} belongs to a method you are adding, list the fields it is introduced with there "
            "(no committed run id uses them yet); if you added the field to an existing class, declare metadata "
            "neutral=<value that changes nothing> (or identity=False) so that committed run ids stay valid")


def test_adding_a_field_with_its_neutral_value_keeps_the_run_id():
    @dataclass
    class LongerTraining(TrainingConfig):
        label_smoothing: float = field(default=0.0, metadata={"neutral": 0.0})

    before = RunSpec(task="text", method="lora", seed=0, lr=1e-3, training=TrainingConfig())
    after = replace(before, training=LongerTraining())
    assert after.run_id() == before.run_id()
    assert replace(before, training=LongerTraining(label_smoothing=0.1)).run_id() != before.run_id()


def test_a_method_is_identified_only_by_the_fields_it_reads():
    # PEFT's LoRA reads no FisherConfig field: damping, Fisher type or sketch change nothing.
    lora = RunSpec(task="text", method="lora", seed=0, lr=1e-3)
    assert method_identity("lora", FisherConfig(damping=0.5, sketch_threshold=8)) == {}
    assert replace(lora, fisher=FisherConfig(damping=0.5)).run_id() == lora.run_id()
    # A Fisher method reads the damping and its own options, not another method's.
    assert spec(damping=1e-2).run_id() != spec().run_id()
    assert spec(options=fl.FisherGradOptions(gamma=4.0)).run_id() != spec().run_id()
    assert spec(options=fl.FisherGradOptions()).run_id() == spec().run_id()  # None means the defaults
    assert spec(progress=True, layer_groups=3, stats_device="cpu").run_id() == spec().run_id()


def test_identity_fields_drop_neutral_and_non_identity_fields():
    values = identity_fields(CollectionConfig(progress=True, layer_groups=4))
    assert "progress" not in values and "layer_groups" not in values and values["fisher"] == "empirical"


def test_options_of_another_method_are_refused():
    with pytest.raises(TypeError, match="fisher_eig.*FisherEigOptions"):
        method_identity("fisher_eig", FisherConfig(options=fl.FisherGradOptions()))


def test_a_new_methods_options_are_listed_only_once_it_has_committed_runs(monkeypatch: pytest.MonkeyPatch):
    import sys

    module = sys.modules[__name__]
    assert {"lora", "corda", "fisher_svd", "fisher_step"} <= methods_with_committed_runs()
    monkeypatch.delitem(ORIGINAL_FIELDS, FisherStepOptions)
    monkeypatch.setattr(module, "methods_with_committed_runs", lambda: set())
    test_every_new_config_field_is_identity_neutral(FisherStepOptions)  # a method being added: nothing to list
    monkeypatch.setattr(module, "methods_with_committed_runs", lambda: {"fisher_step"})
    with pytest.raises(AssertionError, match="list the fields it is introduced with"):
        test_every_new_config_field_is_identity_neutral(FisherStepOptions)
