"""The default loss keeps exactly the loss terms of the model's own head, for every label layout:
sequence classification `(B,)` (an ignored example is as if absent), token classification and
masked LM `(B, S)` (no shift), causal LM `(B, S)` (shifted); regression, multi-label and
encoder-decoder heads are refused with a pointer to `loss_fn`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherlora as fl
from models import TinyCNN, TinyMLP, image_batches, lm_batches, pair_batches, text_batches, tiny_bert, tiny_gpt2


def config(**overrides) -> fl.FisherConfig:
    values = {"progress": False, "collect_grad_mean": True, "num_batches": None}
    values.update(overrides)
    return fl.FisherConfig(**values)


def assert_same_statistics(first: fl.FisherStats, second: fl.FisherStats, rtol: float = 1e-5) -> None:
    assert set(first) == set(second)
    for name in second:
        assert (first[name].num_tokens, first[name].num_examples) == \
            (second[name].num_tokens, second[name].num_examples), name
        for key in ("act_cov", "grad_cov", "grad_mean"):
            a, b = getattr(first[name], key), getattr(second[name], key)
            scale = float(b.abs().max())
            assert scale > 0, f"{name}.{key} is zero: the comparison would be vacuous"
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=1e-6 * scale,
                                       msg=lambda m, name=name, key=key: f"{name}.{key}: {m}")


class NeverIterated:
    def __iter__(self):  # noqa: ANN204
        raise AssertionError("the dataloader was iterated before the model was checked")


# --------------------------------------------------------------------------------------------
# Sequence classification: an example whose label is -100 is as if it were not in the batch
# --------------------------------------------------------------------------------------------


def drop_last(batch: dict | tuple) -> dict | tuple:
    if isinstance(batch, dict):
        return {key: value[:-1] for key, value in batch.items()}
    return tuple(value[:-1] for value in batch)


def ignore_last(batch: dict | tuple) -> dict | tuple:
    if isinstance(batch, dict):
        labels = batch["labels"].clone()
        labels[-1] = -100
        return {**batch, "labels": labels}
    labels = batch[1].clone()
    labels[-1] = -100
    return (batch[0], labels)


@pytest.mark.parametrize("kind", ["bert", "mlp", "cnn", "bert-true-fisher"])
def test_ignored_classification_example_is_left_out(kind: str) -> None:
    """The issue's input: a batch of 4 whose last label is -100 gives the statistics of the first 3."""
    options: dict = {"fisher": "true", "n_samples": 1} if kind == "bert-true-fisher" else {}
    if kind.startswith("bert"):
        model, batches, targets = tiny_bert().double(), text_batches(count=2, batch_size=4), ["query", "value",
                                                                                            "classifier"]
    elif kind == "mlp":
        model, batches, targets = TinyMLP().double(), pair_batches(count=2, batch_size=4), ["fc1", "fc2"]
        batches = [(inputs.double(), labels) for inputs, labels in batches]
    else:
        model, batches, targets = TinyCNN().double(), image_batches(count=2, batch_size=4), ["conv1", "conv2", "head"]
        batches = [(inputs.double(), labels) for inputs, labels in batches]
    ignored = fl.collect_fisher(model, [ignore_last(batch) for batch in batches], config(**options),
                                target_modules=targets)
    absent = fl.collect_fisher(model, [drop_last(batch) for batch in batches], config(**options),
                               target_modules=targets)
    if options:  # sampled labels: G, M depend on the draws, which depend on the batch's shape
        for name in absent:
            assert ignored[name].num_tokens == absent[name].num_tokens
            assert ignored[name].num_examples == absent[name].num_examples == 6
            torch.testing.assert_close(ignored[name].act_cov, absent[name].act_cov)
        return
    assert_same_statistics(ignored, absent, rtol=1e-4)
    assert all(layer.num_examples == 6 for layer in ignored.values())


def test_every_classification_label_ignored_is_an_error() -> None:
    batches = [ignore_last(ignore_last(batch)) for batch in pair_batches(count=1, batch_size=1)]
    with pytest.raises(fl.StatisticsError, match="module 'fc1' saw no unmasked token"):
        fl.collect_fisher(TinyMLP(), batches, config(), target_modules=["fc1"])


