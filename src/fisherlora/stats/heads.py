"""Which loss a model's head computes, so that the default loss keeps exactly its loss terms.

A transformers model names its loss in `loss_type` (derived from the class name:
`ForSequenceClassification`, `ForCausalLM`, ...; `None` falls back to the causal-LM loss, as
transformers does). The label layouts the default loss reproduces:

| layout | labels | one loss term per | heads |
|---|---|---|---|
| `sequence` | `(B,)` | example with `label != -100` | sequence, image, audio, video classification |
| `token` | `(B, S)` | position with `label != -100` | token classification, masked LM |
| `causal` | `(B, S)` | position `t` with `label[t+1] != -100` | causal LM, decoder-only `ForConditionalGeneration` |

`seq2seq` (encoder-decoder models) and every other head (regression, multi-label, question
answering, detection, CTC, ...) need a `loss_fn`. A module that is not a transformers model has no
declared head: its layout is read from its logits, `(B, C)` as `sequence` and `(B, S, V)` as
`causal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

Layout = Literal["sequence", "token", "causal", "seq2seq"]

_LOSS_TYPE_LAYOUTS: dict[str, Layout] = {
    "ForSequenceClassification": "sequence",
    "ForImageClassification": "sequence",
    "ForAudioClassification": "sequence",
    "ForVideoClassification": "sequence",
    "ForTokenClassification": "token",
    "ForMaskedLM": "token",
    "ForCausalLM": "causal",
    "ForConditionalGeneration": "causal",  # decoder-only ones: encoder-decoders are caught before
}


@dataclass(frozen=True)
class Head:
    """A model's loss head.

    Attributes:
        name: the model's class name (inside a PEFT wrapper), for messages.
        layout: the label layout, or None for a module without a declared head.
        unsupported: why the default loss cannot reproduce the model's own loss, or None if it can.
    """

    name: str
    layout: Layout | None
    unsupported: str | None = None


def head_of(model: nn.Module) -> Head:
    """The head of `model` (a PEFT model is looked through to its base model)."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else model
    name = type(inner).__name__
    config: Any = getattr(inner, "config", None)
    if not hasattr(config, "is_encoder_decoder"):
        return Head(name, None)
    if config.is_encoder_decoder:
        return Head(name, "seq2seq", "is an encoder-decoder model (config.is_encoder_decoder): its loss runs over the "
                    "decoder's labels, and the encoder and decoder rows need masks of their own")
    loss_type = getattr(inner, "loss_type", None) or "ForCausalLM"
    layout = _LOSS_TYPE_LAYOUTS.get(loss_type)
    if layout is None:
        return Head(name, None, f"computes a {loss_type} loss, which is not a cross-entropy over labels")
    if layout == "sequence":
        problem_type = getattr(config, "problem_type", None)
        if problem_type == "regression" or (problem_type is None and getattr(config, "num_labels", 2) == 1):
            return Head(name, layout, "is a regression head (num_labels == 1 or problem_type 'regression'): "
                        "transformers computes a mean squared error")
        if problem_type == "multi_label_classification":
            return Head(name, layout, "is a multi-label head (problem_type 'multi_label_classification'): "
                        "transformers computes a binary cross-entropy per label")
    return Head(name, layout)
