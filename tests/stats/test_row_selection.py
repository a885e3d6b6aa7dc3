"""Which rows reach the factor sums: the kept rows' indices and the output-gradient rows that are not
all zero. `test_collect_bruteforce.py` checks the statistics these selections feed."""

from __future__ import annotations

import torch

from fisherlora.stats.accumulators import nonzero_row_index
from fisherlora.stats.hooks import kept_row_index
from fisherlora.stats.objective import LossTerms


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
