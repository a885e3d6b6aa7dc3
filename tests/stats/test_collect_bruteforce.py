"""`collect_fisher` against statistics computed independently, by brute force.

Every reference here runs each example alone and un-padded (truncated to its real length), captures
the layer input `x` and `g = dL/dy` of the sum-reduced cross-entropy with the test's own forward
hooks and `retain_grad()`, keeps the positions the definition keeps (every position for `M`: a
prompt position has no loss term but reaches the loss through attention), and sums the outer
products in float64 by hand:

    A = (1/T) sum_t x_t x_t^T,   G = (1/T) sum_t g_t g_t^T,   M = (1/E) sum_t g_t x_t^T.

The models run in float64 so the reference is exact to well below the float32 accumulation of the
library.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherlora as fl
from models import TinyCNN, TinyMLP, image_batches, lm_batches, pair_batches, text_batches, tiny_bert, tiny_gpt2

BERT_TARGETS = ["query", "value", "classifier"]
BERT_LAYERS = [f"bert.encoder.layer.{i}.attention.self.{kind}" for i in range(2) for kind in ("query", "value")]
BERT_LAYERS.append("classifier")
GPT2_LAYERS = [f"transformer.h.{i}.{kind}" for i in range(2) for kind in ("attn.c_attn", "mlp.c_fc")]


def config(**overrides) -> fl.FisherConfig:
    values = {"progress": False, "collect_grad_mean": True, "num_batches": None}
    values.update(overrides)
    return fl.FisherConfig(**values)


# --------------------------------------------------------------------------------------------
# The independent reference
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """float64 sums of one layer's outer products."""

    act: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    tokens: int = 0
    examples: int = 0

    def add(self, x: torch.Tensor, g: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Rows `x`, `g` of one call; `A` and `G` take the rows in `keep` (None: all), `M` all."""
        x, g = x.double(), g.double()
        if self.act is None:
            self.act = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            self.grad = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64)
            self.cross = torch.zeros(g.shape[1], x.shape[1], dtype=torch.float64)
        for t in range(x.shape[0]):  # explicit per-token outer products
            if keep is None or keep[t]:
                self.act += torch.outer(x[t], x[t])
                self.grad += torch.outer(g[t], g[t])
                self.tokens += 1
            self.cross += torch.outer(g[t], x[t])

    def stats(self) -> dict[str, torch.Tensor | int]:
        assert self.act is not None and self.grad is not None and self.cross is not None
        return {"act_cov": self.act / self.tokens, "grad_cov": self.grad / self.tokens,
                "grad_mean": self.cross / self.examples, "num_tokens": self.tokens, "num_examples": self.examples}


@dataclass
class Capture:
    """The test's own forward hooks: every call's input and (grad-retaining) output."""

    model: nn.Module
    names: list[str]
    calls: dict[str, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def __enter__(self) -> Capture:
        modules = dict(self.model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.names]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            output.retain_grad()
            self.calls.setdefault(name, []).append((module, args[0].detach(), output))

        return hook


def conv_patches(conv: nn.Conv2d, image: torch.Tensor) -> torch.Tensor:
    """`(Ho * Wo, C * kh * kw)` patches of one `(1, C, H, W)` image by explicit slicing (no unfold)."""
    assert conv.dilation == (1, 1)
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    padded = F.pad(image, (pw, pw, ph, ph))
    out_h = (padded.shape[2] - kh) // sh + 1
    out_w = (padded.shape[3] - kw) // sw + 1
    rows = [padded[0, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(-1)
            for i in range(out_h) for j in range(out_w)]
    return torch.stack(rows)


def token_rows(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token `(x_t, g_t)` rows of one call of a single example."""
    assert y.grad is not None
    if isinstance(module, nn.Conv2d):
        patches = conv_patches(module, x)
        out_rows = y.detach()[0].reshape(y.shape[1], -1).T
        # the patch layout really is the one of `weight.reshape(C_out, -1)`: it reproduces y
        weight = module.weight.detach().reshape(module.weight.shape[0], -1)
        torch.testing.assert_close(patches @ weight.T + module.bias.detach(), out_rows)
        return patches, y.grad[0].reshape(y.shape[1], -1).T
    return x.reshape(-1, x.shape[-1]), y.grad.reshape(-1, y.shape[-1])


# One example: `run(model) -> (summed loss, kept positions or None for all)`.
Example = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]


