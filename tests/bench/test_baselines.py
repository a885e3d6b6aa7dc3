"""Every method builds a LoRA model whose outputs equal the base model's at step 0."""

from __future__ import annotations

import copy

import pytest
import torch

from fisherlora.bench.baselines import AdapterSpec, build_model, known_methods, sketch_rank_of, split_method
from fisherlora.config import FisherConfig
from models import text_batches, tiny_bert

SPEC = AdapterSpec(rank=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])


@pytest.mark.parametrize("method", [*known_methods(), "fisher_svd@true", "fisher_svd+sketch4@true"])
def test_every_method_keeps_the_base_function(method: str):
    base = tiny_bert()
    batches = text_batches()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        reference = base(**inputs).logits
    model = build_model(method, copy.deepcopy(base), SPEC, batches, FisherConfig(progress=False))
    model.eval()
    with torch.no_grad():
        after = model(**inputs).logits
    assert (after - reference).abs().max() <= 1e-4
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
