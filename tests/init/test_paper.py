"""The paper baselines (`init/paper.py`: LoRA-One, LoRA-DA, LoRA-GA with the paper's scale) against
their formulas written out independently, on statistics computed by brute force.

The reference runs each example alone and un-padded in float64: `M` is the mean of the real
per-example weight gradients (`W.grad` of the example's summed cross-entropy), `A` and `diag G` come
from the layer's captured input and `retain_grad()` output; the formulas are then evaluated with
numpy. Only sign-free quantities are compared (products `B A`, projectors `A^T A`, `B B^T`), since
singular and eigen vectors are defined up to sign.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import fisherlora as fl
from fisherlora.conversion import INITIAL_RECORD, write_initial_record
from fisherlora.init import run_initializer
from fisherlora.init.paper import LoraDAOptions, LoraGAPaperOptions, LoraOneOptions
from fisherlora.peft import _INITIAL_STATES, base_weights_changed
from fisherlora.stats.container import LayerStats
from models import lm_batches, text_batches, tiny_bert, tiny_gpt2

GPT2_TARGETS = ["c_attn", "c_fc"]
GPT2_LAYERS = [f"transformer.h.{i}.{kind}" for i in range(2) for kind in ("attn.c_attn", "mlp.c_fc")]
BERT_TARGETS = ["query", "value"]
BERT_LAYERS = [f"bert.encoder.layer.{i}.attention.self.{kind}" for i in range(2) for kind in ("query", "value")]
DAMPING = 1e-3


def full_lm_batches() -> list[dict[str, torch.Tensor]]:
    """Causal-LM batches whose every real token is a label: the kept positions are then exactly the
    positions that reach the loss, and `M` is the true weight gradient."""
    batches = lm_batches()
    for batch in batches:
        batch["labels"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    return batches


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one un-padded example."""
    logits = model(input_ids=ids).logits[0, :-1]
    return F.cross_entropy(logits, ids[0, 1:], reduction="sum")


def gpt2_examples(batches: list[dict[str, torch.Tensor]]) -> list[tuple[Callable[[nn.Module], torch.Tensor], int]]:
    examples = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i:i + 1, :length]
            examples.append((lambda model, ids=ids: lm_loss(model, ids), length - 1))  # last position: no target
    return examples


def bert_examples(batches: list[dict[str, torch.Tensor]]) -> list[tuple[Callable[[nn.Module], torch.Tensor], int]]:
    examples = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            ids, label = batch["input_ids"][i:i + 1, :length], batch["labels"][i:i + 1]

            def loss(model: nn.Module, ids=ids, label=label) -> torch.Tensor:
                return F.cross_entropy(model(input_ids=ids).logits, label, reduction="sum")

            examples.append((loss, length))
    return examples


def brute_force(model: nn.Module, names: list[str], examples: list) -> dict[str, dict[str, np.ndarray]]:
    """Per layer: `M` (mean per-example `W.grad`), `A` and `diag G` over the kept positions, float64."""
    model = copy.deepcopy(model).double().eval()
    modules = dict(model.named_modules())
    sums = {name: {"M": 0.0, "A": 0.0, "G": 0.0, "tokens": 0} for name in names}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            output.retain_grad()
            captured[name] = (args[0].detach(), output)

        return hook

    for loss_of, kept in examples:
        handles = [modules[name].register_forward_hook(capture(name)) for name in names]
        model.zero_grad(set_to_none=True)
        loss_of(model).backward()
        for handle in handles:
            handle.remove()
        for name in names:
            module = modules[name]
            gradient = module.weight.grad.detach()
            gradient = gradient.T if type(module).__name__ == "Conv1D" else gradient  # Conv1D stores W^T
            x, y = captured[name]
            rows_x = x[0, :kept].numpy()
            rows_g = y.grad[0, :kept].numpy()
            sums[name]["M"] = sums[name]["M"] + gradient.numpy()
            sums[name]["A"] = sums[name]["A"] + rows_x.T @ rows_x
            sums[name]["G"] = sums[name]["G"] + (rows_g**2).sum(axis=0)
            sums[name]["tokens"] += kept
    return {name: {"M": value["M"] / len(examples), "A": value["A"] / value["tokens"],
                   "diag_G": value["G"] / value["tokens"], "examples": len(examples)}
            for name, value in sums.items()}


