"""Bad inputs to `collect_fisher` fail early with a message that says what and where."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import fisherlora as fl
from models import TinyMLP, lm_batches, pair_batches, text_batches, tiny_bert, tiny_gpt2


def config(**overrides) -> fl.FisherConfig:
    values = {"progress": False, "num_batches": None}
    values.update(overrides)
    return fl.FisherConfig(**values)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


class Bypass(nn.Module):
    """Logits `fc(x[:, :-1]) + x[:, -1:]`: the last input column reaches the loss without
    passing through the targeted layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc(inputs[:, :-1]) + inputs[:, -1:]


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(inputs).mean(1))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(2, 2, kernel_size=3, groups=2)
        self.head = nn.Linear(2, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(inputs).mean((2, 3)))


class QuantLinear(nn.Linear):
    """A Linear whose weight was replaced by int8 storage, as a quantized checkpoint would."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, d_out)
        self.weight = nn.Parameter(torch.randint(-8, 8, (d_out, d_in), dtype=torch.int8), requires_grad=False)


class QuantModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = QuantLinear(6, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ self.fc.weight.float().T


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return tiny_bert()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_empty_dataloader() -> None:
    with pytest.raises(fl.StatisticsError, match="dataloader yielded no batches"):
        fl.collect_fisher(TinyMLP(), [], config(), target_modules=["fc1"])

    def empty() -> Iterator:
        yield from ()

    with pytest.raises(fl.StatisticsError, match="dataloader yielded no batches"):
        fl.collect_fisher(TinyMLP(), empty(), config(), target_modules=["fc1"])


def _collect_text(batches: list) -> None:
    fl.collect_fisher(tiny_bert(), batches, config(), target_modules=["query"])


def test_batches_not_collated_into_tensors_name_the_fix() -> None:
    batches = text_batches(count=2, batch_size=2)
    as_lists = [{key: value.tolist() for key, value in batch.items()} for batch in batches]
    with pytest.raises(TypeError, match=r"batch values \['input_ids', .*\] are Python lists.*DataCollatorWithPadding"):
        _collect_text(as_lists)
    per_example = [[{key: value[row] for key, value in batch.items()} for row in range(2)] for batch in batches]
    with pytest.raises(TypeError, match=r"list of 2 per-example mappings.*collate"):
        _collect_text(per_example)
    labels_as_list = [{**batch, "labels": batch["labels"].tolist()} for batch in batches]
    with pytest.raises(TypeError, match=r"\['labels'\] are Python lists"):
        _collect_text(labels_as_list)
    pairs = [(inputs, labels.tolist()) for inputs, labels in pair_batches(count=2, batch_size=2)]
    with pytest.raises(TypeError, match=r"labels as a tensor, got a list"):
        fl.collect_fisher(TinyMLP(), pairs, config(), target_modules=["fc1"])


def test_every_token_masked_by_attention(bert: nn.Module) -> None:
    batches = text_batches(count=2, batch_size=2)
    for batch in batches:
        batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    with pytest.raises(fl.StatisticsError,
                       match=r"module 'bert\.encoder\.layer\.0\.attention\.self\.query' saw no unmasked token"):
        fl.collect_fisher(bert, batches, config(), target_modules=["query"])
    assert no_hooks_left(bert)


def test_every_lm_label_ignored() -> None:
    batches = lm_batches(count=2)
    for batch in batches:
        batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(fl.StatisticsError, match=r"module 'transformer\.h\.0\.attn\.c_attn' saw no unmasked token"):
        fl.collect_fisher(tiny_gpt2(), batches, config(), target_modules=["c_attn"])


def test_only_the_first_lm_label_kept_is_still_masked() -> None:
    """A label at position 0 has no predecessor: it is never a target, so nothing is kept."""
    batches = lm_batches(count=1)
    labels = torch.full_like(batches[0]["labels"], -100)
    labels[:, 0] = batches[0]["input_ids"][:, 0]
    batches[0]["labels"] = labels
    with pytest.raises(fl.StatisticsError, match="saw no unmasked token"):
        fl.collect_fisher(tiny_gpt2(), batches, config(), target_modules=["c_attn"])


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_loss_names_the_batch(value: float) -> None:
    model = Bypass()
    batches = pair_batches(count=3, batch_size=2, d_in=5)
    batches[1][0][0, -1] = value  # only the bypass column: the targeted layer's input stays finite
    with pytest.raises(fl.StatisticsError, match=r"non-finite loss \((nan|inf)\) at batch 1"):
        fl.collect_fisher(model, batches, config(), target_modules=["fc"])
    assert no_hooks_left(model)
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_non_finite_input_names_the_module() -> None:
    model = TinyMLP()
    batches = pair_batches(count=3, batch_size=2)
    batches[2][0][1, 3] = float("nan")
    with pytest.raises(fl.StatisticsError, match=r"non-finite input to module 'fc1' at batch 2"):
        fl.collect_fisher(model, batches, config(), target_modules=["fc1", "fc2"])
    assert no_hooks_left(model)


def test_empirical_fisher_needs_labels(bert: nn.Module) -> None:
    batches = [{key: value for key, value in batch.items() if key != "labels"} for batch in text_batches(count=1)]
    with pytest.raises(fl.StatisticsError, match="empirical Fisher needs `labels`.*fisher='true'"):
        fl.collect_fisher(bert, batches, config(), target_modules=["query"])
    # the message's advice works
    assert len(fl.collect_fisher(bert, batches, config(fisher="true"), target_modules=["query"])) == 2


def test_float_labels_for_classification() -> None:
    inputs, labels = pair_batches(count=1)[0]
    with pytest.raises(fl.StatisticsError, match="1-D integer tensor.*loss_fn="):
        fl.collect_fisher(TinyMLP(), [(inputs, labels.float())], config(), target_modules=["fc1"])


def test_unrecognized_batch_layout() -> None:
    inputs, labels = pair_batches(count=1)[0]
    with pytest.raises(TypeError, match="mapping for model\\(\\*\\*batch\\) or an \\(inputs, labels\\) pair"):
        fl.collect_fisher(TinyMLP(), [(inputs, labels, labels)], config(), target_modules=["fc1"])


def test_true_fisher_with_loss_fn_needs_sample_fn() -> None:
    def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    with pytest.raises(ValueError, match="sample_fn"):
        fl.collect_fisher(TinyMLP(), pair_batches(count=1), config(fisher="true"), target_modules=["fc1"],
                          loss_fn=loss_fn)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def test_embedding_target_is_unsupported() -> None:
    batches = [(torch.randint(0, 10, (2, 3)), torch.tensor([0, 1]))]
    with pytest.raises(TypeError, match=r"module 'emb' has type Embedding"):
        fl.collect_fisher(WithEmbedding(), batches, config(), target_modules=["emb", "fc"])


@pytest.mark.parametrize("targets", [["word_embeddings"], ["word_embeddings", "query"]])
def test_peft_embedding_target_is_unsupported(bert: nn.Module, targets: list[str]) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(bert), LoraConfig(r=2, target_modules=targets))
    with pytest.raises(TypeError, match=r"module 'bert\.embeddings\.word_embeddings' has type Embedding"):
        fl.collect_fisher(model, text_batches(count=1), config())


def test_depthwise_conv_is_unsupported() -> None:
    batches = [(torch.randn(2, 2, 5, 5), torch.tensor([0, 1]))]
    with pytest.raises(TypeError, match=r"module 'dw' is an nn\.Conv2d with groups=2"):
        fl.collect_fisher(Depthwise(), batches, config(), target_modules=["dw"])


def test_quantized_weight_names_the_module() -> None:
    with pytest.raises(TypeError, match=r"module 'fc' has a torch\.int8 weight: not floating point"):
        fl.collect_fisher(QuantModel(), pair_batches(count=1), config(), target_modules=["fc"])


def test_plain_model_needs_target_modules() -> None:
    with pytest.raises(ValueError, match="needs target_modules"):
        fl.collect_fisher(TinyMLP(), pair_batches(count=1), config())


def test_target_modules_matching_nothing() -> None:
    with pytest.raises(ValueError, match=r"no module of the model matches target_modules=\['query'\]"):
        fl.collect_fisher(TinyMLP(), pair_batches(count=1), config(), target_modules=["query"])


def test_peft_model_rejects_target_modules(bert: nn.Module) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(bert), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(ValueError, match="target_modules is only for plain models"):
        fl.collect_fisher(model, text_batches(count=1), config(), target_modules=["query"])


def test_bad_config_values() -> None:
    with pytest.raises(ValueError, match="fisher must be one of"):
        fl.FisherConfig(fisher="exact")
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        fl.FisherConfig(n_samples=0)
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        fl.FisherConfig(loss_reduction="none")
