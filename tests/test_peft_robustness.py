"""Models that PEFT users bring and that a residual-writing initializer can silently break:
tied weights, other adapters on the same layers, non-zero adapters, `lora_bias`, `torch.compile`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fisherlora as fl
from models import TinyMLP, lm_batches, pair_batches, text_batches, tiny_bert, tiny_gpt2, tiny_llama


def tied_llama():
    return tiny_llama(40, tie_word_embeddings=True)

BERT_TARGETS = ["query", "value", "dense"]


def config_for(method: str = "fisher_svd") -> fl.FisherConfig:
    return fl.FisherConfig(method=method, progress=False)


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train_a_few_steps(model: torch.nn.Module, batches: list, steps: int = 3, loss_fn=None) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


class UnreadableData:
    """A dataloader that fails when read: proves a refusal comes before any statistics pass."""

    def __iter__(self):
        raise AssertionError("the data was read although the model is refused")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed although initialization was refused"


# --- tied weights -------------------------------------------------------------------------------

TIED_EMBEDDING = {tiny_gpt2: "transformer.wte.weight", tied_llama: "model.embed_tokens.weight"}


@pytest.mark.parametrize("factory", [tiny_gpt2, tied_llama], ids=["gpt2", "llama"])
def test_tied_output_head_is_untied_so_outputs_and_embedding_are_unchanged(factory, tmp_path: Path):
    base = factory()
    assert base.lm_head.weight is base.get_input_embeddings().weight, "the test needs a tied model"
    batches = lm_batches()
    reference = logits(base, batches[0])
    embedding = base.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]))

    with pytest.warns(UserWarning, match=r"module 'lm_head' shares its weight with .*(wte|embed_tokens)"):
        reports = fl.initialize_lora_fisher(model, batches, config_for())

    assert (logits(model, batches[0]) - reference).abs().max() <= 1e-5
    assert torch.equal(model.get_input_embeddings().weight, embedding), "the input embedding must keep W"
    (report,) = reports
    assert report.untied_from == [TIED_EMBEDDING[factory]]
    assert "untied from" in str(report)

    # After training: the converted adapter reproduces the model on the ORIGINAL (tied) base, and
    # the residual model saved like `fisherlora init` does reloads with its own head.
    train_a_few_steps(model, batches)
    trained = logits(model, batches[1])
    assert (trained - logits(base, batches[1])).abs().max() > 1e-3, "training must have changed the model"
    fl.save_as_lora(model, tmp_path / "converted")
    converted = PeftModel.from_pretrained(factory(), str(tmp_path / "converted")).eval()
    assert (logits(converted, batches[1]) - trained).abs().max() <= 1e-5
    model.save_pretrained(str(tmp_path / "adapter"))
    model.unload().save_pretrained(str(tmp_path / "residual"))
    residual = type(base).from_pretrained(str(tmp_path / "residual")).eval()
    assert residual.lm_head.weight is not residual.get_input_embeddings().weight
    reloaded = PeftModel.from_pretrained(residual, str(tmp_path / "adapter")).eval()
    assert (logits(reloaded, batches[1]) - trained).abs().max() <= 1e-5


def test_converted_lm_head_adapter_keeps_the_original_head(tmp_path: Path):
    # PEFT saves the base weight of a target named `lm_head` (an "embedding layer" to it); the
    # converted adapter must not carry the residual onto the original base.
    base = tiny_llama(40)
    batches = lm_batches()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head", "q_proj"]))
    reports = fl.initialize_lora_fisher(model, batches, config_for())
    assert "lm_head" in {report.name for report in reports}
    assert all(report.untied_from == [] for report in reports)
    train_a_few_steps(model, batches)
    trained = logits(model, batches[1])
    fl.save_as_lora(model, tmp_path / "converted")
    converted = PeftModel.from_pretrained(tiny_llama(40), str(tmp_path / "converted")).eval()
    assert (logits(converted, batches[1]) - trained).abs().max() <= 1e-5


def test_weights_shared_between_two_plain_modules_are_untied():
    # A tie that no config flag declares: two Linear modules holding one Parameter.
    torch.manual_seed(0)
    base = TinyMLP(d_in=5, hidden=5, classes=5).eval()
    base.fc2.weight = base.fc1.weight
    batches = pair_batches(d_in=5, classes=5)
    with torch.no_grad():
        reference = base(batches[0][0])
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
    with pytest.warns(UserWarning, match=r"module 'fc1' shares its weight with \['fc2.weight'\]"):
        (report,) = fl.initialize_lora_fisher(model, batches, config_for())
    assert report.untied_from == ["fc2.weight"]
    with torch.no_grad():
        assert (model(batches[0][0]) - reference).abs().max() <= 1e-5


# --- other adapters, non-zero adapters ----------------------------------------------------------


def test_a_second_adapter_on_layers_holding_another_is_refused_before_any_work():
    batches = text_batches()
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=BERT_TARGETS))
    train_a_few_steps(model, batches)  # `default` is a trained adapter
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]))
    model.set_adapter("default")
    trained = logits(model, batches[0])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'bert.encoder.layer.0.attention.self.query' also holds "
                                         r"adapter\(s\) \['default'\].*save_as_lora"):
        fl.initialize_lora_fisher(model, UnreadableData(), config_for(), adapter_name="other")
    stats = fl.collect_fisher(model, batches, config_for(), adapter_name="other")  # reading is harmless
    with pytest.raises(ValueError, match="also holds adapter"):
        fl.initialize_lora_fisher(model, stats, config_for(), adapter_name="other")
    assert_unchanged(model, before)
    assert (logits(model, batches[0]) - trained).abs().max() == 0


@pytest.mark.parametrize("init_lora_weights", ["pissa", "olora", False])
def test_initializing_over_a_non_zero_adapter_is_refused(init_lora_weights):
    batches = text_batches()
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   init_lora_weights=init_lora_weights))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'bert.encoder.layer.0.attention.self.query': adapter 'default' "
                                         r"is not at zero"):
        fl.initialize_lora_fisher(model, UnreadableData(), config_for())
    stats = fl.collect_fisher(model, batches, config_for())
    with pytest.raises(ValueError, match="is not at zero"):
        fl.initialize_lora_fisher(model, stats, config_for())
    assert_unchanged(model, before)


# --- lora_bias ----------------------------------------------------------------------------------


def test_lora_bias_is_scaled_into_the_converted_adapter(tmp_path: Path):
    base = tiny_bert()
    original = copy.deepcopy(base.state_dict())
    batches = text_batches()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=BERT_TARGETS,
                                                           lora_bias=True, modules_to_save=["classifier"]))
    reference = logits(model, batches[0])
    fl.initialize_lora_fisher(model, batches, config_for())
    assert (logits(model, batches[0]) - reference).abs().max() <= 1e-5
    train_a_few_steps(model, batches)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    trained_bias = layer.lora_B["default"].bias.detach().clone()
    assert trained_bias.abs().max() > 1e-4, "training must have moved the LoRA bias"
    trained = logits(model, batches[1])

    out = fl.save_as_lora(model, tmp_path / "adapter")
    fresh = tiny_bert()
    fresh.load_state_dict(original)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    converted = loaded.base_model.model.bert.encoder.layer[0].attention.self.query
    assert converted.scaling["default"] == 1.0
    torch.testing.assert_close(converted.lora_B["default"].bias, 2.0 * trained_bias)  # s = 8 / 4
    assert (logits(loaded, batches[1]) - trained).abs().max() <= 1e-6


# --- torch.compile ------------------------------------------------------------------------------


def mlp_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    inputs, labels = batch
    return torch.nn.functional.cross_entropy(model(inputs), labels)


def test_compiled_model_statistics_names_and_conversion(tmp_path: Path):
    torch.manual_seed(0)
    base = TinyMLP().eval()
    original = copy.deepcopy(base.state_dict())
    batches = pair_batches()
    config = config_for()
    plain_stats = fl.collect_fisher(torch.compile(copy.deepcopy(base), backend="eager"), batches, config,
                                    target_modules=["fc1", "fc2"])
    assert sorted(plain_stats.layers) == ["fc1", "fc2"]

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    compiled = torch.compile(model, backend="eager")
    stats = fl.collect_fisher(compiled, batches, config)
    assert sorted(stats.layers) == ["fc1", "fc2"]
    for name in stats.layers:
        torch.testing.assert_close(stats.layers[name].act_cov, plain_stats.layers[name].act_cov)
        torch.testing.assert_close(stats.layers[name].grad_cov, plain_stats.layers[name].grad_cov)
    with torch.no_grad():
        reference = compiled(batches[0][0])
    reports = fl.initialize_lora_fisher(compiled, plain_stats, config)
    assert [report.name for report in reports] == ["fc1", "fc2"]
    with torch.no_grad():
        assert (compiled(batches[0][0]) - reference).abs().max() <= 1e-5
    model.save_pretrained(str(tmp_path / "initial"))
    train_a_few_steps(compiled, batches, loss_fn=mlp_loss)
    with torch.no_grad():
        trained = compiled(batches[1][0])

    for label, source, initial in [("compiled", compiled, None), ("inner", model, None),
                                   ("from-folder", compiled, tmp_path / "initial")]:
        out = fl.save_as_lora(source, tmp_path / label, initial_adapter=initial)
        fresh = TinyMLP()
        fresh.load_state_dict(original)
        loaded = PeftModel.from_pretrained(fresh.eval(), str(out)).eval()
        with torch.no_grad():
            assert (loaded(batches[1][0]) - trained).abs().max() <= 1e-5, label


# --- progress ------------------------------------------------------------------------------------


@pytest.mark.parametrize("progress", [True, False])
def test_progress_in_a_log_is_one_line_for_the_factors(progress: bool, capsys: pytest.CaptureFixture[str]):
    """Factorizing every layer of a large model takes minutes with nothing shown; in a log (stderr not a
    terminal) it is one line with the layer count and seconds, and nothing when progress is off."""
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP(d_in=5, hidden=6, classes=5),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    config = fl.FisherConfig(method="fisher_svd", progress=progress)
    fl.initialize_lora_fisher(model, pair_batches(d_in=5, classes=5), config)
    lines = [line for line in capsys.readouterr().err.splitlines() if ": factors of" in line]
    if progress:
        assert len(lines) == 1 and lines[0].startswith("fisher_svd: factors of 2 layers, ") and lines[0].endswith(" s")
    else:
        assert lines == []


def test_a_misspelled_method_is_refused_before_any_batch_is_read():
    model = TinyMLP(d_in=6, hidden=5, classes=3)
    read = []

    def batches():
        for batch in pair_batches():
            read.append(1)
            yield batch

    config = fl.FisherConfig(method="fisher_eigg")
    with pytest.raises(ValueError, match=r"unknown method 'fisher_eigg' \(did you mean 'fisher_eig'\?\); choose"):
        fl.collect_fisher(model, batches(), config, target_modules=["fc1"])
    peft_model = get_peft_model(TinyMLP(d_in=6, hidden=5, classes=3), LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"unknown initializer 'fisher_eigg' \(did you mean 'fisher_eig'\?\)"):
        fl.initialize_lora_fisher(peft_model, batches(), config)
    assert read == []
    with pytest.raises(ValueError, match=r"unknown method 'qwertyuiop'; choose one of \[.*'fisher_eig'"):
        fl.collect_fisher(model, batches(), fl.FisherConfig(method="qwertyuiop"), target_modules=["fc1"])