def adapter_factors(model: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    layer = dict(model.base_model.model.named_modules())[name]
    return (layer.lora_A["default"].weight.detach().double().numpy(),
            layer.lora_B["default"].weight.detach().double().numpy(), float(layer.scaling["default"]))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def initialized(base: nn.Module, targets: list[str], batches: list, method: str, options: object = None,
                rank: int = 3) -> nn.Module:
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    model.eval()
    fl.initialize_lora_fisher(model, batches, fl.FisherConfig(method=method, options=options, progress=False,
                                                                damping=DAMPING, num_batches=None))
    return model


MODELS = {
    "gpt2-conv1d": (tiny_gpt2, GPT2_TARGETS, GPT2_LAYERS, full_lm_batches, gpt2_examples),
    "bert": (tiny_bert, BERT_TARGETS, BERT_LAYERS, text_batches, bert_examples),
}


@pytest.fixture(scope="module", params=list(MODELS))
def setting(request: pytest.FixtureRequest) -> dict:
    make_model, targets, layers, make_batches, make_examples = MODELS[request.param]
    base, batches = make_model(), make_batches()
    return {"base": base, "targets": targets, "layers": layers, "batches": batches,
            "reference": brute_force(base, layers, make_examples(batches))}


def written_factors(setting: dict, method: str, options: object,
                    rank: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, float, dict]]:
    """Per targeted layer of a model initialized with `method`: `(name, A, B, s, brute-force reference)`."""
    model = initialized(setting["base"], setting["targets"], setting["batches"], method, options, rank)
    for name in setting["layers"]:
        yield name, *adapter_factors(model, name), setting["reference"][name]


def test_lora_one_is_a_small_rank_r_step_along_minus_the_mean_gradient(setting: dict):
    """LoRA-One: `s B A = -(s / gamma) rank_r(M) / sigma_1(M)`, balanced per component."""
    gamma, rank = 64.0, 3
    for name, lora_a, lora_b, scaling, reference in written_factors(setting, "lora_one", LoraOneOptions(gamma=gamma),
                                                                     rank):
        left, values, right = np.linalg.svd(reference["M"])
        best = (left[:, :rank] * values[:rank]) @ right[:rank]
        assert relative_error(scaling * lora_b @ lora_a, -(scaling / gamma) * best / values[0]) < 1e-4, name
        expected_norms = np.sqrt(values[:rank] / (values[0] * gamma))
        np.testing.assert_allclose(np.linalg.norm(lora_b, axis=0), expected_norms, rtol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(lora_a, axis=1), expected_norms, rtol=1e-4)


def test_lora_ga_paper_takes_disjoint_singular_vectors_scaled_by_the_paper_rule(setting: dict):
    """LoRA-GA: `A = f V[:, :r]^T`, `B = f U[:, r:2r]`, `f = d_out^(1/4) / sqrt(gamma)`; residual written."""
    gamma, rank = 16.0, 3
    for name, lora_a, lora_b, _, reference in written_factors(setting, "lora_ga_paper",
                                                              LoraGAPaperOptions(gamma=gamma), rank):
        left, _, right = np.linalg.svd(reference["M"])
        factor = left.shape[0] ** 0.25 / gamma**0.5
        input_side, output_side = right[:rank].T, left[:, rank:2 * rank]
        assert relative_error(lora_a.T @ lora_a, factor**2 * input_side @ input_side.T) < 1e-4, name
        assert relative_error(lora_b @ lora_b.T, factor**2 * output_side @ output_side.T) < 1e-4, name


