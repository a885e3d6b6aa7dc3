"""Failure modes seen in public K-FAC/PEFT bug reports: in-place ops after a targeted layer, weights
that are not materialized (ZeRO-3/FSDP), and layer groups over a shuffling dataloader."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fisherlora as fl
from models import TinyCNN, TinyMLP, image_batches, pair_batches, tiny_gpt2


def config(**overrides) -> fl.FisherConfig:
    values = {"progress": False, "collect_grad_mean": True, "num_batches": None}
    values.update(overrides)
    return fl.FisherConfig(**values)


def assert_same_statistics(first: fl.FisherStats, second: fl.FisherStats, names: list[str] | None = None,
                           rtol: float = 1e-5) -> None:
    for name in names or list(second):
        assert first[name].num_tokens == second[name].num_tokens, name
        assert first[name].num_examples == second[name].num_examples, name
        for key in ("act_cov", "grad_cov", "grad_mean"):
            a, b = getattr(first[name], key), getattr(second[name], key)
            scale = float(b.abs().max())
            assert scale > 0, f"{name}.{key} is zero: the comparison would be vacuous"
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6 * scale,
                                       msg=lambda m, name=name, key=key: f"{name}.{key}: {m}")


# --------------------------------------------------------------------------------------------
# In-place ops after a targeted layer
# --------------------------------------------------------------------------------------------


class AfterTarget(nn.Module):
    """`stem -> fc1 -> op -> fc2`, where `op` runs in place or out of place on fc1's output or input."""

    def __init__(self, op: str, inplace: bool) -> None:
        super().__init__()
        self.op, self.inplace = op, inplace
        self.stem = nn.Linear(6, 6)
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(inputs)
        out = self.fc1(hidden)
        if self.op == "relu":  # nn.ReLU(inplace=True) after the layer
            out = out.relu_() if self.inplace else torch.relu(out)
        elif self.op == "scale":  # e.g. an in-place attention or residual scaling
            out = torch.tanh(out.mul_(0.5) if self.inplace else out * 0.5)
        elif self.op == "residual_output":  # h = fc(x); h += x
            out = torch.tanh(out.add_(hidden) if self.inplace else out + hidden)
        else:  # "residual_input": h = fc(x); x += h (the layer's own input is overwritten)
            out = torch.tanh(hidden.add_(out) if self.inplace else hidden + out)
        return self.fc2(out)


@pytest.mark.parametrize("op", ["relu", "scale", "residual_output", "residual_input"])
def test_inplace_op_after_a_target_gives_the_out_of_place_statistics(op: str) -> None:
    torch.manual_seed(0)
    reference_model = AfterTarget(op, inplace=False)
    inplace_model = copy.deepcopy(reference_model)
    inplace_model.inplace = True
    batches = pair_batches(count=3, batch_size=4)
    targets = ["fc1", "fc2"]
    expected = fl.collect_fisher(reference_model, batches, config(), target_modules=targets)
    actual = fl.collect_fisher(inplace_model, batches, config(), target_modules=targets)
    assert_same_statistics(actual, expected)


def test_inplace_relu_in_a_sequential() -> None:
    """The issue's own input: Linear(6, 8) -> ReLU(inplace=True) -> Linear(8, 3), first Linear targeted."""
    torch.manual_seed(0)
    reference_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    inplace_model = copy.deepcopy(reference_model)
    inplace_model[1] = nn.ReLU(inplace=True)
    batches = pair_batches(count=3, batch_size=5)
    expected = fl.collect_fisher(reference_model, batches, config(), target_modules=["0"])
    actual = fl.collect_fisher(inplace_model, batches, config(), target_modules=["0"])
    assert_same_statistics(actual, expected)


# --------------------------------------------------------------------------------------------
# Weights that are not materialized (ZeRO-3 / FSDP partitions, meta tensors)
# --------------------------------------------------------------------------------------------


class NeverIterated:
    """A dataloader that fails the test if collection starts iterating it."""

    def __iter__(self):  # noqa: ANN204
        raise AssertionError("the dataloader was iterated before the weights were checked")


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d", "peft", "meta"])
def test_partitioned_weight_is_refused_before_any_batch(kind: str) -> None:
    from peft import LoraConfig, get_peft_model

    model: nn.Module
    if kind == "conv1d":  # transformers' GPT-2 Conv1D
        model = tiny_gpt2()
        model.transformer.h[1].attn.c_attn.weight.data = torch.empty(0)
        name, kwargs = r"transformer\.h\.1\.attn\.c_attn", {"target_modules": ["c_attn"]}
    elif kind == "conv2d":
        model = TinyCNN()
        model.conv2.weight.data = torch.empty(0)  # what ZeRO-3 leaves on a rank outside a gather
        name, kwargs = "conv2", {"target_modules": ["conv1", "conv2"]}
    elif kind == "peft":
        model = get_peft_model(TinyMLP(), LoraConfig(r=2, target_modules=["fc1", "fc2"]))
        model.base_model.model.fc2.base_layer.weight.data = torch.empty(0)
        name, kwargs = "fc2", {}
    else:
        model = TinyMLP()
        if kind == "meta":
            model.fc2.weight = nn.Parameter(torch.empty(3, 5, device="meta"))
        else:
            model.fc2.weight.data = torch.empty(0)
        name, kwargs = "fc2", {"target_modules": ["fc1", "fc2"]}
    flags = {key: p.requires_grad for key, p in model.named_parameters()}
    with pytest.raises(fl.StatisticsError, match=rf"module '{name}'.*(partitioned|not materialized).*"
                                                 r"docs/scaling\.md"):
        fl.collect_fisher(model, NeverIterated(), config(), **kwargs)
    assert {key: p.requires_grad for key, p in model.named_parameters()} == flags


