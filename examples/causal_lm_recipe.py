"""Fine-tune a causal LM from a fisherlora-initialized adapter: prompt/completion data in, a LoRA
adapter that loads on the ORIGINAL base model out. Run it on the packaged SmolLM2:

    python examples/causal_lm_recipe.py --work /tmp/recipe            # SmolLM2, examples/data/sort_words.jsonl
    python examples/causal_lm_recipe.py --model DIR --data FILE.jsonl --work /tmp/recipe --steps 20

Three ways, same result:

- `command`: `fisherlora init` writes OUT/adapter and OUT/residual_model; load them, train with
  `transformers.Trainer`, and convert with `fl.save_as_lora(model, DIR, initial_adapter=OUT/adapter)`.
  The command line is printed; it runs here through `fisherlora.cli.main` with the same arguments.
- `callback`: `get_peft_model` on the original base and `fl.FisherInitCallback` in the Trainer: the
  statistics come from the trainer's first batches, and the converted adapter is saved when training ends.
- `sft`: the same callback in TRL's `SFTTrainer`, which tokenizes the records itself.

Both end by loading the saved adapter on the original base with `PeftModel.from_pretrained` and
checking that it generates what the trained model generates. Each step is a function the tests run
(tests/test_recipe.py) on a tiny Llama and, marked integration, on SmolLM2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import fisherlora as fl
from fisherlora.cli import main as fisherlora_main
from fisherlora.data.causal_lm import CompletionCollator, pad_token_id, read_causal_lm_examples, training_features

EXAMPLE_DATA = Path(__file__).parent / "data" / "sort_words.jsonl"


ALL_LINEAR = ["all-linear"]



# With every linear layer adapted from a residual start, 3e-3 (the lm benchmark's LR, chosen for
# q_proj/v_proj with warm-up) made the loss jump in the first steps (logged 11.2 against 4.6 at step
# 0) and the model babble. Measured with this script's defaults otherwise (`fisher_svd`, 10 steps,
# the packaged data): 1e-3 jumped too (6.4) and sorted one of the three prompts; 3e-4 logged 4.2,
# then down to 1.2, and sorted all three.
DEFAULT_LEARNING_RATE = 3e-4

def initialize(model_dir: Path, data: Path, out: Path, rank: int = 8, method: str = "fisher_eig",
               targets: list[str] = ALL_LINEAR, max_length: int = 64) -> Path:
    """`fisherlora init` (all linear layers by default); returns the output folder."""
    arguments = ["init", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--targets", *targets,
                 "--rank", str(rank), "--method", method, "--max-length", str(max_length), "--no-progress"]
    print("fisherlora " + " ".join(arguments))
    if fisherlora_main(arguments) != 0:
        raise SystemExit("fisherlora init failed (the reason is printed above)")
    return out


def trainer_for(model: Any, tokenizer: Any, data: Path, work: Path, steps: int, learning_rate: float,
                max_length: int = 64, callbacks: list[Any] | None = None) -> Any:
    """A `transformers.Trainer` on the prompt/completion file: loss on the completion tokens only."""
    from transformers import Trainer, TrainingArguments

    examples, _ = read_causal_lm_examples(data, tokenizer, max_length)  # the same encoding `init` used
    args = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(1, steps // 4),
        save_strategy="no", report_to=[], seed=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=training_features(examples),  # type: ignore[arg-type]
                   data_collator=CompletionCollator(pad_token_id(tokenizer)), callbacks=callbacks)


def train_from_command(model_dir: Path, data: Path, work: Path, steps: int = 10,
                       learning_rate: float = DEFAULT_LEARNING_RATE,
                       method: str = "fisher_eig", rank: int = 8,
                       targets: list[str] = ALL_LINEAR) -> tuple[Any, Path]:
    """`fisherlora init`, then Trainer on residual model + adapter, then `save_as_lora`.

    Returns:
        the trained PEFT model and the folder of the adapter for the original base.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = initialize(model_dir, data, work / "init", rank=rank, method=method, targets=targets)
    tokenizer = AutoTokenizer.from_pretrained(out / "residual_model")
    residual = AutoModelForCausalLM.from_pretrained(out / "residual_model")
    model = PeftModel.from_pretrained(residual, str(out / "adapter"), is_trainable=True)
    trainer_for(model, tokenizer, data, work, steps, learning_rate).train()
    lora_dir = fl.save_as_lora(model, work / "lora", initial_adapter=out / "adapter")
    return model, lora_dir