def brute_force(model: nn.Module, names: list[str], examples: Iterable[Example]) -> dict[str, dict]:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    refs = {name: Reference() for name in names}
    for run in examples:
        with Capture(model, names) as capture:
            loss, keep = run(model)
            loss.backward()
        model.zero_grad(set_to_none=True)
        for name in names:
            for module, x, y in capture.calls[name]:
                xs, gs = token_rows(module, x, y)
                rows_keep = keep if keep is not None and xs.shape[0] > 1 else None
                assert rows_keep is None or rows_keep.shape == (xs.shape[0],)
                refs[name].add(xs, gs, rows_keep)
            refs[name].examples += 1
    return {name: ref.stats() for name, ref in refs.items()}


def pair_examples(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[Example]:
    for inputs, labels in batches:
        for i in range(labels.shape[0]):
            def run(model: nn.Module, x=inputs[i:i + 1], y=labels[i:i + 1]):  # noqa: ANN202
                return F.cross_entropy(model(x), y, reduction="sum"), None

            yield run


def text_examples(batches: list[dict[str, torch.Tensor]]) -> Iterator[Example]:
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            ids, label = batch["input_ids"][i:i + 1, :length], batch["labels"][i:i + 1]

            def run(model: nn.Module, ids=ids, label=label):  # noqa: ANN202
                logits = model(input_ids=ids).logits
                return F.cross_entropy(logits, label, reduction="sum"), None

            yield run


def lm_examples(batches: list[dict[str, torch.Tensor]]) -> Iterator[Example]:
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i:i + 1, :length]
            # position t predicts token t + 1; the last real position has nothing to predict
            following = batch["labels"][i, 1:length]
            keep = torch.zeros(length, dtype=torch.bool)
            keep[:length - 1] = following != -100

            def run(model: nn.Module, ids=ids, following=following, keep=keep):  # noqa: ANN202
                logits = model(input_ids=ids).logits[0, :-1]
                loss = torch.zeros((), dtype=torch.float64)
                for t in range(following.shape[0]):
                    if following[t] != -100:
                        loss = loss + F.cross_entropy(logits[t], following[t], reduction="sum")
                return loss, keep

            yield run


def assert_matches(stats: fl.FisherStats, reference: dict[str, dict], rtol: float = 1e-4) -> None:
    assert set(stats) == set(reference)
    for name, expected in reference.items():
        layer = stats[name]
        assert layer.num_tokens == expected["num_tokens"], name
        assert layer.num_examples == expected["num_examples"], name
        for key in ("act_cov", "grad_cov", "grad_mean"):
            actual = getattr(layer, key)
            assert actual is not None and actual.dtype == torch.float32 and not actual.requires_grad
            scale = float(expected[key].abs().max())
            assert scale > 0, f"{name}.{key} is zero: the comparison would be vacuous"
            torch.testing.assert_close(actual.double(), expected[key], rtol=rtol, atol=1e-5 * scale,
                                       msg=lambda m, name=name, key=key: f"{name}.{key}: {m}")


def assert_stats_equal(first: fl.FisherStats, second: fl.FisherStats, rtol: float = 1e-5) -> None:
    assert set(first) == set(second)
    for name in first:
        assert first[name].num_tokens == second[name].num_tokens
        assert first[name].num_examples == second[name].num_examples
        for key in ("act_cov", "grad_cov", "grad_mean"):
            a, b = getattr(first[name], key), getattr(second[name], key)
            scale = float(b.abs().max())
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6 * scale)


def rebatch(batches: list, sizes: list[int]) -> list:
    """The same examples, in the same order, cut into batches of the given sizes."""
    if isinstance(batches[0], dict):
        whole = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        assert sum(sizes) == whole["input_ids"].shape[0]
        parts = {key: value.split(sizes) for key, value in whole.items()}
        return [{key: parts[key][i] for key in whole} for i in range(len(sizes))]
    inputs = torch.cat([batch[0] for batch in batches])
    labels = torch.cat([batch[1] for batch in batches])
    assert sum(sizes) == labels.shape[0]
    return list(zip(inputs.split(sizes), labels.split(sizes), strict=True))