def test_initializing_a_partitioned_weight_from_saved_statistics_is_refused_untouched() -> None:
    """The same kind through the other entry point: statistics collected earlier (or on another
    rank), then `initialize_lora_fisher` on a model whose weight is a shard."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TinyMLP(), LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    stats = fl.collect_fisher(model, pair_batches(), config())
    model.base_model.model.fc2.base_layer.weight.data = torch.empty(0)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(fl.StatisticsError, match=r"module 'fc2'.*partitioned.*docs/scaling\.md"):
        fl.initialize_lora_fisher(model, stats, config(method="fisher_svd"))
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


# --------------------------------------------------------------------------------------------
# Layer groups over a shuffling dataloader: every pass sees the same batches
# --------------------------------------------------------------------------------------------


def shuffled_loader(generator: torch.Generator | None) -> DataLoader:
    inputs, labels = zip(*pair_batches(count=6, batch_size=4), strict=True)
    dataset = TensorDataset(torch.cat(inputs), torch.cat(labels))
    return DataLoader(dataset, batch_size=4, shuffle=True, generator=generator)


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded-generator", "global-rng"])
def test_layer_groups_see_the_same_batches_of_a_shuffling_loader(seeded: bool) -> None:
    """Two of six batches are used, so a second pass with another order would see other data."""
    torch.manual_seed(0)
    net = TinyMLP()
    targets = ["fc1", "fc2"]

    def loader() -> DataLoader:
        torch.manual_seed(123)  # the global RNG shuffles an unseeded loader
        return shuffled_loader(torch.Generator().manual_seed(0) if seeded else None)

    single = fl.collect_fisher(net, loader(), config(num_batches=2), target_modules=targets)
    grouped_loader = loader()
    grouped = fl.collect_fisher(net, grouped_loader, config(num_batches=2, layer_groups=2), target_modules=targets)
    assert_same_statistics(grouped, single)
    # the loader (and the global RNG) are left as after one pass: its next pass is the one a plain
    # collection would have left next
    after_grouped = next(iter(grouped_loader))[0]
    plain_loader = loader()
    fl.collect_fisher(net, plain_loader, config(num_batches=2), target_modules=targets)
    after_plain = next(iter(plain_loader))[0]
    assert torch.equal(after_grouped, after_plain)


class RandomAugmentation(Dataset):
    """Adds noise from Python's `random` per item, re-drawn on every access: not restorable when
    it draws from a private generator."""

    def __init__(self, private: bool) -> None:
        self.base = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
        self.labels = torch.arange(8) % 3
        self.random = random.Random(0) if private else random

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base[index] + self.random.random(), self.labels[index]


def test_layer_groups_restore_global_python_random_for_augmentations() -> None:
    net = TinyMLP()
    random.seed(5)
    single = fl.collect_fisher(net, DataLoader(RandomAugmentation(private=False), batch_size=4),
                               config(), target_modules=["fc1", "fc2"])
    random.seed(5)
    grouped = fl.collect_fisher(net, DataLoader(RandomAugmentation(private=False), batch_size=4),
                                config(layer_groups=2), target_modules=["fc1", "fc2"])
    assert_same_statistics(grouped, single)


def test_layer_groups_refuse_a_pass_that_sees_other_batches() -> None:
    net = TinyMLP()
    flags = {key: p.requires_grad for key, p in net.named_parameters()}
    loader = DataLoader(RandomAugmentation(private=True), batch_size=4)
    with pytest.raises(fl.StatisticsError, match=r"pass 2 .* batch 0 .* differs from pass 1.*layer_groups=1"):
        fl.collect_fisher(net, loader, config(layer_groups=2), target_modules=["fc1", "fc2"])
    assert {key: p.requires_grad for key, p in net.named_parameters()} == flags


def test_layer_groups_with_images_and_a_seeded_loader() -> None:
    torch.manual_seed(1)
    net = TinyCNN()
    images, labels = zip(*image_batches(count=4, batch_size=3), strict=True)
    dataset = TensorDataset(torch.cat(images), torch.cat(labels))

    def loader() -> DataLoader:
        return DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7))

    names = ["conv1", "conv2", "head"]
    single = fl.collect_fisher(net, loader(), config(num_batches=2), target_modules=names)
    grouped = fl.collect_fisher(net, loader(), config(num_batches=2, layer_groups=3), target_modules=names)
    assert_same_statistics(grouped, single)