def lora_da_reference(reference: dict, rank: int, gamma: float, beta: float,
                      population: int | None) -> tuple[np.ndarray, np.ndarray]:
    """LoRA-DA as its official code computes it (zqy0126/LoRA-DA `lora_da.py`), in numpy:
    `(s B A / s, A^T A)`."""
    gradient, act, diag_g = reference["M"], reference["A"], reference["diag_G"]
    damped_act = act + DAMPING * np.trace(act) / act.shape[0] * np.eye(act.shape[0])
    output_factor = diag_g + DAMPING * diag_g.mean()
    act_inverse = np.linalg.inv(damped_act)
    step = -(gradient / output_factor[:, None]) @ act_inverse
    top = np.linalg.norm(step, 2)
    step = step / top
    omega = -step.T @ step + beta * (1 / output_factor).sum() / ((population or reference["examples"]) * top**2) \
        * act_inverse
    _, vectors = np.linalg.eigh((omega + omega.T) / 2)
    basis = vectors[:, :rank]
    return step @ basis @ basis.T / gamma, basis @ basis.T / gamma


@pytest.mark.parametrize(("beta", "population"), [(0.03, None), (0.0, None), (3.0, 7)])
def test_lora_da_projects_the_natural_gradient_step_on_the_official_eigenvectors(setting: dict, beta: float,
                                                                                 population: int | None):
    gamma, rank = 256.0, 3
    options = LoraDAOptions(gamma=gamma, variance_beta=beta, population_size=population)
    for name, lora_a, lora_b, _, reference in written_factors(setting, "lora_da", options, rank):
        product, projector = lora_da_reference(reference, rank, gamma, beta, population)
        assert relative_error(lora_b @ lora_a, product) < 1e-3, name
        assert relative_error(lora_a.T @ lora_a, projector) < 1e-3, name


def test_the_variance_term_moves_lora_da_away_from_the_bias_only_subspace():
    """A large `beta` must change the chosen subspace (else the variance term would be dead code)."""
    generator = torch.Generator().manual_seed(0)
    stats = LayerStats(act_cov=torch.diag(torch.logspace(-2, 1, 9)), grad_cov=torch.eye(12),
                       grad_mean=torch.randn(12, 9, generator=generator), num_tokens=50, num_examples=5,
                       layer_type="linear", weight_shape=(12, 9))
    weight = torch.randn(12, 9, generator=generator)

    def projector(beta: float) -> torch.Tensor:
        config = fl.FisherConfig(method="lora_da", options=LoraDAOptions(variance_beta=beta))
        lora_a = run_initializer("lora_da", weight, stats, 3, 2.0, config).lora_a.double()
        return lora_a.T @ lora_a

    assert (projector(0.0) - projector(100.0)).abs().max() > 1e-2 * projector(0.0).abs().max()


def gpt2_logits(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                          for b in batches])


def with_adapter_written_in(base: nn.Module, model: nn.Module) -> nn.Module:
    """The original base with `W + s B A` written into each targeted weight by hand (Conv1D: transposed)."""
    stepped = copy.deepcopy(base)
    modules = dict(stepped.named_modules())
    with torch.no_grad():
        for name, layer in model.base_model.model.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                assert torch.equal(layer.base_layer.weight, modules[name].weight), f"{name}: base weight changed"
                delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
                modules[name].weight += delta.T
    return stepped


@pytest.mark.parametrize("method", ["lora_one", "lora_da"])
def test_a_real_first_step_on_gpt2_conv1d_is_the_base_with_the_step_written_in(method: str):
    base, batches = tiny_gpt2(), full_lm_batches()
    model = initialized(base, GPT2_TARGETS, batches, method)
    stepped = with_adapter_written_in(base, model)
    after = gpt2_logits(model, batches)
    assert (after - gpt2_logits(base, batches)).abs().max() > 0, "the step must move the output"
    assert (after - gpt2_logits(stepped, batches)).abs().max() <= 1e-5


def calibration_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """The summed next-token cross-entropy whose mean gradient per example is `M`."""
    with torch.no_grad():
        return sum(float(lm_loss(model, batch["input_ids"][i:i + 1, :int(batch["attention_mask"][i].sum())]))
                   for batch in batches for i in range(batch["input_ids"].shape[0]))


def test_lora_one_small_step_lowers_the_calibration_loss():
    base, batches = tiny_gpt2(), full_lm_batches()
    before = calibration_loss(base, batches)
    for gamma in (1e2, 1e3):
        model = initialized(base, GPT2_TARGETS, batches, "lora_one", LoraOneOptions(gamma=gamma))
        assert calibration_loss(model, batches) < before, f"gamma={gamma}"


