"""Which rows reach the factor sums: the kept rows' indices and the output-gradient rows that are not
all zero. `test_collect_bruteforce.py` checks the statistics these selections feed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherlora as fl
from fisherlora.stats import hooks
from fisherlora.stats.accumulators import nonzero_row_index
from fisherlora.stats.hooks import kept_row_index
from fisherlora.stats.layers import TokenRows
from fisherlora.stats.objective import LossTerms
from models import TinyMLP, lm_batches, pair_batches, text_batches, tiny_bert, tiny_gpt2


def test_dense_rows_need_no_index() -> None:
    assert nonzero_row_index(torch.randn(7, 5)) is None
    assert nonzero_row_index(torch.zeros(0, 5)) is None


def test_zero_rows_are_dropped_and_only_they() -> None:
    rows = torch.randn(6, 4)
    rows[1] = 0.0
    rows[3] = -0.0
    rows[4, 0] = 0.0  # a zero first entry alone does not make a zero row
    rows[5, 0] = 0.0
    rows[5, 2] = float("nan")  # nor does a NaN: the finite checks must see it
    index = nonzero_row_index(rows)
    assert index is not None and index.dtype == torch.int64
    assert index.tolist() == [0, 2, 4, 5]


def test_first_column_zero_everywhere_but_rows_live() -> None:
    rows = torch.randn(5, 3)
    rows[:, 0] = 0.0
    assert nonzero_row_index(rows) is None


def test_all_rows_zero() -> None:
    index = nonzero_row_index(torch.zeros(4, 3))
    assert index is not None and index.numel() == 0


def test_kept_row_index_is_the_mask_or_none() -> None:
    cpu = torch.device("cpu")
    tokens = torch.ones(3, 4, dtype=torch.bool)
    tokens[0, 2:] = False
    tokens[2] = False
    terms = LossTerms(examples=torch.tensor([True, True, False]), tokens=tokens)
    index = kept_row_index(terms, (3, 4), cpu)
    assert index is not None and index.dtype == torch.int64
    assert index.tolist() == [0, 1, 4, 5, 6, 7]
    assert kept_row_index(terms, (3,), cpu).tolist() == [0, 1]  # pooled rows follow the examples
    every = LossTerms(examples=torch.ones(3, dtype=torch.bool), tokens=torch.ones(3, 4, dtype=torch.bool))
    assert kept_row_index(every, (3, 4), cpu) is None  # nothing to gather
    assert kept_row_index(every, (3,), cpu) is None
    assert kept_row_index(None, (3, 4), cpu) is None


# --------------------------------------------------------------------------------------------
# Kept rows gathered in the hook (the loss terms known before the forward, no M)
# --------------------------------------------------------------------------------------------


def config(**overrides) -> fl.FisherConfig:
    return fl.FisherConfig(**{"progress": False, "num_batches": None, **overrides})


@pytest.fixture
def hook_gathers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per call of `kept_input_rows` by the hooks, whether it gathered a subset of rows."""
    calls: list[bool] = []
    original = hooks.kept_input_rows

    def spy(layer_input: torch.Tensor, kept_rows: torch.Tensor | None) -> TokenRows:
        calls.append(kept_rows is not None)
        return original(layer_input, kept_rows)

    monkeypatch.setattr(hooks, "kept_input_rows", spy)
    return calls


def summed_cross_entropy(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")  # labels -100: no term


def labelled_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = pair_batches(count=3, batch_size=5)
    for index, (_, labels) in enumerate(batches):
        labels[index % 5] = -100  # one ignored example per batch: its rows are not kept
    return batches


@pytest.mark.parametrize("kind", ["bert", "gpt2", "loss_fn"])
def test_rows_gathered_in_the_hook_give_the_statistics_of_the_later_gather(kind: str, hook_gathers: list) -> None:
    """Without `M` the hooks copy only the kept rows; with `M` (every row needed) they copy all and
    the kept ones are gathered after the forward (the path `test_collect_bruteforce.py` ties to
    brute force). `A`, `G` and the counts must be the same."""
    loss_fn = None
    if kind == "bert":
        model, batches, targets = tiny_bert(), text_batches(count=2, batch_size=4), ["query", "value", "dense"]
    elif kind == "gpt2":
        model, batches, targets = tiny_gpt2(), lm_batches(count=2, batch_size=3), ["c_attn", "c_fc", "c_proj"]
    else:
        torch.manual_seed(0)
        model, batches, targets = TinyMLP(), labelled_pairs(), ["fc1", "fc2"]
        loss_fn = summed_cross_entropy
    later = fl.collect_fisher(model, batches, config(collect_grad_mean=True), target_modules=targets, loss_fn=loss_fn)
    assert not hook_gathers
    in_hook = fl.collect_fisher(model, batches, config(collect_grad_mean=False), target_modules=targets,
                                loss_fn=loss_fn)
    assert any(hook_gathers), "the hooks never gathered: the comparison would not test them"
    assert set(in_hook) == set(later)
    for name in later:
        assert in_hook[name].num_tokens == later[name].num_tokens, name
        assert in_hook[name].num_examples == later[name].num_examples, name
        for key in ("act_cov", "grad_cov"):
            expected = getattr(later[name], key)
            assert float(expected.abs().max()) > 0
            torch.testing.assert_close(getattr(in_hook[name], key), expected, rtol=1e-6, atol=0, msg=f"{name}.{key}")


@pytest.mark.parametrize("ignored", [True, False])
def test_an_in_place_write_to_the_input_after_the_hook_cannot_reach_the_gathered_rows(ignored: bool,
                                                                                     hook_gathers: list) -> None:
    class OverwritesInput(nn.Module):  # h = fc1(x); x += h: fc1's input is changed after fc1 read it
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.stem, self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            self.inplace = inplace

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            hidden = self.stem(inputs)
            out = self.fc1(hidden)
            return self.fc2(torch.tanh(hidden.add_(out) if self.inplace else hidden + out))

    batches = labelled_pairs() if ignored else pair_batches(count=3, batch_size=5)  # False: every row is kept
    settings = config(collect_grad_mean=False)
    expected = fl.collect_fisher(OverwritesInput(False), batches, settings, target_modules=["fc1"],
                                 loss_fn=summed_cross_entropy)
    actual = fl.collect_fisher(OverwritesInput(True), batches, settings, target_modules=["fc1"],
                               loss_fn=summed_cross_entropy)
    assert hook_gathers and all(hook_gathers) == ignored
    for key in ("act_cov", "grad_cov"):
        torch.testing.assert_close(getattr(actual["fc1"], key), getattr(expected["fc1"], key), rtol=1e-6, atol=0)


def test_logits_of_another_batch_size_are_refused() -> None:
    class FewerLogits(nn.Module):
        """A sequence classifier that answers for the first example only."""

        loss_type = "ForSequenceClassification"

        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_bert()
            self.config = self.inner.config

        def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(**inputs).logits[:1]

    batches = [{key: value for key, value in batch.items() if key != "labels"} for batch in text_batches(count=1)]
    with pytest.raises(fl.StatisticsError, match="logits for 1 examples, but batch 0 has 4"):
        fl.collect_fisher(FewerLogits(), batches, config(fisher="true"), target_modules=["query"])
