"""The `fisherlora init` job for causal language models: a model folder plus prompt/completion or
chat-message data in, an initialized adapter, its residual base model and the statistics out.

The statistics see the completion tokens only (the loss of every other position is masked, and
padding too), in the batches the training recipe uses (`fisherlora.data.causal_lm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.causal_lm import CausalLMFields, calibration_batches, pad_token_id, read_causal_lm_examples
from .common import (
    ALL_LINEAR,
    InitJob,
    check_targets,
    initialize,
    layer_entries,
    lora_model,
    model_config,
    parse_targets,
    resolve_task,
    torch_dtype,
    write_outputs,
)


@dataclass
class CausalLMInitJob(InitJob):
    """`fisherlora init` on a causal LM (`AutoModelForCausalLM`).

    Attributes (besides `InitJob`'s):
        data: JSONL or CSV file (optionally .bz2/.gz) of prompt/completion or chat-message records.
        prompt_field, completion_field: fields of the prompt/completion layout.
        messages_field: field of the chat layout (a list of `{"role", "content"}` messages, rendered
            with the tokenizer's chat template).
    """

    targets: list[str] | None = field(default_factory=lambda: [ALL_LINEAR])
    batch_size: int = 8
    max_length: int = 512
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"

    @property
    def fields(self) -> CausalLMFields:
        return CausalLMFields(self.prompt_field, self.completion_field, self.messages_field)


def run_causal_lm_init(job: CausalLMInitJob) -> dict[str, Any]:
    """Collect completion-only statistics, initialize a LoRA adapter, and write the output folder:

    - `adapter/`: the initialized PEFT adapter, in the model's dtype; it applies to
    - `residual_model/`: the base model whose targeted weights hold `W - s B A`, plus its tokenizer
      (only when the method's adapter does not start at zero);
    - `stats.safetensors`: the Fisher statistics (float32); `report.json`: settings and, per layer,
      the captured Fisher energy, the tokens seen, shape and dtype.

    The model folder, the targets and every record are checked before the model is run, so bad input
    fails in seconds and writes nothing. After training, `fisherlora.save_as_lora(model, out,
    initial_adapter="OUT/adapter")` writes an adapter for the original base model.

    Returns:
        the content of `report.json`.

    Raises:
        ValueError: not a causal LM; a record with a missing or empty field (its line); examples
            longer than `max_length`; targets that match no module (the linear layers are listed).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job.check()
    targets = parse_targets(job.targets or [])
    resolve_task(job.model, model_config(job.model), "causal-lm")
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    examples, layout = read_causal_lm_examples(job.data, tokenizer, job.max_length, job.fields)
    torch.manual_seed(job.seed)
    base = AutoModelForCausalLM.from_pretrained(job.model, dtype=torch_dtype(job.dtype))
    check_targets(base, targets, job.model)
    embedding: Any = base.get_input_embeddings()
    vocabulary = int(embedding.weight.shape[0])
    largest = max(max(example.input_ids) for example in examples)
    if largest >= vocabulary:
        raise ValueError(f"the tokenizer in {job.model} gives token id {largest}, but the model's embedding has "
                         f"{vocabulary} rows: the tokenizer does not belong to this model")
    model = lora_model(base, job, targets, "CAUSAL_LM")
    batches = calibration_batches(examples, job.batch_size, pad_token_id(tokenizer))
    stats, reports = initialize(model, batches, job.fisher)
    used = batches if job.fisher.num_batches is None else batches[:job.fisher.num_batches]
    summary = {
        "task": "causal-lm",
        "model": str(Path(job.model)),
        "data": job.data,
        "format": layout,
        "examples": sum(len(batch["input_ids"]) for batch in used),
        "completion_tokens": sum(int((batch["labels"] != -100).sum()) for batch in used),
        "job": job.to_dict(),
        "layers": layer_entries(reports, stats, model),
    }
    return write_outputs(job.out, model, tokenizer, stats, summary)
