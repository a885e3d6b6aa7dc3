"""bfloat16 end to end on a tiny Llama: statistics, the initialized model, and the converted adapter
each agree with float32 within bfloat16's own noise.

"Noise" is measured, not assumed: it is how far the bfloat16 model's logits are from the float32
model with the same (bfloat16-representable) weights. bfloat16 keeps 8 significant bits, so every
rounding is off by up to 2^-8 relative and the errors compound through the layers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import fisherlora as fl
from fisherlora.cli import main
from fisherlora.data.causal_lm import calibration_batches, read_causal_lm_examples
from fisherlora.init.registry import run_initializer
from models import save_causal_lm, tiny_llama, tiny_tokenizer

# Worst relative Frobenius error of a statistic of the bfloat16 model measured 0.019 (2 layers,
# forward and backward): about 5 roundings of 2^-8. The bound leaves room for other seeds and kernels.
STATISTICS_TOLERANCE = 0.05
# Logit differences allowed, in units of the measured noise (training moves the logits ~80x noise).
NOISE_FACTOR = 3


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = tiny_tokenizer()
    model16 = tiny_llama(len(tokenizer), dtype=torch.bfloat16)
    model32 = copy.deepcopy(model16).float()  # identical weights, float32 arithmetic
    folder = tmp_path_factory.mktemp("bf16")
    model_dir = save_causal_lm(folder / "model", model16, tokenizer)
    data = folder / "data.jsonl"
    words = ["stone", "apple", "river", "green", "music", "paper"]
    rows = [{"prompt": f"Sort the words: {words[i % 6]} {words[(i + 2) % 6]} ->",
             "completion": " " + " ".join(sorted([words[i % 6], words[(i + 2) % 6]]))} for i in range(16)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    input_ids = torch.tensor([tokenizer("Sort the words: river apple green ->").input_ids])
    with torch.no_grad():
        reference = model32(input_ids=input_ids).logits
        noise = (model16(input_ids=input_ids).logits.float() - reference).abs().max().item()
    assert noise > 0  # the two models really compute in different precisions
    return tokenizer, model16, model32, model_dir, data, input_ids, reference, noise


def lora(model: torch.nn.Module):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"),
                          autocast_adapter_dtype=False)


def test_bfloat16_statistics_equal_float32_within_bfloat16_tolerance(setup):
    tokenizer, model16, model32, _, data, *_ = setup
    examples, _ = read_causal_lm_examples(data, tokenizer, max_length=64)
    batches = calibration_batches(examples, 4, 0)
    config = fl.FisherConfig(progress=False)
    stats32 = fl.collect_fisher(lora(model32), batches, config)
    stats16 = fl.collect_fisher(lora(model16), batches, config)
    assert stats16.model_dtype == "torch.bfloat16" and sorted(stats16.layers) == sorted(stats32.layers)
    for name, layer in stats16.layers.items():
        for statistic in ("act_cov", "grad_cov"):
            value = getattr(layer, statistic)
            assert value.dtype == torch.float32  # accumulated in float32 whatever the model's dtype
            assert relative_error(value, getattr(stats32.layers[name], statistic)) <= STATISTICS_TOLERANCE, (
                name, statistic)
        assert layer.num_tokens == stats32.layers[name].num_tokens


def test_bfloat16_init_and_converted_adapter_stay_within_bfloat16_noise(setup, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer, _, _, model_dir, data, input_ids, reference, noise = setup
    out = tmp_path / "out"
    assert main(["init", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--dtype", "bfloat16",
                 "--rank", "2", "--batch-size", "4", "--method", "fisher_svd", "--no-progress"]) == 0

    residual = AutoModelForCausalLM.from_pretrained(out / "residual_model")
    assert residual.dtype == torch.bfloat16
    model = PeftModel.from_pretrained(residual, str(out / "adapter"), is_trainable=True)
    with torch.no_grad():
        initialized = model(input_ids=input_ids).logits.float()
    # Unchanged after init: as far from float32 as bfloat16 itself is (measured 0.83x noise; the
    # residual is rounded to bfloat16 once more, so a few times the noise is still noise).
    assert (initialized - reference).abs().max().item() <= NOISE_FACTOR * noise

    examples, _ = read_causal_lm_examples(data, tokenizer, max_length=64)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in calibration_batches(examples, 4, 0):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=input_ids).logits.float()
    assert (trained - initialized).abs().max().item() > 10 * noise  # training moved the model far beyond noise

    fl.save_as_lora(model, tmp_path / "lora", initial_adapter=out / "adapter")
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    assert original.dtype == torch.bfloat16
    reloaded = PeftModel.from_pretrained(original, str(tmp_path / "lora")).eval()
    with torch.no_grad():
        converted = reloaded(input_ids=input_ids).logits.float()
    assert (converted - trained).abs().max().item() <= NOISE_FACTOR * noise  # measured 1.45x noise


def test_residual_is_formed_from_the_factors_as_stored():
    """With bfloat16 factors, `residual + s B A` rebuilds W to float32 rounding of the residual only."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 10, generator=generator)
    result = run_initializer("milora", weight, None, rank=3, scaling=2.0, config=fl.FisherConfig(),
                             factor_dtype=torch.bfloat16)
    assert torch.equal(result.lora_a, result.lora_a.bfloat16().float())
    assert torch.equal(result.lora_b, result.lora_b.bfloat16().float())
    rebuilt = result.residual.double() + 2.0 * result.lora_b.double() @ result.lora_a.double()
    assert (rebuilt - weight.double()).abs().max() <= 4 * torch.finfo(torch.float32).eps * weight.abs().max()
