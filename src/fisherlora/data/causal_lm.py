"""Causal-LM data: prompt/completion or chat `messages` records -> token ids whose labels are the
completion tokens only.

Two record layouts (field names configurable, see `CausalLMFields`):

- prompt/completion: `{"prompt": "...", "completion": "..."}`; the text is `prompt + completion`
  (no separator is added), the prompt tokenized with the tokenizer's special tokens (e.g. BOS), the
  completion without them and followed by EOS so the model learns to stop.
- messages: `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}`
  rendered with the tokenizer's chat template; the completion is every assistant turn (its content
  and the template's end-of-turn text), everything else (system, user, the generation prompt) is
  context. A CSV cell holds the list as JSON text.

Each run of context or completion text is tokenized on its own and the ids concatenated, so the
boundary between prompt and completion is exact and the prompt's ids are those a user feeds to
`generate`. Labels are the input ids on completion tokens and -100 elsewhere; padding (added when
batching) is masked too. No example is ever truncated: one longer than `max_length` is an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..stats.objective import IGNORE_INDEX
from .records import Record, read_records

DataFormat = Literal["prompt-completion", "messages"]
MAX_LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class CausalLMFields:
    """Field names of a causal-LM data file."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized example.

    Attributes:
        line: line of the data file the example comes from.
        input_ids: prompt and completion token ids, `len(input_ids) <= max_length`.
        labels: `input_ids` on completion tokens, -100 on context tokens; same length.
    """

    line: int
    input_ids: list[int]
    labels: list[int]

    @property
    def completion_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class DataError(ValueError):
    """The data file has records that cannot be used (each named with its line)."""


def _raise_problems(path: str | Path, problems: list[tuple[int, str]]) -> None:
    if not problems:
        return
    listed = "; ".join(f"line {line}: {message}" for line, message in problems[:MAX_LISTED_PROBLEMS])
    more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataError(f"{path}: {len(problems)} unusable record(s): {listed}{more}")


def detect_format(first: Record, fields: CausalLMFields, path: str | Path) -> DataFormat:
    """The layout of a file, from its first record: prompt/completion when it has both fields, else messages."""
    if fields.prompt in first.fields and fields.completion in first.fields:
        return "prompt-completion"
    if fields.messages in first.fields:
        return "messages"
    raise DataError(
        f"line {first.line} of {path} has neither fields {fields.prompt!r} and {fields.completion!r} nor a "
        f"{fields.messages!r} field (it has {sorted(first.fields)}); name yours with --prompt-field and "
        "--completion-field, or --messages-field"
    )


def _text_field(record: Record, name: str) -> str:
    if name not in record.fields:
        raise DataError(f"no field {name!r} (fields: {sorted(record.fields)})")
    value = record.fields[name]
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is a {type(value).__name__}, expected a string")
    return value


def _messages(record: Record, name: str) -> list[dict[str, str]]:
    if name not in record.fields:
        raise DataError(f"no field {name!r} (fields: {sorted(record.fields)})")
    value = record.fields[name]
    if isinstance(value, str):  # a CSV cell: the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"field {name!r} is not a JSON list of messages: {error.msg}") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"field {name!r} must be a non-empty list of {{'role': ..., 'content': ...}} messages")
    for index, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"message {index} of field {name!r} needs a string 'role' and a string 'content'")
    if not any(message["role"] == "assistant" and message["content"].strip() for message in value):
        raise DataError(f"empty completion: no assistant message with content in field {name!r}")
    return value


def prompt_completion_pieces(record: Record, fields: CausalLMFields) -> list[tuple[str, bool]]:
    """`[(prompt, False), (completion, True)]`; `DataError` for a missing, non-string or empty field."""
    prompt = _text_field(record, fields.prompt)
    completion = _text_field(record, fields.completion)
    if not completion.strip():
        raise DataError(f"empty completion (field {fields.completion!r})")
    return [(prompt, False), (completion, True)]


def chat_pieces(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the chat-template rendering of `messages` into `(text, is_completion)` runs.

    An assistant turn is the text the template adds between the conversation before it (with the
    generation prompt) and the conversation including it. Needs a template that renders a
    conversation's prefix as a prefix of its text; `DataError` otherwise.
    """

    def render(count: int, generation_prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(messages[:count], tokenize=False,
                                                 add_generation_prompt=generation_prompt))

    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for count in range(1, len(messages) + 1):
        is_assistant = messages[count - 1]["role"] == "assistant"
        steps = [(render(count - 1, True), False)] if is_assistant else []
        for text, is_completion in [*steps, (render(count, False), is_assistant)]:
            if not text.startswith(rendered):
                raise DataError(
                    "the chat template does not render conversations incrementally (the text up to message "
                    f"{count - 1} is not a prefix of the text up to message {count}); use prompt/completion fields"
                )
            pieces.append((text[len(rendered):], is_completion))
            rendered = text
    return _merge(pieces)


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Join neighbouring runs of the same kind and drop empty ones, so each run is tokenized whole."""
    merged: list[tuple[str, bool]] = []
    for text, is_completion in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == is_completion:
            merged[-1] = (merged[-1][0] + text, is_completion)
        else:
            merged.append((text, is_completion))
    return merged


def encode_pieces(tokenizer: Any, pieces: Sequence[tuple[str, bool]], line: int,
                  special_tokens: bool) -> EncodedExample:
    """Tokenize each run on its own and concatenate.

    Args:
        special_tokens: add the tokenizer's special tokens (e.g. BOS) to the first run and EOS after
            the last completion run (prompt/completion text); False for chat-template text, which
            already holds them.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for index, (text, is_completion) in enumerate(pieces):
        ids = list(tokenizer(text, add_special_tokens=special_tokens and index == 0).input_ids)
        if special_tokens and is_completion and index == len(pieces) - 1 and tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        input_ids += ids
        labels += ids if is_completion else [IGNORE_INDEX] * len(ids)
    return EncodedExample(line, input_ids, labels)


