"""End to end through PEFT: function preserved at step 0, saved adapters reproduce trained outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fisherlora as fl
from fisherlora.init import INITIALIZERS
from models import TinyCNN, image_batches, lm_batches, text_batches, tiny_bert, tiny_gpt2

BERT_TARGETS = ["query", "value", "dense"]


def bert_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def peft_bert(base: torch.nn.Module, use_rslora: bool = False) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"],
                        use_rslora=use_rslora, lora_dropout=0.1)
    return get_peft_model(base, config)


def config_for(method: str, **overrides) -> fl.FisherConfig:
    return fl.FisherConfig(method=method, progress=False, **overrides)


@pytest.mark.parametrize("method", sorted(INITIALIZERS))
@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_bert_outputs_right_after_initialization_are_as_declared(method: str, fisher: str):
    """A function-preserving method leaves the logits unchanged; a zero-start one also leaves every
    B at zero; one that takes a real first step leaves the base weights untouched, so the logits
    are those of the original base with `W + s B A` written by hand."""
    entry = INITIALIZERS[method]
    base = tiny_bert()
    batches = text_batches()
    reference = bert_logits(base, batches[0])
    model = peft_bert(copy.deepcopy(base))
    model.eval()
    reports = fl.initialize_lora_fisher(model, batches, config_for(method, fisher=fisher))
    # per layer: query, value and three `dense` (attention output, intermediate, output); plus the pooler
    assert len(reports) == 2 * 5 + 1
    nonzero_b = sum(int(parameter.abs().max() > 0) for name, parameter in model.named_parameters() if "lora_B" in name)
    assert nonzero_b == (0 if entry.zero_start else len(reports)), "B is zero exactly for zero-start methods"
    if entry.preserves_function:
        assert (bert_logits(model, batches[0]) - reference).abs().max() <= 1e-4
        return
    stepped = copy.deepcopy(base)
    modules = dict(stepped.named_modules())
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                base_weight = modules[name].weight
                assert torch.equal(module.base_layer.weight, base_weight), f"{name}: base weight was changed"
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
                base_weight += module.scaling["default"] * delta
        stepped.classifier.load_state_dict(model.base_model.model.classifier.modules_to_save["default"].state_dict())
    assert (bert_logits(model, batches[0]) - bert_logits(stepped, batches[0])).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["fisher_svd", "fisher_grad"])
def test_gpt2_conv1d_outputs_unchanged(method: str):
    base = tiny_gpt2()
    batches = lm_batches()
    with torch.no_grad():
        reference = base(input_ids=batches[0]["input_ids"]).logits
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"]))
    fl.initialize_lora_fisher(model, batches, config_for(method))
    with torch.no_grad():
        after = model(input_ids=batches[0]["input_ids"]).logits
    assert (after - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["fisher_svd", "fisher_eig"])
def test_cnn_conv2d_outputs_unchanged(method: str):
    torch.manual_seed(0)
    base = TinyCNN().eval()
    batches = image_batches()
    with torch.no_grad():
        reference = base(batches[0][0])
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"])
    model = get_peft_model(copy.deepcopy(base), config)
    fl.initialize_lora_fisher(model, batches, config_for(method))
    with torch.no_grad():
        after = model(batches[0][0])
    assert (after - reference).abs().max() <= 1e-4


def train_a_few_steps(model: torch.nn.Module, batches: list[dict], steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_adapter_reproduces_trained_outputs_on_the_original_base(tmp_path: Path, use_rslora: bool):
    base = tiny_bert()
    original_state = copy.deepcopy(base.state_dict())
    batches = text_batches()
    model = peft_bert(copy.deepcopy(base), use_rslora=use_rslora)
    fl.initialize_lora_fisher(model, batches, config_for("fisher_svd"))
    train_a_few_steps(model, batches)
    trained = bert_logits(model, batches[1])
    assert (trained - bert_logits(base, batches[1])).abs().max() > 1e-3, "training must have changed the model"

    out = fl.save_as_lora(model, tmp_path / "adapter")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left behind"
    fresh = tiny_bert()
    fresh.load_state_dict(original_state)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    assert loaded.peft_config["default"].r == 8
    assert (bert_logits(loaded, batches[1]) - trained).abs().max() <= 1e-4


def test_saved_adapter_for_gpt2_conv1d(tmp_path: Path):
    base = tiny_gpt2()
    batches = lm_batches()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    fl.initialize_lora_fisher(model, batches, config_for("fisher_select"))
    train_a_few_steps(model, batches)
    with torch.no_grad():
        trained = model(input_ids=batches[0]["input_ids"]).logits
    fl.save_as_lora(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (loaded(input_ids=batches[0]["input_ids"]).logits - trained).abs().max() <= 1e-4


def test_statistics_from_a_plain_model_initialize_the_peft_model(tmp_path: Path):
    base = tiny_bert()
    batches = text_batches()
    config = config_for("fisher_svd")
    stats = fl.collect_fisher(base, batches, config, target_modules=BERT_TARGETS)
    stats.save(tmp_path / "stats.safetensors")
    loaded = fl.FisherStats.load(tmp_path / "stats.safetensors")
    direct = peft_bert(copy.deepcopy(base))
    via_file = peft_bert(copy.deepcopy(base))
    fl.initialize_lora_fisher(direct, batches, config)
    fl.initialize_lora_fisher(via_file, loaded, config)
    for (name, first), (_, second) in zip(direct.named_parameters(), via_file.named_parameters(), strict=True):
        torch.testing.assert_close(first, second, msg=name)


def test_statistics_of_another_model_are_refused(tmp_path: Path):
    batches = text_batches()
    stats = fl.collect_fisher(tiny_bert(seed=1), batches, config_for("fisher_svd"), target_modules=BERT_TARGETS)
    stats.save(tmp_path / "stats.safetensors")
    model = peft_bert(tiny_bert(seed=2))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="do not match the model's weight fingerprint"):
        fl.initialize_lora_fisher(model, fl.FisherStats.load(tmp_path / "stats.safetensors"), config_for("fisher_svd"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed although initialization failed"


class Wide(torch.nn.Module):
    """One layer as tall as SmolLM2's MLP (1536 x 64): large enough that bf16 rounding moved the old
    position-weighted fingerprint beyond its tolerance (it grew with the row count)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.up, self.head = torch.nn.Linear(64, 1536), torch.nn.Linear(1536, 3)
        with torch.no_grad():
            self.up.weight.copy_(0.05 * torch.randn(1536, 64, generator=generator))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(inputs)))


