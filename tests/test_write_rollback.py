"""Adapters are written layer by layer; a failure part-way restores every written layer bit for bit.

The failure is injected into the write of a later layer (a RuntimeError as out-of-memory would
raise, and a KeyboardInterrupt). Afterwards every parameter of the model (base weights, adapters)
and every buffer equals the model before, tied weights are tied again, and the model's config says
so; the same initialization without the failure then succeeds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fisherlora as fl
from fisherlora.base_weight_guards import adapter_at_zero
from fisherlora.peft import find_target_layers
from fisherlora.writes import WriteLog
from models import TinyCNN, image_batches, lm_batches, tiny_gpt2, tiny_llama

CASES = {
    # tied lm_head (untied before its residual is written), bfloat16 residuals that round-trip worst
    "llama-bf16-tied": (lambda: tiny_llama(40, tie_word_embeddings=True, dtype=torch.bfloat16),
                        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
                        lambda: lm_batches(count=2, vocab=40)),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], lambda: lm_batches(count=2, vocab=40)),
    "cnn-conv2d": (TinyCNN, ["conv1", "conv2", "head"], lambda: image_batches(count=2)),
}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in [*model.named_parameters(), *model.named_buffers()]}


def assert_identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name].view(-1).view(torch.uint8),
                                                                 tensor.view(-1).view(torch.uint8)), name


class Injected(RuntimeError):
    pass


@pytest.mark.parametrize("allocation", ["uniform", "fisher"])
@pytest.mark.parametrize("failure", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("case", CASES)
def test_a_failing_layer_rolls_back_every_written_layer(case: str, failure: type[BaseException], allocation: str,
                                                        monkeypatch: pytest.MonkeyPatch):
    factory, targets, batches = CASES[case]
    torch.manual_seed(0)
    model = get_peft_model(factory(), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    ranks = {name: dict(module.r) for name, module in model.named_modules() if hasattr(module, "lora_A")}
    # "fisher": ranks re-allocated, so adapters are re-created at other ranks before they are written.
    config = fl.FisherConfig(method="fisher_svd", progress=False, num_batches=None, rank_allocation=allocation)
    stats = fl.collect_fisher(model, batches(), config)
    before = snapshot(model)
    head = model.base_model.model.lm_head.base_layer if case.startswith("llama") else None
    if head is not None:
        assert head.weight is model.get_input_embeddings().weight, "the case needs a tied head"
    written = []
    original = WriteLog.write_residual

    def failing(self: WriteLog, module: torch.nn.Module, layer_type: str, product) -> None:
        if len(written) == len(stats) - 1:  # the last layer
            raise failure("injected while writing a late layer")
        original(self, module, layer_type, product)
        written.append(module)

    monkeypatch.setattr(WriteLog, "write_residual", failing)
    with pytest.raises(failure, match="injected"):
        fl.initialize_lora_fisher(model, stats, config)
    assert len(written) == len(stats) - 1 >= 2
    assert_identical(model, before)
    assert ranks == {name: dict(module.r) for name, module in model.named_modules() if hasattr(module, "lora_A")}
    if head is not None:
        assert head.weight is model.get_input_embeddings().weight
        assert model.base_model.model.config.tie_word_embeddings
    monkeypatch.setattr(WriteLog, "write_residual", original)
    fl.initialize_lora_fisher(model, stats, config)  # the intact model initializes normally
    if allocation == "fisher":
        assert ranks != {name: dict(module.r) for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert not all(adapter_at_zero(target.hook_module, "default") for target in find_target_layers(model))


def test_rollback_restores_entries_that_do_not_round_trip():
    # bfloat16 residuals: round(round(W - P) + P) misses W at a good share of the entries, which the
    # log keeps aside when the layer is written; the restored weight is W bit for bit.
    generator = torch.Generator().manual_seed(0)
    module = torch.nn.Linear(40, 30, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(torch.randn(30, 40, generator=generator))
    before = module.weight.detach().clone()
    adapter = 0.37 * torch.randn(30, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 40, generator=generator, dtype=torch.float64)
    log = WriteLog()
    log.write_residual(module, "linear", lambda: adapter)
    assert torch.equal(module.weight.detach(), (before.double() - adapter).to(torch.bfloat16))
    naive = (module.weight.detach().double() + adapter).to(torch.bfloat16)
    assert not torch.equal(naive, before), "the case must exercise the kept entries"
    log.rollback()
    assert torch.equal(module.weight.detach(), before)


def test_write_log_restores_adapter_values_and_untied_weights():
    model = copy.deepcopy(tiny_llama(40, tie_word_embeddings=True))
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding
    log = WriteLog()
    log.untie(model, model.lm_head)
    assert model.lm_head.weight is not embedding and not model.config.tie_word_embeddings
    parameter = model.model.layers[0].self_attn.q_proj.weight
    before = parameter.detach().clone()
    log.copy_into(parameter, torch.zeros_like(parameter))
    log.rollback()
    assert model.lm_head.weight is embedding and model.config.tie_word_embeddings
    assert torch.equal(parameter, before)
