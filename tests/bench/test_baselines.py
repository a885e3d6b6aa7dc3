"""Every method builds a LoRA model whose outputs equal the base model's at step 0."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from fisherlora.bench.baselines import (
    AdapterSpec,
    build_model,
    effective_config,
    known_methods,
    method_identity,
    parse_method,
    sketch_rank_of,
    split_method,
)
from fisherlora.config import FisherConfig, field_from_text
from fisherlora.init.catalog import get_method
from models import text_batches, tiny_bert

SPEC = AdapterSpec(rank=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])


@pytest.mark.parametrize("method", [*known_methods(), "fisher_svd@true", "fisher_svd+sketch4@true", "fisher_zero+alloc",
                                    "milora+alloc"])
def test_every_method_keeps_the_base_function(method: str):
    """...as declared: a method that takes a real first step (`preserves_function=False`, checked as a
    step in test_peft_end_to_end.py) is only checked to build and train."""
    preserves = get_method(parse_method(method).name).preserves_function
    base = tiny_bert()
    batches = text_batches()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        reference = base(**inputs).logits
    model = build_model(method, copy.deepcopy(base), SPEC, batches, FisherConfig(progress=False))
    model.eval()
    with torch.no_grad():
        after = model(**inputs).logits
    assert (after - reference).abs().max() <= 1e-4 or not preserves
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable) and any("classifier" in name for name in trainable)


def test_lora_ga_builds_without_the_outputs_only_hook_warning(recwarn: pytest.WarningsRecorder):
    """PEFT's LoRA-GA hooks made torch warn once per calibration batch that a full backward hook saw
    outputs only (a frozen embedding feeds the first target), noise in every benchmark log."""
    build_model("lora_ga", tiny_bert(), SPEC, text_batches(), FisherConfig(progress=False))
    assert not [w for w in recwarn if "Full backward hook" in str(w.message)]


def test_method_names_are_checked():
    assert split_method("fisher_grad@true") == ("fisher_grad", "true")
    assert split_method("fisher_svd+sketch64@true") == ("fisher_svd", "true")
    assert sketch_rank_of("fisher_svd+sketch64") == 64 and sketch_rank_of("fisher_svd") is None
    with pytest.raises(ValueError, match=r"\+sketchK"):
        sketch_rank_of("fisher_svd+sketch")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_model("nope", tiny_bert(), SPEC, [])
    with pytest.raises(ValueError, match="pissa@true.*takes no Fisher type or sketch"):
        build_model("pissa@true", tiny_bert(), SPEC, [])


def test_the_alloc_suffix_turns_on_fisher_rank_allocation():
    parsed = parse_method("fisher_zero+alloc@true")
    assert (parsed.name, parsed.fisher, parsed.rank_allocation) == ("fisher_zero", "true", "fisher")
    assert parse_method("fisher_zero").rank_allocation == "uniform"
    entry, config = effective_config("fisher_step+alloc", FisherConfig(progress=False))
    assert entry.name == "fisher_step" and config.rank_allocation == "fisher"
    # The run identity: +alloc is a different run; the plain name's identity does not mention the field.
    assert method_identity("fisher_zero+alloc", FisherConfig())["rank_allocation"] == "fisher"
    assert "rank_allocation" not in method_identity("fisher_zero", FisherConfig())
    # A data-free method with +alloc reads the statistics settings (its ranks depend on them).
    assert method_identity("milora", FisherConfig()) == {}
    assert method_identity("milora+alloc", FisherConfig(damping=0.5))["damping"] == 0.5
    with pytest.raises(ValueError, match=r"'lora\+alloc': \+alloc \(Fisher rank allocation\) is for this "
                                         "project's initializers"):
        effective_config("lora+alloc")
    with pytest.raises(ValueError, match=r"unknown suffix '\+allocate'.*\+alloc"):
        parse_method("fisher_zero+allocate")


def _adapter_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}


@pytest.mark.parametrize("suffixes, allocation", [("+source=gradient", "uniform"),
                                                  ("+source=weight+alloc", "fisher")])
def test_an_option_suffix_builds_what_initialize_lora_fisher_builds_with_those_options(suffixes: str, allocation: str):
    from peft import get_peft_model

    from fisherlora import initialize_lora_fisher
    from fisherlora.init.fisher_zero_step import FisherZeroOptions

    source = parse_method("fisher_zero" + suffixes).options[0][1]
    batches = text_batches()
    torch.manual_seed(0)
    built = build_model("fisher_zero" + suffixes, tiny_bert(), SPEC, batches, FisherConfig(progress=False))
    torch.manual_seed(0)
    direct = get_peft_model(tiny_bert(), SPEC.lora_config())
    initialize_lora_fisher(direct, batches, FisherConfig(progress=False, method="fisher_zero",
                                                         rank_allocation=allocation,
                                                         options=FisherZeroOptions(source=source)))
    expected = _adapter_factors(direct)
    got = _adapter_factors(built)
    assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in expected)
    # ...and the suffix changed something: the default source (natural_gradient) gives other directions.
    torch.manual_seed(0)
    default = _adapter_factors(build_model("fisher_zero" + suffixes.replace(f"+source={source}", ""), tiny_bert(),
                                           SPEC, batches, FisherConfig(progress=False)))
    assert any(not torch.equal(default[name], got[name]) for name in got if "lora_A" in name)


def test_option_suffixes_are_typed_by_the_methods_options_dataclass():
    _, config = effective_config("fisher_step+gamma=64+alloc@true", FisherConfig(progress=False))
    assert (config.options.gamma, type(config.options.gamma)) == (64.0, float)
    assert (config.rank_allocation, config.fisher) == ("fisher", "true")
    _, config = effective_config("lora_da+population_size=4+variance_beta=0.5")
    assert (config.options.population_size, config.options.variance_beta, config.options.gamma) == (4, 0.5, 1024.0)
    assert effective_config("lora_da+population_size=none")[1].options.population_size is None
    # Suffix order does not matter; options set on the config are kept where the name sets nothing.
    assert parse_method("fisher_zero+alloc+source=gradient") == parse_method("fisher_zero+source=gradient+alloc")
    from fisherlora.init.paper import LoraDAOptions

    _, config = effective_config("lora_da+gamma=8", FisherConfig(options=LoraDAOptions(variance_beta=0.1)))
    assert (config.options.gamma, config.options.variance_beta) == (8.0, 0.1)


@dataclass
class Settings:
    flag: bool = False
    label: str = "x"
    level: Literal[1, 2] = 1
    limit: int | None = None


def test_field_from_text_reads_each_field_type():
    flags = [field_from_text(Settings, "flag", text) for text in ("true", "No", "1", "off")]
    assert flags == [True, False, True, False]
    assert field_from_text(Settings, "label", "a=b") == "a=b" and field_from_text(Settings, "level", "2") == 2
    assert field_from_text(Settings, "limit", "None") is None and field_from_text(Settings, "limit", "7") == 7
    for name, text, message in (("flag", "maybe", "must be true or false, got 'maybe'"),
                                ("level", "3", "must be 1 or 2, got '3'"), ("limit", "x", "an integer or none"),
                                ("size", "1", r"no field 'size' \(known: flag, label, level, limit\)")):
        with pytest.raises(ValueError, match=message):
            field_from_text(Settings, name, text)


@pytest.mark.parametrize("method, message", [
    ("fisher_zero+source=gradiant", r"'fisher_zero\+source=gradiant': FisherZeroOptions.source must be 'weight' or "
                                    r"'natural_gradient' or 'gradient', got 'gradiant'"),
    ("fisher_zero+sorce=gradient", r"'fisher_zero\+sorce=gradient': FisherZeroOptions has no field 'sorce' "
                                   r"\(known: source\)"),
    ("lora+source=gradient", r"'lora\+source=gradient': 'lora' takes no options"),
    ("fisher_svd+source=gradient", r"'fisher_svd' takes no options"),
    ("fisher_step+gamma=fast", r"FisherStepOptions.gamma must be a finite number, got 'fast'"),
    ("fisher_step+gamma=nan", r"FisherStepOptions.gamma must be a finite number, got 'nan'"),
    ("fisher_step+gamma=-1", r"'fisher_step\+gamma=-1': FisherStepOptions.gamma must be > 0"),
    ("lora_da+population_size=4.5", r"LoraDAOptions.population_size must be an integer or none, got '4.5'"),
    ("fisher_zero+source=", r"write a method option as \+KEY=VALUE"),
    ("fisher_zero+=gradient", r"write a method option as \+KEY=VALUE"),
    ("fisher_zero+source=gradient+source=weight", r"option 'source' is given twice"),
    ("fisher_step+gamma=1e+3", r"unknown suffix '\+3'.*write 1e3, not 1e\+3"),
])
def test_bad_option_suffixes_are_refused_naming_the_method_and_the_allowed_values(method: str, message: str):
    with pytest.raises(ValueError, match=message):
        effective_config(method)


def test_an_option_suffix_is_a_different_run_and_plain_names_keep_their_identity():
    config = FisherConfig(progress=False, method="fisher_select")
    identities = [method_identity(f"fisher_zero+source={source}", config)
                  for source in ("weight", "natural_gradient", "gradient")]
    assert [identity["options"] for identity in identities] == [{"source": s} for s in
                                                                 ("weight", "natural_gradient", "gradient")]
    # The plain name is the default source (natural_gradient), with the same identity as naming it.
    assert method_identity("fisher_zero", config) == identities[1]
    assert method_identity("fisher_zero+alloc", config)["options"] == {"source": "natural_gradient"}


def test_every_declared_benchmark_variant_is_a_valid_method_name():
    from fisherlora.bench.presets import PRESETS
    from fisherlora.init.catalog import ordered_entries

    for entry in ordered_entries():
        for variant in entry.benchmark_variants:
            effective_config(entry.name + variant)
    for name in ("text", "lm", "vision"):
        assert {"fisher_zero+source=weight", "fisher_zero+source=gradient"} <= set(PRESETS[name].methods)
    assert not any("=" in method for method in PRESETS["quick"].methods)
