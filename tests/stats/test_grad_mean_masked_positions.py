"""`M` is the weight gradient of the summed loss over `E`, also where positions without a loss term
feed the ones with one.

A prompt token whose label is -100 (causal LM), a token left unlabeled (token classification) or
every token but the one the classifier reads (sequence classification) has no loss term of its own,
yet reaches the loss through attention: `g_t = dL/dy_t` is non-zero there, and `dL/dW = sum_t g_t
x_t^T` sums over it. The reference is autograd's weight gradient of the whole padded batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherlora as fl
from models import lm_batches, text_batches, tiny_bert, tiny_gpt2


def token_classifier() -> nn.Module:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, num_labels=5)
    return BertForTokenClassification(config).eval()


def summed_loss(kind: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if kind == "gpt2-causal":  # position t predicts label t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")


def case(kind: str) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[str], int]:
    """(model, batches, targeted layer names, E)."""
    if kind == "gpt2-causal":
        batches = lm_batches(count=2, batch_size=3, length=8)
        names = [f"transformer.h.{i}.{layer}" for i in range(2) for layer in ("attn.c_attn", "mlp.c_fc")]
        return tiny_gpt2(), batches, names, sum(batch["input_ids"].shape[0] for batch in batches)
    batches = text_batches(count=2, batch_size=4, length=7)
    names = [f"bert.encoder.layer.{i}.{layer}" for i in range(2)
             for layer in ("attention.self.query", "intermediate.dense")]
    if kind == "bert-sequence":
        return tiny_bert(), batches, [*names, "classifier"], sum(batch["labels"].shape[0] for batch in batches)
    generator = torch.Generator().manual_seed(1)
    for batch in batches:
        labels = torch.randint(0, 5, batch["input_ids"].shape, generator=generator)
        labels[torch.rand(labels.shape, generator=generator) < 0.5] = -100  # unlabeled tokens
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    examples = sum(int((batch["labels"] != -100).any(dim=1).sum()) for batch in batches)
    return token_classifier(), batches, [*names, "classifier"], examples


@pytest.mark.parametrize("kind", ["gpt2-causal", "bert-sequence", "bert-token"])
def test_grad_mean_is_autograd_weight_gradient_of_padded_batches(kind: str) -> None:
    model, batches, names, examples = case(kind)
    for batch in batches:
        assert (batch["attention_mask"] == 0).any(), "the data must contain padding"
    if kind != "bert-sequence":
        unlabeled = [(batch["labels"] == -100) & (batch["attention_mask"] == 1) for batch in batches]
        assert any(mask.any() for mask in unlabeled), "the data must contain attended positions without a label"
    config = fl.FisherConfig(progress=False, collect_grad_mean=True, num_batches=None)
    targets = ["c_attn", "c_fc"] if kind == "gpt2-causal" else ["query", "intermediate.dense", "classifier"]
    stats = fl.collect_fisher(model, batches, config, target_modules=targets)
    assert set(stats) == set(names)

    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    sum(summed_loss(kind, model, batch) for batch in batches).backward()
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        # (d_out, d_in): transformers' Conv1D stores the transpose
        gradient = (weight.grad.T if kind == "gpt2-causal" else weight.grad) / examples
        assert stats[name].num_examples == examples
        scale = float(gradient.abs().max())
        assert scale > 0, f"{name}: the comparison would be vacuous"
        torch.testing.assert_close(stats[name].grad_mean, gradient, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda message, name=name: f"{name}.grad_mean: {message}")
    model.zero_grad(set_to_none=True)