# --------------------------------------------------------------------------------------------
# Per-token heads, against the loss over exactly the kept positions
# --------------------------------------------------------------------------------------------


def recorder(calls: dict[str, tuple], name: str):  # noqa: ANN201
    """A forward hook keeping the layer's input and its grad-retaining output."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        calls[name] = (args[0], output)

    return hook


def reference(model: nn.Module, names: list[str], batches: list[dict], shift: bool) -> dict[str, dict]:
    """Per batch, the summed cross-entropy over the kept positions (attended, with a label, after
    the shift for a causal LM), `g` by `retain_grad`, and the rows at the kept positions, float64."""
    modules = dict(model.named_modules())
    sums: dict[str, dict] = {name: {"act": 0, "grad": 0, "tokens": 0} for name in names}
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for batch in batches:
        calls: dict[str, tuple] = {}
        handles = [modules[name].register_forward_hook(recorder(calls, name)) for name in names]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for handle in handles:
            handle.remove()
        labels, attended = batch["labels"], batch["attention_mask"].bool()
        targets = torch.full_like(labels, -100)
        if shift:
            targets[:, :-1] = labels[:, 1:]
        else:
            targets = labels.clone()
        kept = attended & (targets != -100)
        F.cross_entropy(logits[kept], targets[kept], reduction="sum").backward()
        for name, (x, y) in calls.items():
            rows, gradients = x.detach()[kept], y.grad[kept]
            sums[name]["act"] = sums[name]["act"] + rows.T @ rows
            sums[name]["grad"] = sums[name]["grad"] + gradients.T @ gradients
            sums[name]["tokens"] += int(kept.sum())
    model.zero_grad(set_to_none=True)
    return {name: {"act_cov": s["act"] / s["tokens"], "grad_cov": s["grad"] / s["tokens"], "num_tokens": s["tokens"]}
            for name, s in sums.items()}


def assert_matches_reference(stats: fl.FisherStats, expected: dict[str, dict]) -> None:
    for name, values in expected.items():
        assert stats[name].num_tokens == values["num_tokens"], name
        for key in ("act_cov", "grad_cov"):
            scale = float(values[key].abs().max())
            assert scale > 0
            torch.testing.assert_close(getattr(stats[name], key).double(), values[key], rtol=1e-4,
                                       atol=1e-5 * scale, msg=lambda m, name=name, key=key: f"{name}.{key}: {m}")


def tiny_bert_head(kind: str) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification

    torch.manual_seed(0)
    bert_config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=24, max_position_embeddings=32, num_labels=5)
    head = BertForTokenClassification if kind == "token-classification" else BertForMaskedLM
    return head(bert_config).double().eval()


@pytest.mark.parametrize("kind", ["token-classification", "masked-lm"])
def test_token_heads_are_not_shifted(kind: str) -> None:
    model = tiny_bert_head(kind)
    batches = text_batches(count=2, batch_size=3, length=7)
    classes = 5 if kind == "token-classification" else 50
    generator = torch.Generator().manual_seed(1)
    for batch in batches:
        labels = torch.randint(0, classes, batch["input_ids"].shape, generator=generator)
        labels[batch["attention_mask"] == 0] = -100
        labels[:, 0] = -100  # e.g. [CLS], or an unmasked token of a masked LM
        batch["labels"] = labels
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.intermediate.dense"]
    stats = fl.collect_fisher(model, batches, config(), target_modules=["query", "intermediate.dense"])
    assert_matches_reference(stats, reference(model, names, batches, shift=False))


def test_causal_lm_loss_terms_are_the_kept_positions() -> None:
    """Labels left on padding (not -100): a padded position is no loss term and no row, the real
    position before the padding still predicts its next label."""
    model = tiny_gpt2().double()
    batches = lm_batches(count=2, batch_size=3, length=8)
    for batch in batches:
        batch["labels"] = torch.where(batch["attention_mask"] == 1, batch["labels"], batch["input_ids"])
    assert any((batch["attention_mask"] == 0).any() for batch in batches)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    stats = fl.collect_fisher(model, batches, config(), target_modules=["c_attn", "c_fc"])
    assert_matches_reference(stats, reference(model, names, batches, shift=True))


# --------------------------------------------------------------------------------------------
# Heads whose loss the default does not compute
# --------------------------------------------------------------------------------------------


def test_regression_head_is_refused() -> None:
    """`num_labels == 1`: transformers computes a mean squared error, not a cross-entropy."""
    batches = [{**batch, "labels": batch["labels"] * 0} for batch in text_batches(count=1)]
    with pytest.raises(fl.StatisticsError, match=r"BertForSequenceClassification.*regression.*loss_fn="):
        fl.collect_fisher(tiny_bert(num_labels=1), batches, config(), target_modules=["query"])


def test_multi_label_head_is_refused() -> None:
    model = tiny_bert()
    model.config.problem_type = "multi_label_classification"
    batches = [{**batch, "labels": F.one_hot(batch["labels"], 3).float()} for batch in text_batches(count=1)]
    with pytest.raises(fl.StatisticsError, match=r"multi_label_classification.*loss_fn="):
        fl.collect_fisher(model, batches, config(), target_modules=["query"])


def tiny_bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    bart_config = BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                             max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return BartForConditionalGeneration(bart_config).double().eval()


def seq2seq_batches(count: int, batch_size: int, source: int, target: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 40, (batch_size, source), generator=generator),
             "attention_mask": torch.ones(batch_size, source, dtype=torch.long),
             "labels": torch.randint(3, 40, (batch_size, target), generator=generator)} for _ in range(count)]


def test_encoder_decoder_is_refused_before_any_batch() -> None:
    """Today's alternative: labels of the source's length are shifted as a causal LM's, and the
    encoder's attention mask is applied to decoder rows; shorter labels fail on shapes."""
    from peft import LoraConfig, get_peft_model

    for model in (tiny_bart(), get_peft_model(tiny_bart(), LoraConfig(r=2, target_modules=["q_proj"]))):
        kwargs = {} if hasattr(model, "peft_config") else {"target_modules": ["q_proj"]}
        with pytest.raises(fl.StatisticsError, match=r"BartForConditionalGeneration is an encoder-decoder.*loss_fn="):
            fl.collect_fisher(model, NeverIterated(), config(), **kwargs)


