"""The causal-LM training recipe (examples/causal_lm_recipe.py) runs both ways: `fisherlora init` +
Trainer + `save_as_lora`, and Trainer with `FisherInitCallback`; the saved adapter on the original
base generates what the trained model generates. Tiny Llama here, packaged SmolLM2 under integration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fisherlora as fl
from models import save_causal_lm, tiny_llama, tiny_tokenizer
from test_causal_lm_init import prompt_completion_rows, write_jsonl

RECIPE_PATH = Path(__file__).resolve().parents[1] / "examples" / "causal_lm_recipe.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("causal_lm_recipe", RECIPE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("recipe")
    model_dir = save_causal_lm(folder / "model", tiny_llama(len(tokenizer)), tokenizer)
    return model_dir, write_jsonl(folder / "data.jsonl", prompt_completion_rows(16))


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("way", ["train_from_command", "train_with_callback", "train_with_sft_trainer"])
def test_recipe_adapter_reproduces_the_trained_model_on_the_original_base(recipe, tiny, tmp_path: Path, way: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = tiny
    trained, lora_dir = getattr(recipe, way)(model_dir, data, tmp_path, steps=6, learning_rate=3e-2, rank=2)
    prompts = [row["prompt"] for row in prompt_completion_rows(3)]
    recipe.check_generations_match(trained, model_dir, lora_dir, prompts)  # raises on any difference

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = torch.tensor([tokenizer(prompts[0]).input_ids])
    trained_logits = logits_of(trained.eval(), input_ids)
    original_logits = logits_of(AutoModelForCausalLM.from_pretrained(model_dir).eval(), input_ids)
    reloaded_logits = logits_of(recipe.reload_on_original_base(model_dir, lora_dir), input_ids)
    assert (trained_logits - original_logits).abs().max() > 0.1  # training changed the model
    assert torch.allclose(reloaded_logits, trained_logits, atol=1e-4)


def test_sft_trainer_statistics_see_the_completion_tokens_only(recipe, tiny, tmp_path: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from test_causal_lm_init import brute_force_completion_tokens

    model_dir, data = tiny
    rows = prompt_completion_rows(16)
    callback = fl.FisherInitCallback(fl.FisherConfig(progress=False, captured_energy=True))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, max_length=64)

    SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=Dataset.from_list(rows),
               callbacks=[callback], peft_config=LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"),
               ).train()
    assert callback.stats is not None
    expected = brute_force_completion_tokens(AutoTokenizer.from_pretrained(model_dir), rows)
    assert {layer.num_tokens for layer in callback.stats.layers.values()} == {expected}


def test_callback_reports_each_layer_and_refuses_to_resume(recipe, tiny, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir, data = tiny
    callback = fl.FisherInitCallback(fl.FisherConfig(progress=False, captured_energy=True))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    trainer = recipe.trainer_for(model, recipe_tokenizer(model_dir), data, tmp_path, steps=1, learning_rate=1e-3,
                                 callbacks=[callback])
    trainer.train()
    assert [report.name for report in callback.reports] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert all(0 < report.captured_energy <= 1 for report in callback.reports)
    with pytest.raises(RuntimeError, match="resumes at step 3"):
        callback.on_train_begin(trainer.args, SimpleNamespace(global_step=3), None, model=model)
    with pytest.raises(TypeError, match="needs the trainer's model to be a PeftModel"):
        callback.on_train_begin(trainer.args, SimpleNamespace(global_step=0), None, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown initializer 'fisher_typo'"):
        fl.FisherInitCallback(fl.FisherConfig(method="fisher_typo"))


def recipe_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.integration
@pytest.mark.parametrize("way", ["command"])  # the callback and SFTTrainer ways: tiny Llama above (same code)
def test_recipe_on_packaged_smollm2(recipe, tmp_path: Path, way: str, capsys: pytest.CaptureFixture[str]):
    # q/v projections (60 layers) instead of all-linear keep the test short on 2 shared cores; the
    # all-linear path is the same code (tiny Llama tests) and its SmolLM2 wall time is in the README.
    lines = recipe.EXAMPLE_DATA.read_text().splitlines()[:8]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code = recipe.main(["--data", str(data), "--work", str(tmp_path / "work"), "--way", way, "--steps", "3",
                        "--targets", "q_proj", "v_proj"])
    assert code == 0
    assert "generates what the trained model generates" in capsys.readouterr().out
    config = json.loads((tmp_path / "work" / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 16  # rank 8 converted: [trained; initial] factors


def test_readme_causal_lm_recipe_runs(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import re

    from transformers import AutoModelForCausalLM

    from fisherlora.cli import main

    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = [block for block in re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
              if block.startswith("# causal-LM recipe")]
    assert len(blocks) == 1
    model_dir, data = tiny
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--model", str(model_dir), "--data", str(data), "--targets", "all-linear", "--rank", "2",
                 "--out", "init", "--no-progress"]) == 0
    namespace: dict = {"model_dir": model_dir, "data": data}
    exec(compile(blocks[0], str(readme), "exec"), namespace)  # noqa: S102
    input_ids = torch.tensor([[5, 9, 13, 40, 41]])
    trained, reloaded = namespace["model"].eval(), namespace["reloaded"].eval()
    untouched = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # `original` now carries the adapter
    assert (logits_of(trained, input_ids) - logits_of(untouched, input_ids)).abs().max() > 0.1
    assert torch.allclose(logits_of(reloaded, input_ids), logits_of(trained, input_ids), atol=1e-4)