def train_with_callback(model_dir: Path, data: Path, work: Path, steps: int = 10,
                        learning_rate: float = DEFAULT_LEARNING_RATE,
                        method: str = "fisher_eig", rank: int = 8,
                        targets: list[str] = ALL_LINEAR) -> tuple[Any, Path]:
    """`get_peft_model` on the original base; `FisherInitCallback` initializes and saves."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    target_modules = "all-linear" if targets == ALL_LINEAR else targets
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules,
                                            task_type="CAUSAL_LM"))
    callback = fl.FisherInitCallback(fl.FisherConfig(method=method, progress=False), save_to=str(work / "lora"))
    trainer_for(model, tokenizer, data, work, steps, learning_rate, callbacks=[callback]).train()
    return model, work / "lora"


def train_with_sft_trainer(model_dir: Path, data: Path, work: Path, steps: int = 10,
                           learning_rate: float = DEFAULT_LEARNING_RATE,
                           method: str = "fisher_eig", rank: int = 8,
                           targets: list[str] = ALL_LINEAR) -> tuple[Any, Path]:
    """TRL's `SFTTrainer` on the prompt/completion records, with `FisherInitCallback`.

    SFTTrainer tokenizes the records itself and masks the prompt out of the labels (its default
    `completion_only_loss` for prompt/completion data); the callback's statistics see those labels.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from fisherlora.data.records import read_records

    rows = [record.fields for record in read_records(data)]
    target_modules = "all-linear" if targets == ALL_LINEAR else targets
    callback = fl.FisherInitCallback(fl.FisherConfig(method=method, progress=False), save_to=str(work / "lora"))
    # TRL turns on bfloat16 mixed precision by default, and accelerate leaves the trained model's forward
    # under autocast afterwards; on CPU train in float32 so that the comparison below is exact.
    on_gpu = torch.cuda.is_available()
    args = SFTConfig(output_dir=str(work / "trainer"), max_steps=steps, per_device_train_batch_size=8,
                     learning_rate=learning_rate, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no",
                     report_to=[], seed=0, use_cpu=not on_gpu, bf16=on_gpu and torch.cuda.is_bf16_supported(),
                     disable_tqdm=True, max_length=64)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), callbacks=[callback],
                         peft_config=LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules,
                                                task_type="CAUSAL_LM"))
    trainer.train()
    return trainer.model, work / "lora"


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 12) -> list[list[int]]:
    """Greedy continuation token ids of each prompt, up to the tokenizer's EOS (one prompt at a time: no
    padding to reason about; EOS passed explicitly: a trainer may have changed the model's generation config)."""
    outputs = []
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            input_ids = torch.tensor([tokenizer(prompt).input_ids], device=model.device)
            generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
            outputs.append(generated[0, input_ids.shape[1]:].tolist())
    return outputs


def reload_on_original_base(model_dir: Path, lora_dir: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(lora_dir)).eval()


def check_generations_match(trained: Any, model_dir: Path, lora_dir: Path, prompts: list[str]) -> list[str]:
    """Generate with the trained model and with original base + saved adapter; refuse any difference.

    Returns:
        the decoded generations.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = generate(trained, tokenizer, prompts)
    reloaded = generate(reload_on_original_base(model_dir, lora_dir), tokenizer, prompts)
    if reloaded != expected:
        raise AssertionError(f"the adapter on the original base generates {reloaded}, the trained model {expected}")
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]


def smollm2_dir() -> Path:
    from fisherlora.bench.tasks.lm import smollm2_dir as packaged

    return packaged()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="causal LM folder (default: the packaged SmolLM2)")
    parser.add_argument("--data", type=Path, default=EXAMPLE_DATA, help="prompt/completion JSONL")
    parser.add_argument("--work", type=Path, required=True, help="folder for init/, lora/ and the trainer's files")
    parser.add_argument("--way", choices=tuple(WAYS), default="command")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--method", default=fl.FisherConfig().method, choices=sorted(fl.INITIALIZERS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=ALL_LINEAR, help="as for fisherlora init (default all-linear)")
    args = parser.parse_args(argv)
    model_dir = args.model or smollm2_dir()
    train = WAYS[args.way]
    trained, lora_dir = train(model_dir, args.data, args.work, args.steps, args.lr, args.method, args.rank,
                              args.targets)
    prompts = [record["prompt"] for record in training_prompts(args.data, 3)]
    for prompt, text in zip(prompts, check_generations_match(trained, model_dir, lora_dir, prompts), strict=True):
        print(f"{prompt!r} -> {text!r}")
    print(f"{lora_dir} loads on the original {model_dir} and generates what the trained model generates")
    return 0


WAYS = {"command": train_from_command, "callback": train_with_callback, "sft": train_with_sft_trainer}


def training_prompts(data: Path, count: int) -> list[dict[str, Any]]:
    from fisherlora.data.records import read_records

    return [record.fields for record in read_records(data)[:count]]


if __name__ == "__main__":
    sys.exit(main())
