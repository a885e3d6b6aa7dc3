"""The `fisherlora init` job for sequence classification: a model folder plus a labeled CSV or JSONL file in, an
initialized adapter (with a new or the trained classification head), its residual base model and
the statistics out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.records import read_labeled_examples
from .common import (
    InitJob,
    check_targets,
    initialize,
    layer_entries,
    lora_model,
    model_config,
    parse_targets,
    torch_dtype,
    write_outputs,
)


@dataclass
class SeqClsInitJob(InitJob):
    """`fisherlora init` on a sequence classifier (`AutoModelForSequenceClassification`).

    Attributes (besides `InitJob`'s):
        data: CSV file with a header row, or a JSON Lines file (`.jsonl`/`.json`) of objects; either
            optionally .bz2/.gz.
        text_column, label_column: column (JSONL: field) names.
    """

    targets: list[str] | None = field(default_factory=lambda: ["query", "value"])
    batch_size: int = 16
    max_length: int = 128
    text_column: str = "text"
    label_column: str = "label"


def _label_ids(labels: list[str], model_config: Any, data: str, label_column: str) -> tuple[list[int], dict[str, int]]:
    """Map label strings to class ids; refuse labels that do not fit an existing trained head."""
    distinct = sorted(set(labels), key=lambda value: (not value.lstrip("-").isdigit(), int(value)
                                                      if value.lstrip("-").isdigit() else 0, value))
    architectures = getattr(model_config, "architectures", None) or []
    has_trained_head = any(name.endswith("ForSequenceClassification") for name in architectures)
    if has_trained_head:
        label2id = {str(key): int(value) for key, value in (model_config.label2id or {}).items()}
        head_size = int(model_config.num_labels)
        if all(label in label2id for label in distinct):
            mapping = {label: label2id[label] for label in distinct}
        elif all(label.lstrip("-").isdigit() for label in distinct):
            mapping = {label: int(label) for label in distinct}
        else:
            raise ValueError(
                f"labels {distinct[:10]} in column {label_column!r} of {data} are not among the model's labels "
                f"{sorted(label2id)} (config.json of the model)"
            )
        bad = [label for label, index in mapping.items() if not 0 <= index < head_size]
        if bad:
            raise ValueError(
                f"labels {bad[:10]} in column {label_column!r} of {data} do not fit the model's classification head "
                f"with {head_size} outputs"
            )
        return [mapping[label] for label in labels], mapping
    if len(distinct) < 2:
        raise ValueError(f"column {label_column!r} of {data} has {len(distinct)} distinct label(s); need at least 2")
    mapping = {label: index for index, label in enumerate(distinct)}
    return [mapping[label] for label in labels], mapping


def _batches(tokenizer: Any, texts: list[str], labels: list[int], batch_size: int,
             max_length: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        batch = {key: value for key, value in encoded.items() if key in ("input_ids", "attention_mask",
                                                                         "token_type_ids")}
        batch["labels"] = torch.tensor(labels[start:start + batch_size], dtype=torch.long)
        batches.append(batch)
    return batches


def run_seq_cls_init(job: SeqClsInitJob) -> dict[str, Any]:
    """Collect statistics on the labeled data, initialize a LoRA adapter, and write the output folder:

    - `adapter/`: the initialized PEFT adapter (with the new classification head); it applies to
    - `residual_model/`: the base model whose targeted weights hold `W - s B A`, plus its tokenizer;
    - `stats.safetensors`: the Fisher statistics; `report.json`: per-layer report and settings.

    After training, `fisherlora.save_as_lora(model, out, initial_adapter="OUT/adapter")` writes
    an adapter for the original base model. Texts longer than `max_length` tokens are truncated.

    Returns:
        the content of `report.json`.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    job.check()
    targets = parse_targets(job.targets or [])
    config = model_config(job.model)
    texts, raw_labels = read_labeled_examples(job.data, job.text_column, job.label_column)
    if not texts:
        raise ValueError(f"{job.data} has no rows")
    labels, mapping = _label_ids(raw_labels, config, job.data, job.label_column)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    torch.manual_seed(job.seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        job.model, num_labels=max(mapping.values()) + 1, id2label={v: k for k, v in mapping.items()},
        label2id=mapping, dtype=torch_dtype(job.dtype),
    )
    check_targets(base, targets, job.model)
    model = lora_model(base, job, targets, "SEQ_CLS")
    batches = _batches(tokenizer, texts, labels, job.batch_size, job.max_length)
    stats, reports = initialize(model, batches, job.fisher)
    summary = {
        "task": "seq-cls",
        "model": str(Path(job.model)),
        "data": job.data,
        "examples": len(texts),
        "labels": mapping,
        "job": job.to_dict(),
        "layers": layer_entries(reports, stats, model),
    }
    return write_outputs(job.out, model, tokenizer, stats, summary)
