"""`fisherlora init` on causal LMs (tiny random Llama and GPT-2): completion-only data, targets,
dtypes, outputs, and a clear error with nothing written for every kind of bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fisherlora.cli import main
from fisherlora.data.causal_lm import CompletionCollator, encode_records, read_causal_lm_examples
from fisherlora.data.records import Record, read_records
from models import save_causal_lm, tiny_bert, tiny_gpt2, tiny_llama, tiny_tokenizer

WORDS = ["stone", "apple", "river", "green", "music", "paper"]


def prompt_completion_rows(count: int = 12) -> list[dict[str, str]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        picked = [WORDS[int(i)] for i in torch.randperm(len(WORDS), generator=generator)[:3]]
        rows.append({"prompt": f"Sort the words: {' '.join(picked)} ->", "completion": " " + " ".join(sorted(picked))})
    return rows


def conversation(index: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"Sort: {WORDS[index % 6]} {WORDS[(index + 1) % 6]}"},
            {"role": "assistant", "content": " ".join(sorted([WORDS[index % 6], WORDS[(index + 1) % 6]]))},
            {"role": "user", "content": "Reverse it"},
            {"role": "assistant", "content": " ".join(sorted([WORDS[index % 6], WORDS[(index + 1) % 6]])[::-1])}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return save_causal_lm(tmp_path_factory.mktemp("tiny_llama"), tiny_llama(len(tokenizer)), tokenizer)


def run_init(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["init", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--rank", "2",
                 "--batch-size", "4", "--no-progress", *extra])


# ----------------------------------------------------------------------------- data encoding


def test_prompt_completion_labels_are_the_completion_and_eos(tokenizer):
    rows = prompt_completion_rows(4)
    records = [Record(line, row) for line, row in enumerate(rows, start=1)]
    examples, layout = encode_records(records, tokenizer, "data.jsonl", max_length=64)
    assert layout == "prompt-completion"
    for example, row in zip(examples, rows, strict=True):
        prompt_ids = tokenizer(row["prompt"]).input_ids
        assert example.input_ids[:len(prompt_ids)] == prompt_ids  # the ids a user feeds to generate()
        completion = [label for label in example.labels if label != -100]
        assert tokenizer.decode(completion) == row["completion"] + tokenizer.eos_token
        assert example.labels[:len(prompt_ids)] == [-100] * len(prompt_ids)
        assert example.labels[len(prompt_ids):] == example.input_ids[len(prompt_ids):]


def test_chat_template_labels_are_the_assistant_turns(tokenizer):
    messages = conversation(0)
    examples, layout = encode_records([Record(1, {"messages": messages})], tokenizer, "chat.jsonl", max_length=256)
    assert layout == "messages"
    example = examples[0]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered
    completion = tokenizer.decode([label for label in example.labels if label != -100])
    assert completion == "".join(f"{m['content']}<|im_end|>\n" for m in messages if m["role"] == "assistant")
    # The context before the first answer is exactly the generation prompt a user would render.
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    first = example.labels.index(next(label for label in example.labels if label != -100))
    assert example.input_ids[:first] == tokenizer(prompt, add_special_tokens=False).input_ids


def test_csv_records_keep_their_line_numbers(tmp_path: Path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["a\nmultiline prompt", "x"])
        writer.writerow(["b", "y"])
    assert [(record.line, record.fields["prompt"]) for record in read_records(path)] == [
        (2, "a\nmultiline prompt"), (4, "b")]


def test_jsonl_lines_that_are_not_objects_are_named(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n["a", "b"]\n')
    with pytest.raises(ValueError, match=r"data\.jsonl: line 3: expected a JSON object, got list"):
        read_records(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "half-writ\n')
    with pytest.raises(ValueError, match=r"data\.jsonl: line 2: not valid JSON"):
        read_records(path)


def test_collator_pads_on_the_right_and_masks_padding(tokenizer):
    rows = prompt_completion_rows(2)
    examples, _ = encode_records([Record(i, row) for i, row in enumerate(rows)], tokenizer, "d.jsonl", 64)
    batch = CompletionCollator(pad_token_id=7)(examples)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        assert batch["input_ids"][row, :length].tolist() == example.input_ids
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        assert (batch["labels"][row, length:] == -100).all()


# ----------------------------------------------------------------------------- the init command


def brute_force_completion_tokens(tokenizer, rows: list[dict[str, str]]) -> int:
    """Completion tokens counted directly: the completion tokenized alone, plus EOS."""
    return sum(len(tokenizer(row["completion"], add_special_tokens=False).input_ids) + 1 for row in rows)


def test_init_collects_statistics_on_completion_tokens_only(llama_dir: Path, tmp_path: Path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = prompt_completion_rows(10)
    out = tmp_path / "out"
    assert run_init(llama_dir, write_jsonl(tmp_path / "data.jsonl", rows), out, "--method", "fisher_svd",
                    "--captured-energy") == 0
    assert {path.name for path in out.iterdir()} == {"adapter", "residual_model", "stats.safetensors", "report.json"}
    report = json.loads((out / "report.json").read_text())
    # all-linear: 7 projections in each of the 2 blocks, lm_head excluded (PEFT's rule).
    assert len(report["layers"]) == 14 and not any("lm_head" in layer["name"] for layer in report["layers"])
    expected = brute_force_completion_tokens(tokenizer, rows)
    assert report["completion_tokens"] == expected and report["format"] == "prompt-completion"
    assert {layer["tokens"] for layer in report["layers"]} == {expected}
    assert all(0 < layer["captured_energy"] <= 1 for layer in report["layers"])

    # residual model + initialized adapter == the original model.
    original = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    initialized = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "residual_model"),
                                            str(out / "adapter")).eval()
    input_ids = torch.tensor([tokenizer("Sort the words: river apple ->").input_ids])
    with torch.no_grad():
        difference = (initialized(input_ids=input_ids).logits - original(input_ids=input_ids).logits).abs().max()
    assert difference <= 1e-4


def test_init_renders_messages_with_the_chat_template(llama_dir: Path, tmp_path: Path, tokenizer):
    rows = [{"messages": conversation(index)} for index in range(6)]
    out = tmp_path / "out"
    assert run_init(llama_dir, write_jsonl(tmp_path / "chat.jsonl", rows), out, "--targets", "q_proj", "v_proj") == 0
    report = json.loads((out / "report.json").read_text())
    answers = [m["content"] + "<|im_end|>\n" for row in rows for m in row["messages"] if m["role"] == "assistant"]
    expected = sum(len(tokenizer(answer, add_special_tokens=False).input_ids) for answer in answers)
    assert report["format"] == "messages" and report["completion_tokens"] == expected
    assert sorted(layer["name"] for layer in report["layers"]) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")]


def test_init_on_gpt2_with_a_regex_target_and_csv_data(tmp_path: Path, tokenizer):
    model_dir = save_causal_lm(tmp_path / "gpt2", tiny_gpt2(vocab_size=len(tokenizer)), tokenizer)
    rows = prompt_completion_rows(8)
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows({"question": row["prompt"], "answer": row["completion"]} for row in rows)
    out = tmp_path / "out"
    code = run_init(model_dir, data, out, "--targets", r"transformer\.h\.\d\.attn\.c_attn", "--prompt-field",
                    "question", "--completion-field", "answer", "--max-length", "32")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [layer["name"] for layer in report["layers"]] == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    assert report["completion_tokens"] == brute_force_completion_tokens(tokenizer, rows)


def test_bfloat16_model_gives_bfloat16_adapter_and_float32_statistics(llama_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert run_init(llama_dir, write_jsonl(tmp_path / "d.jsonl", prompt_completion_rows(8)), out,
                    "--dtype", "bfloat16") == 0
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and {tensor.dtype for tensor in adapter.values()} == {torch.bfloat16}
    residual = load_file(str(out / "residual_model" / "model.safetensors"))
    assert residual["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    statistics = load_file(str(out / "stats.safetensors"))
    assert {tensor.dtype for tensor in statistics.values()} == {torch.float32}
    report = json.loads((out / "report.json").read_text())
    assert {layer["dtype"] for layer in report["layers"]} == {"bfloat16"}


def test_data_free_method_writes_no_statistics(llama_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert run_init(llama_dir, write_jsonl(tmp_path / "d.jsonl", prompt_completion_rows(4)), out,
                    "--method", "milora") == 0
    assert {path.name for path in out.iterdir()} == {"adapter", "residual_model", "report.json"}
    assert {layer["tokens"] for layer in json.loads((out / "report.json").read_text())["layers"]} == {None}


# ----------------------------------------------------------------------------- bad input


def assert_refused(capsys: pytest.CaptureFixture[str], code: int, out: Path, *fragments: str) -> str:
    error = capsys.readouterr().err
    assert code == 2, error
    for fragment in fragments:
        assert fragment in error, error
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "something was written"
    return error


def test_missing_field_names_the_line(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = prompt_completion_rows(5)
    del rows[2]["completion"]
    out = tmp_path / "out"
    code = run_init(llama_dir, write_jsonl(tmp_path / "data.jsonl", rows), out)
    assert_refused(capsys, code, out, "data.jsonl", "line 3: no field 'completion'")


def test_missing_csv_cell_names_the_line(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "data.csv"
    data.write_text("prompt,completion\nSort: a b ->, a b\nSort: b c ->\n")
    out = tmp_path / "out"
    assert_refused(capsys, run_init(llama_dir, data, out), out, "data.csv", "line 3: no field 'completion'")


def test_empty_completion_is_refused(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = prompt_completion_rows(4)
    rows[1]["completion"] = "  "
    out = tmp_path / "out"
    code = run_init(llama_dir, write_jsonl(tmp_path / "data.jsonl", rows), out)
    assert_refused(capsys, code, out, "line 2: empty completion")


def test_conversation_without_an_answer_is_refused(llama_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    rows = [{"messages": conversation(0)}, {"messages": conversation(1)[:2]}]
    out = tmp_path / "out"
    code = run_init(llama_dir, write_jsonl(tmp_path / "chat.jsonl", rows), out)
    assert_refused(capsys, code, out, "line 2: empty completion: no assistant message")


def test_messages_need_a_chat_template(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    model_dir = save_causal_lm(tmp_path / "plain", tiny_llama(300), tiny_tokenizer(chat_template=None))
    out = tmp_path / "out"
    code = run_init(model_dir, write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(0)}]), out)
    assert_refused(capsys, code, out, "has no chat template")


def test_examples_longer_than_max_length_are_counted_never_truncated(llama_dir: Path, tmp_path: Path, tokenizer,
                                                                     capsys: pytest.CaptureFixture[str]):
    rows = prompt_completion_rows(6)
    rows[4]["completion"] = " apple" * 30
    rows[5]["prompt"] = "Sort the words: " + "stone " * 30
    limit = max(len(tokenizer(row["prompt"] + row["completion"]).input_ids) for row in rows[:4]) + 1
    out = tmp_path / "out"
    code = run_init(llama_dir, write_jsonl(tmp_path / "data.jsonl", rows), out, "--max-length", str(limit))
    assert_refused(capsys, code, out, f"2 of 6 examples are longer than --max-length {limit} tokens",
                   "lines 5, 6", "raise --max-length")


def test_task_causal_lm_refuses_a_model_that_is_not_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    folder = tmp_path / "bert"
    tiny_bert().base_model.save_pretrained(folder)
    out = tmp_path / "out"
    code = run_init(folder, write_jsonl(tmp_path / "d.jsonl", prompt_completion_rows(2)), out, "--task", "causal-lm")
    assert_refused(capsys, code, out, "is not a causal LM", "BertModel")


def test_target_matching_nothing_lists_the_linear_layers(llama_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    code = run_init(llama_dir, write_jsonl(tmp_path / "d.jsonl", prompt_completion_rows(2)), out,
                    "--targets", "query", "value")
    assert_refused(capsys, code, out, "--targets query value match no module",
                   "model.layers.<i>.self_attn.q_proj (x2)", "model.layers.<i>.mlp.down_proj (x2)", "lm_head")


def test_a_tokenizer_of_another_model_is_refused(tmp_path: Path, tokenizer, capsys: pytest.CaptureFixture[str]):
    model_dir = save_causal_lm(tmp_path / "gpt2", tiny_gpt2(vocab_size=40), tokenizer)  # 300 tokens, 40 rows
    out = tmp_path / "out"
    code = run_init(model_dir, write_jsonl(tmp_path / "d.jsonl", prompt_completion_rows(2)), out)
    assert_refused(capsys, code, out, "but the model's embedding has 40 rows")


def test_seq_cls_flags_are_refused_for_a_causal_lm(llama_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    code = run_init(llama_dir, write_jsonl(tmp_path / "d.jsonl", prompt_completion_rows(2)), out,
                    "--text-column", "prompt")
    assert_refused(capsys, code, out, "--text-column applies to --task seq-cls")


def test_a_failed_run_keeps_the_previous_output(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    assert run_init(llama_dir, write_jsonl(tmp_path / "good.jsonl", prompt_completion_rows(4)), out) == 0
    before = {path.name: path.read_bytes() for path in (out / "adapter").iterdir()}
    rows = prompt_completion_rows(4)
    rows[3]["completion"] = ""
    assert run_init(llama_dir, write_jsonl(tmp_path / "bad.jsonl", rows), out) == 2
    assert {path.name: path.read_bytes() for path in (out / "adapter").iterdir()} == before
    shutil.rmtree(out)


def test_reader_api_matches_the_command(llama_dir: Path, tmp_path: Path, tokenizer):
    rows = prompt_completion_rows(3)
    examples, _ = read_causal_lm_examples(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 64)
    assert [example.line for example in examples] == [1, 2, 3]
    assert sum(example.completion_tokens for example in examples) == brute_force_completion_tokens(tokenizer, rows)


@pytest.mark.integration
def test_init_on_packaged_smollm2_with_its_chat_template(tmp_path: Path):
    from transformers import AutoTokenizer

    from fisherlora.bench.tasks.lm import smollm2_dir

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [{"messages": conversation(index)[1:]} for index in range(4)]  # SmolLM2 adds its own system turn
    out = tmp_path / "out"
    assert run_init(model_dir, write_jsonl(tmp_path / "chat.jsonl", rows), out, "--targets", "q_proj") == 0
    report = json.loads((out / "report.json").read_text())
    answers = [m["content"] + "<|im_end|>\n" for row in rows for m in row["messages"] if m["role"] == "assistant"]
    expected = sum(len(tokenizer(answer, add_special_tokens=False).input_ids) for answer in answers)
    assert report["completion_tokens"] == expected and len(report["layers"]) == 30
    assert {layer["tokens"] for layer in report["layers"]} == {expected}


def test_zero_start_method_writes_no_residual_model(llama_dir: Path, tmp_path: Path, tokenizer):
    """B = 0 leaves W unchanged: the adapter applies to the original base, so no residual model is written."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fisherlora.init.catalog import remove_entry
    from fisherlora.init.registry import register_initializer

    @register_initializer("test_zero_start", "test-only: constant A, zero B", family="paper", statistics=(),
                          zero_start=True)
    def initialize(weight: torch.Tensor, geometry: object, rank: int, scaling: float,
                   options: object) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((rank, weight.shape[1]), 0.1, dtype=weight.dtype), weight.new_zeros(weight.shape[0], rank)

    out = tmp_path / "out"
    try:
        assert run_init(llama_dir, write_jsonl(tmp_path / "d.jsonl", prompt_completion_rows(4)), out,
                        "--method", "test_zero_start") == 0
    finally:
        remove_entry("test_zero_start")
    assert {path.name for path in out.iterdir()} == {"adapter", "report.json"}
    assert json.loads((out / "report.json").read_text())["outputs"] == ["adapter", "report.json"]
    original = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out / "adapter"))
    input_ids = torch.tensor([tokenizer("Sort the words: river apple ->").input_ids])
    with torch.no_grad():
        assert torch.equal(with_adapter.eval()(input_ids=input_ids).logits, original(input_ids=input_ids).logits)
