"""The `fisherlora init` job: a sequence-classification model folder plus a labeled CSV in, an
initialized adapter, its residual base model and the statistics out."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .api import collect_fisher, initialize_lora_fisher
from .config import FisherConfig
from .files import staged_directory


@dataclass
class TextInitJob:
    """Arguments of `fisherlora init`.

    Attributes:
        model: folder of a Hugging Face model loadable with `AutoModelForSequenceClassification`.
        data: CSV file (optionally .bz2) with a text and a label column.
        text_column, label_column: column names.
        out: output folder (written atomically).
        rank, alpha: LoRA rank and alpha; `use_rslora` switches to `alpha / sqrt(r)`.
        targets: LoRA target module names.
        batch_size, max_length: calibration batches.
        fisher: FisherConfig (method, Fisher type, number of batches, damping, ...).
        seed: seed of the new classification head.
    """

    model: str
    data: str
    text_column: str
    label_column: str
    out: str
    rank: int = 8
    alpha: int = 16
    use_rslora: bool = False
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    fisher: FisherConfig = field(default_factory=FisherConfig)


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


def run_text_init(job: TextInitJob) -> dict[str, Any]:
    """Collect statistics on the CSV, initialize a LoRA adapter, and write the output folder:

    - `adapter/`: the initialized PEFT adapter (with the new classification head); it applies to
    - `residual_model/`: the base model whose targeted weights hold `W - s B A`, plus its tokenizer;
    - `stats.safetensors`: the Fisher statistics; `report.json`: per-layer report and settings.

    After training, `fisherlora.save_as_lora(model, out, initial_adapter="OUT/adapter")` writes
    an adapter for the original base model.

    Returns:
        the content of `report.json`.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from .bench.data import read_labeled_csv

    model_dir = Path(job.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {model_dir} has no config.json")
    texts, raw_labels = read_labeled_csv(job.data, job.text_column, job.label_column)
    if not texts:
        raise ValueError(f"{job.data} has no rows")
    model_config = AutoConfig.from_pretrained(model_dir)
    labels, mapping = _label_ids(raw_labels, model_config, job.data, job.label_column)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(job.seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=max(mapping.values()) + 1, id2label={v: k for k, v in mapping.items()},
        label2id=mapping,
    )
    lora_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=job.rank, lora_alpha=job.alpha,
                             target_modules=list(job.targets), use_rslora=job.use_rslora)
    model: Any = get_peft_model(base, lora_config)
    batches = _batches(tokenizer, texts, labels, job.batch_size, job.max_length)
    stats = collect_fisher(model, batches, job.fisher)
    reports = initialize_lora_fisher(model, stats, job.fisher)

    with staged_directory(job.out) as staging:
        stats.save(staging / "stats.safetensors")
        model.save_pretrained(str(staging / "adapter"))
        # The residual base without the LoRA wrappers: unload() restores plain modules in place.
        residual_model = model.unload()
        residual_model.save_pretrained(str(staging / "residual_model"))
        tokenizer.save_pretrained(str(staging / "residual_model"))
        summary = {
            "model": str(model_dir),
            "data": job.data,
            "examples": len(texts),
            "labels": mapping,
            "job": {**asdict(job), "fisher": job.fisher.to_dict()},
            "layers": [asdict(report) for report in reports],
        }
        (staging / "report.json").write_text(json.dumps(summary, indent=2))
    return summary