def double_pairs(batches: list) -> list:
    return [(inputs.double(), labels) for inputs, labels in batches]


# --------------------------------------------------------------------------------------------
# Fixtures: float64 models, built once per module
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP().double().eval()


@pytest.fixture(scope="module")
def cnn() -> TinyCNN:
    torch.manual_seed(1)
    return TinyCNN().double().eval()


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_bert().double().eval()


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return tiny_gpt2().double().eval()


@pytest.fixture(scope="module")
def text_data() -> list[dict[str, torch.Tensor]]:
    batches = text_batches(count=2, batch_size=4, length=7)
    assert any((batch["attention_mask"] == 0).any() for batch in batches), "the data must contain padding"
    return batches


@pytest.fixture(scope="module")
def lm_data() -> list[dict[str, torch.Tensor]]:
    batches = lm_batches(count=2, batch_size=3, length=8)
    assert any((batch["attention_mask"] == 0).any() for batch in batches), "the data must contain padding"
    assert any(((batch["labels"] == -100) & (batch["attention_mask"] == 1)).any() for batch in batches), \
        "the data must contain attended prompt positions with ignored labels"
    return batches


# --------------------------------------------------------------------------------------------
# Brute-force equality
# --------------------------------------------------------------------------------------------


def test_mlp_matches_brute_force(mlp: TinyMLP) -> None:
    batches = double_pairs(pair_batches(count=3, batch_size=5))
    stats = fl.collect_fisher(mlp, batches, config(), target_modules=["fc1", "fc2"])
    reference = brute_force(mlp, ["fc1", "fc2"], pair_examples(batches))
    assert_matches(stats, reference)
    assert stats["fc1"].num_tokens == stats["fc1"].num_examples == 15
    assert stats["fc1"].weight_shape == (5, 6) and stats["fc2"].weight_shape == (3, 5)
    assert stats["fc1"].layer_type == "linear"
    assert (stats.fisher, stats.num_batches, stats.n_samples, stats.model_dtype) == \
        ("empirical", 3, 1, "torch.float64")


def test_bert_plain_and_peft_match_brute_force(bert: nn.Module, text_data: list) -> None:
    from peft import LoraConfig, get_peft_model

    reference = brute_force(bert, BERT_LAYERS, text_examples(text_data))
    plain = fl.collect_fisher(bert, text_data, config(), target_modules=BERT_TARGETS)
    assert_matches(plain, reference)
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in text_data)
    assert plain[BERT_LAYERS[0]].num_tokens == real_tokens  # padding dropped
    assert plain["classifier"].num_tokens == plain["classifier"].num_examples == 8  # one pooled row each

    peft_model = get_peft_model(copy.deepcopy(bert), LoraConfig(r=2, target_modules=BERT_TARGETS))
    from_peft = fl.collect_fisher(peft_model, text_data, config())
    assert set(from_peft) == set(BERT_LAYERS)  # 'base_model.model.' stripped
    assert_matches(from_peft, reference)
    assert_stats_equal(from_peft, plain)
    for name in plain:
        assert from_peft[name].fingerprint == pytest.approx(plain[name].fingerprint)


def test_bert_last_block_matches_brute_force(bert: nn.Module, text_data: list) -> None:
    """Only the pooled position of a sequence classifier's last block reaches the loss, so that
    block's output gradients are exactly zero at every other position: the collection drops those
    rows from `G` and `M` (they add nothing), and the sums must still be the brute-force ones."""
    names = [f"bert.encoder.layer.1.{kind}" for kind in
             ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")]
    example = next(text_examples(text_data))
    with Capture(bert, names) as capture:
        example(bert)[0].backward()
    bert.zero_grad(set_to_none=True)
    for name in names:  # the premise: zero rows at every position but the first, none there
        gradient = capture.calls[name][0][2].grad[0]
        assert gradient.shape[0] > 1 and float(gradient[1:].abs().max()) == 0, name
        assert float(gradient[0].abs().min()) > 0, name
    reference = brute_force(bert, names, text_examples(text_data))
    stats = fl.collect_fisher(bert, text_data, config(), target_modules=names)
    assert_matches(stats, reference)
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in text_data)
    assert all(stats[name].num_tokens == real_tokens for name in names)  # zero rows still count as tokens