@pytest.mark.parametrize(("collected_in", "initialized_in"), [(torch.bfloat16, torch.float32),
                                                              (torch.float32, torch.bfloat16)])
def test_statistics_of_the_same_checkpoint_in_another_dtype_are_accepted(collected_in: torch.dtype,
                                                                         initialized_in: torch.dtype):
    base = Wide()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 64, generator=generator).to(collected_in),
                torch.randint(0, 3, (4,), generator=generator)) for _ in range(2)]
    stats = fl.collect_fisher(copy.deepcopy(base).to(collected_in), batches, config_for("fisher_eig"),
                              target_modules=["up"])
    model = get_peft_model(copy.deepcopy(base).to(initialized_in), LoraConfig(r=4, lora_alpha=8, target_modules=["up"]))
    reports = fl.initialize_lora_fisher(model, stats, config_for("fisher_eig"))
    assert [report.name for report in reports] == ["up"]


def test_initializing_a_plain_model_says_to_wrap_it_with_peft():
    with pytest.raises(TypeError, match=r"Wide has none: wrap it first, model = peft.get_peft_model"):
        fl.initialize_lora_fisher(Wide(), None, config_for("fisher_eig"))


def test_statistics_for_other_targets_are_refused():
    batches = text_batches()
    stats = fl.collect_fisher(tiny_bert(), batches, config_for("fisher_svd"), target_modules=["query"])
    with pytest.raises(ValueError, match=r"no entry for module 'bert.encoder.layer.0.attention.self.value'"):
        fl.initialize_lora_fisher(peft_bert(tiny_bert()), stats, config_for("fisher_svd"))


def test_initializing_twice_is_refused():
    batches = text_batches()
    model = peft_bert(tiny_bert())
    stats = fl.collect_fisher(model, batches, config_for("fisher_svd"))
    fl.initialize_lora_fisher(model, stats, config_for("fisher_svd"))
    with pytest.raises(ValueError, match="already initialized"):
        fl.initialize_lora_fisher(model, stats, config_for("fisher_svd"))


def test_rank_too_large_fails_before_anything_is_written():
    base = tiny_bert()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "classifier"],
                                            rank_pattern={"classifier": 8}))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"module 'classifier'.*rank r=8"):
        fl.initialize_lora_fisher(model, text_batches(), config_for("fisher_svd"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_save_as_lora_needs_an_initialized_adapter(tmp_path: Path):
    model = peft_bert(tiny_bert())
    with pytest.raises(ValueError, match="was not initialized by fisherlora"):
        fl.save_as_lora(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_model_without_lora_layers_is_refused():
    with pytest.raises(ValueError, match="needs target_modules"):
        fl.collect_fisher(tiny_bert(), text_batches(), config_for("fisher_svd"))
