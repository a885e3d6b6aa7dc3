"""While statistics are collected, LoRA layers whose adapters add nothing run as their base layers;
an adapter that adds something still runs, and every layer's flag is restored afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fisherlora as fl
from models import text_batches, tiny_bert

CONFIG = fl.FisherConfig(progress=False, num_batches=None, collect_grad_mean=True)


def adapter_calls(model: torch.nn.Module) -> list[str]:
    calls: list[str] = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda module, args, output, name=name: calls.append(name))
    return calls


def assert_same_stats(first: fl.FisherStats, second: fl.FisherStats) -> None:
    for name in first:
        for label in ("act_cov", "grad_cov", "grad_mean"):
            torch.testing.assert_close(getattr(first[name], label), getattr(second[name], label), rtol=1e-5,
                                       atol=1e-7)


def test_zero_adapters_are_skipped_and_change_nothing():
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query", "value"]))
    calls = adapter_calls(model)
    stats = fl.collect_fisher(model, text_batches(), CONFIG)
    assert calls == []
    assert_same_stats(stats, fl.collect_fisher(base, text_batches(), CONFIG, target_modules=["query", "value"]))
    assert not any(module.disable_adapters for module in model.modules() if hasattr(module, "lora_A"))
    model(**text_batches(count=1)[0])
    assert calls, "the adapters run again after the collection"


@pytest.mark.parametrize("active", [True, False])
def test_an_adapter_that_adds_something_still_runs(active: bool):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query", "value"]))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(0))
    if not active:  # the user switched the adapters off: the model is its base, and stays so
        model.base_model.disable_adapter_layers()
    calls = adapter_calls(model)
    stats = fl.collect_fisher(model, text_batches(), CONFIG)
    plain = fl.collect_fisher(base, text_batches(), CONFIG, target_modules=["query", "value"])
    name = "bert.encoder.layer.0.attention.self.query"
    assert (f"base_model.model.{name}.lora_A.default" in calls) == active
    if active:
        difference = (stats[name].grad_cov - plain[name].grad_cov).norm() / plain[name].grad_cov.norm()
        assert difference > 1e-3, "the adapter's product is part of the model collected on"
    else:
        assert_same_stats(stats, plain)
    assert layer.disable_adapters == (not active)