def test_gpt2_conv1d_lm_matches_brute_force(gpt2: nn.Module, lm_data: list) -> None:
    stats = fl.collect_fisher(gpt2, lm_data, config(), target_modules=["c_attn", "c_fc"])
    reference = brute_force(gpt2, GPT2_LAYERS, lm_examples(lm_data))
    assert_matches(stats, reference)
    c_attn = stats["transformer.h.0.attn.c_attn"]
    assert c_attn.layer_type == "conv1d"
    assert c_attn.weight_shape == (48, 16)  # (d_out, d_in): HF stores the transpose
    assert stats["transformer.h.0.mlp.c_fc"].weight_shape == (64, 16)
    kept = sum(int(((batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, :-1] == 1)).sum())
               for batch in lm_data)
    assert c_attn.num_tokens == kept
    assert kept < sum(int(batch["attention_mask"].sum()) for batch in lm_data)  # prompts were dropped


def test_cnn_matches_brute_force(cnn: TinyCNN) -> None:
    batches = double_pairs(image_batches(count=2, batch_size=3))
    names = ["conv1", "conv2", "head"]
    stats = fl.collect_fisher(cnn, batches, config(), target_modules=names)
    reference = brute_force(cnn, names, pair_examples(batches))
    assert_matches(stats, reference)
    assert stats["conv1"].num_tokens == 6 * 36  # 6x6 output positions (padding 1, stride 1)
    assert stats["conv2"].num_tokens == 6 * 9  # 3x3 output positions (kernel 2, stride 2)
    assert stats["conv1"].num_examples == stats["conv2"].num_examples == 6
    assert stats["conv2"].layer_type == "conv2d" and stats["conv2"].weight_shape == (5, 16)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_grad_mean_is_weight_gradient_over_examples(kind: str, mlp: TinyMLP, cnn: TinyCNN) -> None:
    """Without masking, `M` is the weight gradient of the summed loss divided by E."""
    if kind == "mlp":
        model, names, batches = mlp, ["fc1", "fc2"], double_pairs(pair_batches(count=2, batch_size=4))
    else:
        model, names, batches = cnn, ["conv1", "conv2"], double_pairs(image_batches(count=2, batch_size=3))
    stats = fl.collect_fisher(model, batches, config(), target_modules=names)
    model.zero_grad(set_to_none=True)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    total = sum(F.cross_entropy(model(inputs), labels, reduction="sum") for inputs, labels in batches)
    total.backward()
    examples = sum(labels.shape[0] for _, labels in batches)
    modules = dict(model.named_modules())
    for name in names:
        gradient = modules[name].weight.grad.reshape(modules[name].weight.shape[0], -1) / examples
        assert float(gradient.abs().max()) > 0
        torch.testing.assert_close(stats[name].grad_mean.double(), gradient, rtol=1e-4,
                                   atol=1e-5 * float(gradient.abs().max()))
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------


def test_mean_reduced_loss_fn_equals_sum_reduced(mlp: TinyMLP) -> None:
    batches = double_pairs(pair_batches(count=2, batch_size=5))

    def summed(model: nn.Module, batch: tuple) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    def averaged(model: nn.Module, batch: tuple) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1], reduction="mean")

    targets = ["fc1", "fc2"]
    default = fl.collect_fisher(mlp, batches, config(), target_modules=targets)
    with_sum = fl.collect_fisher(mlp, batches, config(), target_modules=targets, loss_fn=summed)
    with_mean = fl.collect_fisher(mlp, batches, config(loss_reduction="mean"), target_modules=targets,
                                  loss_fn=averaged)
    assert_stats_equal(with_sum, default)
    assert_stats_equal(with_mean, default)
    # the declaration matters: an undeclared mean shrinks G by 1/N^2 (N = 5 per batch)
    undeclared = fl.collect_fisher(mlp, batches, config(), target_modules=targets, loss_fn=averaged)
    torch.testing.assert_close(undeclared["fc2"].grad_cov * 25, default["fc2"].grad_cov, rtol=1e-5, atol=0)