def seq2seq_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def test_encoder_decoder_with_loss_fn_matches_its_own_gradients() -> None:
    """Unpadded batches: every row of both stacks is a kept token; `G` is the Fisher of the summed loss."""
    model = tiny_bart()
    batches = seq2seq_batches(count=2, batch_size=2, source=6, target=4)
    names = ["model.encoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.encoder_attn.k_proj",
             "model.decoder.layers.0.fc1"]
    stats = fl.collect_fisher(model, batches, config(loss_reduction="mean"), target_modules=names,
                              loss_fn=seq2seq_loss)
    modules = dict(model.named_modules())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    sums = {name: [0, 0, 0] for name in names}
    for batch in batches:
        calls: dict[str, tuple] = {}
        handles = [modules[name].register_forward_hook(recorder(calls, name)) for name in names]
        loss = model(**batch).loss * batch["labels"].numel()  # HF averages over the label tokens
        for handle in handles:
            handle.remove()
        loss.backward()
        for name, (x, y) in calls.items():
            rows, gradients = x.detach().reshape(-1, x.shape[-1]), y.grad.reshape(-1, y.shape[-1])
            sums[name] = [sums[name][0] + rows.T @ rows, sums[name][1] + gradients.T @ gradients,
                          sums[name][2] + rows.shape[0]]
    for name, (act, grad, tokens) in sums.items():
        assert stats[name].num_tokens == tokens
        torch.testing.assert_close(stats[name].act_cov.double(), act / tokens, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats[name].grad_cov.double(), grad / tokens, rtol=1e-4, atol=1e-9)
        assert float(stats[name].grad_cov.abs().max()) > 0


def test_encoder_decoder_with_loss_fn_refuses_padding() -> None:
    batches = seq2seq_batches(count=1, batch_size=2, source=6, target=4)
    batches[0]["attention_mask"][1, 4:] = 0
    with pytest.raises(fl.StatisticsError, match=r"encoder-decoder.*batch 0 has padding \(attention_mask\)"):
        fl.collect_fisher(tiny_bart(), batches, config(loss_reduction="mean"), target_modules=["q_proj"],
                          loss_fn=seq2seq_loss)
