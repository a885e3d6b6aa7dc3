"""Command-line list options shared by every command: `--methods a,b c` means `[a, b, c]`
(commas, spaces or both, as many command lines accept), each item converted and checked by argparse."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

Item = TypeVar("Item")


def comma_list(convert: Callable[[str], Item],
               keep_whole: Callable[[str], bool] | None = None) -> Callable[[str], list[Item]]:
    """An argparse `type` for one token of a list option: split on commas, convert each part.

    A part that `convert` rejects (ValueError) is a usage error naming the token (exit code 2). A
    token for which `keep_whole` is true (e.g. a regular expression, whose commas are its own) is
    converted unsplit.
    """

    def parse(token: str) -> list[Item]:
        if keep_whole is not None and keep_whole(token):
            return [convert(token)]
        return [convert(part.strip()) for part in token.split(",") if part.strip()]

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse says "invalid int value: ..."
    return parse


class _Concatenate(argparse.Action):
    """Joins the per-token lists of `comma_list` into one list; an empty result is a usage error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = [item for token in values for item in token]
        if not items:
            parser.error(f"argument {option_string}: expected at least one value")
        setattr(namespace, self.dest, items)


def add_list_argument(parser: argparse.ArgumentParser, flag: str, convert: Callable[[str], Any] = str,
                      keep_whole: Callable[[str], bool] | None = None, **options: Any) -> None:
    """`parser.add_argument(flag, nargs="+", ...)` whose values may also be comma-separated."""
    parser.add_argument(flag, nargs="+", type=comma_list(convert, keep_whole), action=_Concatenate, **options)


def non_negative_int(text: str) -> int:
    """An argparse `type`: an integer >= 0 (a seed)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    """An argparse `type`: a finite float > 0 (a learning rate)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


non_negative_int.__name__ = "non-negative int"  # argparse: "invalid non-negative int value: '-1'"
positive_float.__name__ = "positive float"
