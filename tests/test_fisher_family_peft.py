"""fisher_zero, fisher_step and Fisher rank allocation through PEFT on tiny BERT, GPT-2 (Conv1D) and
CNN models: the declared step-0 behaviour, the loss going down after the step, the allocated ranks in
the model and its config, and saved adapters that reproduce trained outputs on the original base."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fisherlora as fl
from fisherlora.conversion import write_initial_record
from fisherlora.init.allocation import allocate_ranks, layer_fisher_energy
from fisherlora.init.fisher_zero_step import FisherZeroOptions
from fisherlora.init.registry import LayerGeometry
from fisherlora.peft import find_target_layers
from fisherlora.stats.layers import weight_matrix
from models import TinyCNN, image_batches, lm_batches, text_batches, tiny_bert, tiny_gpt2
from test_peft_end_to_end import bert_logits, config_for, peft_bert, train_a_few_steps


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """Base-model name -> LoRA layer holding the default adapter."""
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def stepped_copy(base: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """The original base with `W + s B A` of every LoRA layer written by hand (`Conv1D` stores `W^T`)."""
    from transformers.pytorch_utils import Conv1D

    stepped = copy.deepcopy(base)
    modules = dict(stepped.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            target = modules[name]
            assert torch.equal(layer.base_layer.weight, target.weight), f"{name}: the base weight was changed"
            lora_a = layer.lora_A["default"].weight.reshape(layer.lora_A["default"].weight.shape[0], -1)
            delta = layer.scaling["default"] * layer.lora_B["default"].weight.flatten(1) @ lora_a
            target.weight += delta.T if isinstance(target, Conv1D) else delta.reshape(target.weight.shape)
    return stepped


def gpt2_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method", ["fisher_zero", "fisher_step"])
def test_gpt2_conv1d_step_zero_is_as_declared(method: str):
    base = tiny_gpt2()
    batches = lm_batches()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"]))
    fl.initialize_lora_fisher(model, batches, config_for(method))
    entry = fl.get_method(method)
    reference = base if entry.zero_start else stepped_copy(base, model)
    if entry.zero_start:
        assert all(not layer.lora_B["default"].weight.any() for layer in lora_layers(model).values())
    else:
        assert (gpt2_logits(model, batches[0]) - gpt2_logits(base, batches[0])).abs().max() > 1e-6
    assert (gpt2_logits(model, batches[0]) - gpt2_logits(reference, batches[0])).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["fisher_zero", "fisher_step"])
def test_cnn_conv2d_step_zero_is_as_declared(method: str):
    torch.manual_seed(0)
    base = TinyCNN().eval()
    batches = image_batches()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"])
    model = get_peft_model(copy.deepcopy(base), config)
    fl.initialize_lora_fisher(model, batches, config_for(method))
    reference = base if fl.get_method(method).zero_start else stepped_copy(base, model)
    with torch.no_grad():
        assert (model(batches[0][0]) - reference(batches[0][0])).abs().max() <= 1e-5


def calibration_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(model(**batch).loss) for batch in batches)


@pytest.mark.parametrize(("make_model", "make_batches", "targets"), [
    (lambda: tiny_bert(), text_batches, ["query", "value", "dense"]),
    (lambda: tiny_gpt2(), lm_batches, ["c_attn", "c_fc"]),
], ids=["bert", "gpt2"])
@pytest.mark.parametrize("gamma", [16.0, 128.0])
def test_fisher_step_lowers_the_calibration_loss(make_model: Any, make_batches: Any, targets: list[str], gamma: float):
    base = make_model()
    batches = make_batches()
    before = calibration_loss(base, batches)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    config = config_for("fisher_step", options=fl.init.fisher_zero_step.FisherStepOptions(gamma=gamma))
    fl.initialize_lora_fisher(model, batches, config)
    after = calibration_loss(model, batches)
    assert after < before


def allocated(model: torch.nn.Module, method: str, batches: list) -> tuple[torch.nn.Module, list[fl.LayerReport]]:
    reports = fl.initialize_lora_fisher(model, batches, config_for(method, rank_allocation="fisher"))
    return model, reports


def test_allocated_ranks_are_in_the_model_and_its_config():
    base = tiny_bert()
    batches = text_batches()
    model = peft_bert(copy.deepcopy(base))
    model.eval()
    stats = fl.collect_fisher(model, batches, config_for("fisher_zero"))
    targets = find_target_layers(model)
    # The allocation recomputed from the statistics with the pure functions.
    energies = [layer_fisher_energy(weight_matrix(t.weight_module, t.layer_type).double(),
                                    LayerGeometry(stats.layers[t.name], 1e-3), 4) for t in targets]
    caps = [min(weight_matrix(t.weight_module, t.layer_type).shape) for t in targets]
    expected = dict(zip([t.name for t in targets], allocate_ranks(energies, caps, 4 * len(targets)), strict=True))
    assert len(set(expected.values())) > 1, "the tiny model must give unequal ranks for this test to mean anything"

    reports = fl.initialize_lora_fisher(model, stats, config_for("fisher_zero", rank_allocation="fisher"))
    config = model.peft_config["default"]
    assert {report.name: report.rank for report in reports} == expected
    assert sum(expected.values()) == 4 * len(targets)
    for name, layer in lora_layers(model).items():
        assert layer.r["default"] == expected[name] == config.rank_pattern.get(name, config.r)
        assert layer.lora_A["default"].weight.shape[0] == expected[name] == layer.lora_B["default"].weight.shape[1]
        assert layer.scaling["default"] == pytest.approx(2.0)  # s = alpha / r of the model as created
        alpha = config.alpha_pattern.get(name, config.lora_alpha)
        assert alpha / config.rank_pattern.get(name, config.r) == pytest.approx(2.0)
        assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    # Zero start at every rank: the outputs are the base's.
    assert (bert_logits(model, batches[0]) - bert_logits(base, batches[0])).abs().max() <= 1e-5
    # A model created from the recorded config has the same layers.
    rebuilt = lora_layers(get_peft_model(tiny_bert(), copy.deepcopy(config)))
    assert {name: layer.r["default"] for name, layer in rebuilt.items()} == expected


@pytest.mark.parametrize("method, source", [("fisher_svd", None), ("fisher_zero", "weight"),
                                            ("fisher_zero", "natural_gradient")])
def test_allocation_reuses_its_spectra_and_matches_each_layer_factorized_afresh(method: str, source: str | None,
                                                                                monkeypatch: pytest.MonkeyPatch):
    options = {} if source is None else {"options": FisherZeroOptions(source=source)}
    base = tiny_bert()
    batches = text_batches()
    model = peft_bert(copy.deepcopy(base))
    stats = fl.collect_fisher(model, batches, config_for(method, **options))
    solves = []
    solver = fl.init.geometry.top_eigenpairs
    monkeypatch.setattr(fl.init.geometry, "top_eigenpairs", lambda factor, count: solves.append(count) or
                        solver(factor, count))
    reports = fl.initialize_lora_fisher(model, stats, config_for(method, rank_allocation="fisher", captured_energy=True,
                                                                **options))
    monkeypatch.undo()
    ranks = {report.name: report.rank for report in reports}
    assert min(ranks.values()) < 4 < max(ranks.values())
    if source != "natural_gradient":
        # One eigen-solve per layer for the energies (at the created rank 4); a method whose factors are
        # those weight spectra computes again only the layers allocated more than that.
        assert solves == [4] * len(ranks) + [rank for rank in ranks.values() if rank > 4]
    energies = {report.name: report.captured_energy for report in reports}
    for name, layer in lora_layers(model).items():
        fresh = fl.init.registry.compute_factors(method, base.get_submodule(name).weight, stats.layers[name],
                                                 ranks[name], 2.0, config_for(method, captured_energy=True, **options))
        torch.testing.assert_close(layer.lora_A["default"].weight, fresh.lora_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["default"].weight, fresh.lora_b, rtol=1e-5, atol=1e-6)
        assert energies[name] == pytest.approx(fresh.captured_energy, rel=1e-9)


@pytest.mark.parametrize("method", ["fisher_zero", "fisher_step", "fisher_svd"])
@pytest.mark.parametrize("allocation", ["uniform", "fisher"])
def test_saved_adapter_reproduces_trained_outputs(tmp_path: Path, method: str, allocation: str):
    base = tiny_bert()
    original_state = copy.deepcopy(base.state_dict())
    batches = text_batches()
    model = peft_bert(copy.deepcopy(base))
    fl.initialize_lora_fisher(model, batches, config_for(method, rank_allocation=allocation))
    train_a_few_steps(model, batches)
    trained = bert_logits(model, batches[1])
    assert (trained - bert_logits(base, batches[1])).abs().max() > 1e-3, "training must have changed the model"

    out = fl.save_as_lora(model, tmp_path / "adapter")
    fresh = tiny_bert()
    fresh.load_state_dict(original_state)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    assert (bert_logits(loaded, batches[1]) - trained).abs().max() <= 1e-4
    # No residual (zero start, first step): the adapter is saved as trained, rank unchanged; a residual
    # method's adapter doubles its rank, layer by layer.
    doubling = 2 if fl.get_method(method).preserves_function and not fl.get_method(method).zero_start else 1
    ranks = {name: layer.r["default"] for name, layer in lora_layers(model).items()}
    assert {name: layer.r["default"] for name, layer in lora_layers(loaded).items()} == {
        name: doubling * rank for name, rank in ranks.items()}


def test_gpt2_with_allocation_saves_and_reloads(tmp_path: Path):
    base = tiny_gpt2()
    batches = lm_batches()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    allocated(model, "fisher_step", batches)
    train_a_few_steps(model, batches)
    trained = gpt2_logits(model, batches[0])
    fl.save_as_lora(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "adapter")).eval()
    assert (gpt2_logits(loaded, batches[0]) - trained).abs().max() <= 1e-4


def test_first_step_converts_from_an_adapter_saved_in_another_process(tmp_path: Path):
    """The record written next to the initial adapter tells `save_as_lora` that the base holds W: a
    conversion that subtracted `s B0 A0` would not reproduce the trained model."""
    base = tiny_bert()
    batches = text_batches()
    model = peft_bert(copy.deepcopy(base))
    allocated(model, "fisher_step", batches)
    model.save_pretrained(tmp_path / "initial")
    write_initial_record(model, tmp_path / "initial")
    train_a_few_steps(model, batches)
    trained = bert_logits(model, batches[1])
    fl.save_as_lora(model, tmp_path / "adapter", initial_adapter=tmp_path / "initial")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    assert (bert_logits(loaded, batches[1]) - trained).abs().max() <= 1e-4


def test_allocation_leaves_the_random_stream_and_the_adapter_dtype_alone():
    states = {}
    for allocation in ("uniform", "fisher"):
        model = get_peft_model(tiny_bert().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8,
                                                                           target_modules=["query", "value"]))
        dtypes = {layer.lora_A["default"].weight.dtype for layer in lora_layers(model).values()}
        torch.manual_seed(123)
        fl.initialize_lora_fisher(model, text_batches(), config_for("fisher_step", rank_allocation=allocation))
        states[allocation] = torch.get_rng_state()
        for layer in lora_layers(model).values():
            assert {layer.lora_A["default"].weight.dtype, layer.lora_B["default"].weight.dtype} == dtypes
            assert layer.base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(states["uniform"], states["fisher"])
    assert dtypes == {torch.float32}  # PEFT's default: float32 adapters on a bfloat16 base


def test_a_failing_layer_leaves_ranks_and_weights_untouched():
    batches = text_batches()
    model = peft_bert(tiny_bert())
    stats = fl.collect_fisher(model, batches, config_for("fisher_step"))
    last = sorted(stats.layers)[-1]
    stats.layers[last].grad_mean = torch.zeros_like(stats.layers[last].grad_mean)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"module '{last}'.*natural gradient is zero"):
        fl.initialize_lora_fisher(model, stats, config_for("fisher_step", rank_allocation="fisher"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.peft_config["default"].rank_pattern == {}


def test_allocation_needs_statistics_and_applies_to_our_methods_only():
    from fisherlora.peft_baselines import AdapterSpec, build_lora_model

    batches = text_batches()
    with pytest.raises(ValueError, match="'milora' \\(rank_allocation='fisher'\\) needs statistics"):
        fl.initialize_lora_fisher(peft_bert(tiny_bert()), None, config_for("milora", rank_allocation="fisher"))
    # A data-free method still gets its ranks from the Fisher energy when given data.
    reports = fl.initialize_lora_fisher(peft_bert(tiny_bert()), batches, config_for("milora", rank_allocation="fisher"))
    assert len({report.rank for report in reports}) > 1
    with pytest.raises(ValueError, match="'pissa' is built by PEFT: Fisher rank allocation"):
        build_lora_model(tiny_bert(), AdapterSpec(rank=2, alpha=4), batches,
                         config_for("pissa", rank_allocation="fisher"))


def test_the_trainer_callback_refuses_rank_allocation():
    """The trainer's optimizer exists before `on_train_begin`: adapters re-created there would not train."""
    with pytest.raises(ValueError, match="FisherInitCallback cannot apply rank_allocation='fisher'"):
        fl.FisherInitCallback(config_for("fisher_zero", rank_allocation="fisher"))