def test_mean_reduced_hf_lm_loss_equals_default(gpt2: nn.Module, lm_data: list) -> None:
    """HF's own causal-LM loss (a mean over shifted labels != -100) declared as mean."""

    def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    default = fl.collect_fisher(gpt2, lm_data, config(), target_modules=["c_attn"])
    custom = fl.collect_fisher(gpt2, lm_data, config(loss_reduction="mean"), target_modules=["c_attn"],
                               loss_fn=hf_loss)
    assert_stats_equal(custom, default, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "bert", "gpt2"])
def test_batch_size_does_not_change_statistics(kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "mlp":
        model, batches, targets = request.getfixturevalue("mlp"), double_pairs(pair_batches(2, 5)), ["fc1", "fc2"]
    elif kind == "bert":
        model, batches, targets = request.getfixturevalue("bert"), request.getfixturevalue("text_data"), BERT_TARGETS
    else:
        model, batches, targets = request.getfixturevalue("gpt2"), request.getfixturevalue("lm_data"), ["c_attn"]
    count = sum(len(batch[1]) if isinstance(batch, tuple) else len(batch["labels"]) for batch in batches)
    first = fl.collect_fisher(model, batches, config(), target_modules=targets)
    for sizes in ([1] * count, [count], [count - 3, 1, 2]):
        other = fl.collect_fisher(model, rebatch(batches, sizes), config(), target_modules=targets)
        assert other.num_batches == len(sizes)
        assert_stats_equal(other, first, rtol=1e-4)


def test_num_batches_limits_the_data(mlp: TinyMLP) -> None:
    batches = double_pairs(pair_batches(count=3, batch_size=5))
    limited = fl.collect_fisher(mlp, batches, config(num_batches=2), target_modules=["fc1"])
    exact = fl.collect_fisher(mlp, batches[:2], config(), target_modules=["fc1"])
    assert limited.num_batches == 2 and limited["fc1"].num_examples == 10
    assert_stats_equal(limited, exact)


# --------------------------------------------------------------------------------------------
# True Fisher
# --------------------------------------------------------------------------------------------


def exact_true_fisher(model: nn.Module, inputs: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """`(1/T) sum_t sum_c p_c g_c g_c^T`, the expectation over y ~ softmax(logits), by enumeration."""
    sums: dict[str, torch.Tensor] = {}
    for i in range(inputs.shape[0]):
        with torch.no_grad():
            probabilities = torch.softmax(model(inputs[i:i + 1])[0], dim=-1)
        for c in range(probabilities.shape[0]):
            with Capture(model, names) as capture:
                F.cross_entropy(model(inputs[i:i + 1]), torch.tensor([c]), reduction="sum").backward()
            for name in names:
                (_, _, y), = capture.calls[name]
                g = y.grad.reshape(-1).double()
                sums[name] = sums.get(name, 0) + probabilities[c] * torch.outer(g, g)
    model.zero_grad(set_to_none=True)
    return {name: value / inputs.shape[0] for name, value in sums.items()}


def test_true_fisher_is_seeded(mlp: TinyMLP) -> None:
    batches = double_pairs(pair_batches(count=2, batch_size=3))
    targets = ["fc1", "fc2"]
    run = fl.collect_fisher(mlp, batches, config(fisher="true", n_samples=3, seed=3), target_modules=targets)
    again = fl.collect_fisher(mlp, batches, config(fisher="true", n_samples=3, seed=3), target_modules=targets)
    other = fl.collect_fisher(mlp, batches, config(fisher="true", n_samples=3, seed=4), target_modules=targets)
    assert (run.fisher, run.n_samples) == ("true", 3)
    for name in targets:
        assert torch.equal(run[name].grad_cov, again[name].grad_cov)
        assert torch.equal(run[name].grad_mean, again[name].grad_mean)
        assert not torch.equal(run[name].grad_cov, other[name].grad_cov)
        # averaged over draws: T and E count each input once
        assert run[name].num_tokens == 6 and run[name].num_examples == 6


def test_true_fisher_converges_to_the_expectation(mlp: TinyMLP) -> None:
    batches = double_pairs(pair_batches(count=1, batch_size=6))
    targets = ["fc1", "fc2"]
    run = fl.collect_fisher(mlp, batches, config(fisher="true", n_samples=400, seed=3), target_modules=targets)
    for parameter in mlp.parameters():
        parameter.requires_grad_(True)
    exact = exact_true_fisher(mlp, batches[0][0], targets)
    empirical = fl.collect_fisher(mlp, batches, config(), target_modules=targets)
    for name in targets:
        error = float((run[name].grad_cov.double() - exact[name]).norm() / exact[name].norm())
        assert error < 0.1, f"{name}: relative error {error:.3f} of the Monte Carlo true Fisher"
        # the labels do not change the inputs: A is the same as the empirical Fisher's
        torch.testing.assert_close(run[name].act_cov, empirical[name].act_cov)
        # and the data's own (random) labels give a different G
        empirical_error = float((empirical[name].grad_cov.double() - exact[name]).norm() / exact[name].norm())
        assert empirical_error > 2 * error
    # E_y[g] = 0 under the model's distribution, so the sampled M shrinks like 1/sqrt(n)
    few = fl.collect_fisher(mlp, batches, config(fisher="true", n_samples=4, seed=3), target_modules=targets)
    assert float(run["fc2"].grad_mean.norm()) < 0.5 * float(few["fc2"].grad_mean.norm())


def test_true_fisher_needs_no_labels(bert: nn.Module, text_data: list) -> None:
    unlabeled = [{key: value for key, value in batch.items() if key != "labels"} for batch in text_data]
    stats = fl.collect_fisher(bert, unlabeled, config(fisher="true", n_samples=2), target_modules=["query"])
    labeled = fl.collect_fisher(bert, text_data, config(), target_modules=["query"])
    assert set(stats) == set(labeled) and len(stats) == 2
    for name in stats:
        torch.testing.assert_close(stats[name].act_cov, labeled[name].act_cov)
        assert float(stats[name].grad_cov.abs().max()) > 0


# --------------------------------------------------------------------------------------------
# The model is left as it was found
# --------------------------------------------------------------------------------------------


def model_state(model: nn.Module) -> dict:
    return {
        "training": {name: module.training for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": {name: (tuple(module._forward_hooks), tuple(module._forward_pre_hooks),
                         tuple(module._backward_hooks), tuple(module._forward_hooks_with_kwargs))
                  for name, module in model.named_modules()},
        "attributes": {name: sorted(vars(module)) for name, module in model.named_modules()},
        "grads": {name: p.grad is None for name, p in model.named_parameters()},
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
    }


def failing_loader(batches: list) -> Iterator:
    yield batches[0]
    raise RuntimeError("loader broke on batch 1")


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "peft"])
@pytest.mark.parametrize("outcome", ["ok", "raises"])
def test_model_state_is_restored(peft: bool, outcome: str, text_data: list) -> None:
    model = tiny_bert()
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"]))
    # a mixed state the collection must not flatten: train mode with one block in eval,
    # embeddings frozen, a user hook on a target layer and one elsewhere
    model.train()
    inner = model.base_model.model if peft else model
    inner.bert.encoder.layer[1].eval()
    inner.bert.embeddings.requires_grad_(False)
    inner.classifier.weight.requires_grad_(False)
    calls = []
    inner.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *args: calls.append("q"))
    inner.bert.pooler.register_forward_pre_hook(lambda *args: calls.append("p"))
    before = model_state(model)
    assert len(set(before["training"].values())) == 2 and len(set(before["requires_grad"].values())) == 2

    kwargs = {} if peft else {"target_modules": ["query", "value"]}
    if outcome == "ok":
        stats = fl.collect_fisher(model, text_data, config(), **kwargs)
        assert len(stats) == 4
    else:
        with pytest.raises(RuntimeError, match="loader broke on batch 1"):
            fl.collect_fisher(model, failing_loader(text_data), config(), **kwargs)
    after = model_state(model)
    for key in ("training", "requires_grad", "hooks", "attributes", "grads"):
        assert after[key] == before[key], key
    for name, weight in before["weights"].items():
        assert torch.equal(after["weights"][name], weight), name
    # user hooks still fire once per forward; ours are gone
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=text_data[0]["input_ids"], attention_mask=text_data[0]["attention_mask"])
    assert calls == ["q", "p"]
