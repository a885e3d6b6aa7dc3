"""Every method builds a LoRA model whose outputs equal the base model's at step 0."""

from __future__ import annotations

import copy

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
from fisherlora.config import FisherConfig
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