def layer_stats(d_out: int, d_in: int, gradient: torch.Tensor) -> LayerStats:
    return LayerStats(torch.eye(d_in), torch.eye(d_out), gradient, 10, 2, "linear", (d_out, d_in))


def test_lora_ga_paper_refuses_a_rank_above_half_the_layer_width():
    weight = torch.randn(6, 5)
    config = fl.FisherConfig(method="lora_ga_paper")
    with pytest.raises(ValueError, match=r"'lora_ga_paper', module 'enc\.narrow'.*2r = 6 <= min\(d_out, d_in\) = 5"):
        run_initializer("lora_ga_paper", weight, layer_stats(6, 5, torch.randn(6, 5)), 3, 2.0, config,
                        module_name="enc.narrow")
    assert run_initializer("lora_ga_paper", weight, layer_stats(6, 5, torch.randn(6, 5)), 2, 2.0,
                           config).lora_a.shape == (2, 5)


@pytest.mark.parametrize("method", ["lora_one", "lora_da"])
def test_a_zero_gradient_is_refused_with_the_module_name(method: str):
    with pytest.raises(ValueError, match=rf"'{method}', module 'head'.*mean gradient M is zero"):
        run_initializer(method, torch.randn(4, 3), layer_stats(4, 3, torch.zeros(4, 3)), 2, 2.0,
                        fl.FisherConfig(method=method), module_name="head")


@pytest.mark.parametrize(("options", "message"), [
    (lambda: LoraOneOptions(gamma=0), "LoraOneOptions.gamma must be > 0"),
    (lambda: LoraGAPaperOptions(gamma=-1), "LoraGAPaperOptions.gamma must be > 0"),
    (lambda: LoraDAOptions(variance_beta=-0.1), "variance_beta must be >= 0"),
    (lambda: LoraDAOptions(population_size=0), "population_size must be >= 1"),
])
def test_bad_options_are_refused(options: Callable[[], object], message: str):
    with pytest.raises(ValueError, match=message):
        options()


def train_a_few_steps(model: nn.Module, batches: list[dict[str, torch.Tensor]], steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", ["lora_one", "lora_da", "lora_ga_paper"])
@pytest.mark.parametrize("from_folder", [False, True])
def test_saved_adapter_reproduces_the_trained_model_on_the_original_base(tmp_path: Path, method: str,
                                                                          from_folder: bool):
    """Trained, converted with `save_as_lora` (from this process's memory, or in "another process" from the
    adapter folder saved right after initialization with its record), and loaded with plain PEFT on a
    fresh original base: the logits are the trained model's. A method without residual must not
    subtract its initial product."""
    base, batches = tiny_gpt2(), full_lm_batches()
    model = initialized(base, GPT2_TARGETS, batches, method)
    assert base_weights_changed(model) == fl.get_method(method).preserves_function
    model.save_pretrained(str(tmp_path / "initial"))
    write_initial_record(model, tmp_path / "initial")
    train_a_few_steps(model, batches)
    trained = gpt2_logits(model, batches)
    assert (trained - gpt2_logits(base, batches)).abs().max() > 1e-3, "training must have changed the model"
    if from_folder:
        _INITIAL_STATES.pop(model, None)  # as in a new process
        with pytest.raises(ValueError, match="not initialized by fisherlora.initialize_lora_fisher"):
            fl.save_as_lora(model, tmp_path / "unused")
    fl.save_as_lora(model, tmp_path / "converted", initial_adapter=tmp_path / "initial" if from_folder else None)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "converted")).eval()
    assert (gpt2_logits(loaded, batches) - trained).abs().max() <= 1e-5


def test_the_initial_record_says_whether_a_residual_was_written(tmp_path: Path):
    import json

    base, batches = tiny_gpt2(), full_lm_batches()
    for method, written in (("lora_one", False), ("lora_ga_paper", True)):
        model = initialized(base, GPT2_TARGETS, batches, method)
        write_initial_record(model, tmp_path)
        assert json.loads((tmp_path / INITIAL_RECORD).read_text()) == {"residual_written": written}, method