def encode_records(records: Sequence[Record], tokenizer: Any, path: str | Path, max_length: int,
                   fields: CausalLMFields = CausalLMFields()) -> tuple[list[EncodedExample], DataFormat]:
    """Tokenize every record; every problem is found before anything is returned.

    Returns:
        the examples in file order and the detected layout.

    Raises:
        DataError: no records; a record with a missing, non-string or empty field, or malformed
            messages (each named by line); a chat layout with a tokenizer that has no chat template;
            examples longer than `max_length` tokens (how many, the longest and its line).
    """
    if not records:
        raise DataError(f"{path} has no records")
    layout = detect_format(records[0], fields, path)
    if layout == "messages" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path} holds chat messages but the model's tokenizer has no chat template; "
                        "add one to tokenizer_config.json or use prompt/completion fields")
    examples = []
    problems: list[tuple[int, str]] = []
    for record in records:
        try:
            if layout == "prompt-completion":
                pieces = prompt_completion_pieces(record, fields)
            else:
                pieces = chat_pieces(_messages(record, fields.messages), tokenizer)
        except DataError as error:
            problems.append((record.line, str(error)))
            continue
        examples.append(encode_pieces(tokenizer, pieces, record.line, special_tokens=layout == "prompt-completion"))
    _raise_problems(path, problems)
    too_long = [example for example in examples if len(example.input_ids) > max_length]
    if too_long:
        longest = max(too_long, key=lambda example: len(example.input_ids))
        lines = ", ".join(str(example.line) for example in too_long[:MAX_LISTED_PROBLEMS])
        more = ", ..." if len(too_long) > MAX_LISTED_PROBLEMS else ""
        raise DataError(
            f"{path}: {len(too_long)} of {len(examples)} examples are longer than --max-length {max_length} tokens "
            f"(lines {lines}{more}; the longest has {len(longest.input_ids)} tokens, line {longest.line}); raise "
            f"--max-length to at least {len(longest.input_ids)} (examples are never truncated: that could cut the "
            "completion away)"
        )
    return examples, layout


def read_causal_lm_examples(path: str | Path, tokenizer: Any, max_length: int,
                            fields: CausalLMFields = CausalLMFields()) -> tuple[list[EncodedExample], DataFormat]:
    """Read a CSV/JSONL file and tokenize it (see `encode_records`)."""
    return encode_records(read_records(path), tokenizer, path, max_length, fields)


class CompletionCollator:
    """Right-pad examples into a batch: `input_ids`, `attention_mask`, `labels`, each `(B, T)` long.

    Padding gets `attention_mask == 0` and label -100. Usable as a `transformers.Trainer`
    `data_collator` on dicts with `input_ids` and `labels`. Pads on the right whatever the
    tokenizer's `padding_side` (chat models often set it to "left" for generation).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Any] | EncodedExample]) -> dict[str, torch.Tensor]:
        rows = [(f.input_ids, f.labels) if isinstance(f, EncodedExample) else (f["input_ids"], f["labels"])
                for f in features]
        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.as_tensor(row_labels, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (a causal LM often has no pad token; padding is masked)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def calibration_batches(examples: Sequence[EncodedExample], batch_size: int,
                        pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive examples in batches of `batch_size` (see `CompletionCollator`)."""
    collate = CompletionCollator(pad_id)
    return [collate(examples[start:start + batch_size]) for start in range(0, len(examples), batch_size)]


def training_features(examples: Sequence[EncodedExample]) -> list[dict[str, list[int]]]:
    """`[{"input_ids": ..., "labels": ...}]`: a `transformers.Trainer` `train_dataset` for `CompletionCollator`."""
    return [{"input_ids": list(example.input_ids), "labels": list(example.labels)} for example in examples]
