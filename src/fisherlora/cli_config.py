"""Command-line flags made from the configuration dataclasses, so that names, types, choices,
defaults and help are declared once (on the dataclass fields) and never restated here.

- `CollectionConfig`/`FisherConfig` fields become `--name-with-dashes` (or the field's `flag`
  metadata), unless their metadata says `cli=False`.
- Each initializer's options dataclass becomes `--{flag_prefix}-{field}` flags, applied only when
  that method is chosen; giving one for another method is an error.
"""

from __future__ import annotations

import argparse
import re
import typing
from dataclasses import MISSING, Field, fields
from typing import Any

from .config import FisherConfig, field_value_type
from .init.catalog import MethodEntry

_DEST_PREFIX = "config__"


def _converter(base: Any, optional: bool) -> Any:
    if not optional:
        return base

    def convert(text: str) -> Any:
        return None if text.lower() == "none" else base(text)

    convert.__name__ = base.__name__
    return convert


def _cli_fields(cls: type) -> list[tuple[Field[Any], Any]]:
    """`(field, resolved annotation)` of the fields of `cls` that are command-line flags."""
    hints = typing.get_type_hints(cls)
    return [(item, hints[item.name]) for item in fields(cls) if item.metadata.get("cli", True)]


def _flag(item: Field[Any]) -> str:
    """The command-line flag of a `FisherConfig` field: its `flag` metadata, else `--name-with-dashes`."""
    return str(item.metadata.get("flag", "--" + item.name.replace("_", "-")))


def _default(item: Field[Any]) -> Any:
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:
        return item.default_factory()
    raise TypeError(f"field {item.name} has no default: it cannot be an optional flag")


def add_fisher_arguments(parser: argparse.ArgumentParser, entries: list[MethodEntry]) -> None:
    """Add `--method`, the collection/damping flags and every method's option flags.

    Args:
        parser: the subcommand's parser.
        entries: the methods `--method` may name (their options classes give the option flags).
    """
    parser.add_argument("--method", default=FisherConfig.method, choices=[entry.name for entry in entries],
                        help=f"initialization method (default: {FisherConfig.method}); `fisherlora methods` "
                        "describes them: those marked [peft] are PEFT's own and run in `fisherlora bench` only")
    group = parser.add_argument_group("statistics and damping")
    for item, field_type in _cli_fields(FisherConfig):
        _add_typed(group, item, field_type, _flag(item), _DEST_PREFIX + item.name, _default(item), _default(item))
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    for options in _options_classes(entries):
        group = parser.add_argument_group(f"options of {', '.join(e.name for e in entries if e.options is options)}")
        for item, field_type in _cli_fields(options):
            flag = f"--{options.flag_prefix}-{item.name.replace('_', '-')}"  # type: ignore[attr-defined]
            # Default None: "not given", so that a flag for another method can be refused.
            _add_typed(group, item, field_type, flag, _option_dest(options, item.name), None, _default(item))


def _add_typed(parser: Any, item: Field[Any], field_type: Any, flag: str, dest: str, default: Any,
               show_default: Any) -> None:
    base, choices, optional = field_value_type(field_type)
    help_text = item.metadata.get("help", "")
    help_text = f"{help_text} (default: {show_default})" if help_text else f"default: {show_default}"
    if base is bool:
        parser.add_argument(flag, dest=dest, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        return
    metavar = None if choices else flag.lstrip("-").split("-")[-1].upper()
    parser.add_argument(flag, dest=dest, default=default, type=_converter(base, optional), choices=choices,
                        metavar=metavar, help=help_text)


def _options_classes(entries: list[MethodEntry]) -> list[type]:
    seen: list[type] = []
    for entry in entries:
        if entry.options is not None and entry.options not in seen:
            seen.append(entry.options)
    return seen


def _option_dest(options: type, name: str) -> str:
    return f"{_DEST_PREFIX}{options.__name__}__{name}"


def fisher_config_from_arguments(args: argparse.Namespace, entries: list[MethodEntry]) -> FisherConfig:
    """The `FisherConfig` the flags describe.

    Raises:
        ValueError: an option flag of a method other than `--method` (names the flag and its method).
    """
    values = {item.name: getattr(args, _DEST_PREFIX + item.name) for item, _ in _cli_fields(FisherConfig)}
    chosen = next(entry for entry in entries if entry.name == args.method)
    options = None
    for options_class in _options_classes(entries):
        given = {item.name: getattr(args, _option_dest(options_class, item.name))
                 for item, _ in _cli_fields(options_class)}
        given = {name: value for name, value in given.items() if value is not None}
        if options_class is chosen.options:
            options = options_class(**given)
        elif given:
            flag = f"--{options_class.flag_prefix}-{next(iter(given)).replace('_', '-')}"  # type: ignore[attr-defined]
            raise ValueError(f"{flag} is an option of {[e.name for e in entries if e.options is options_class]}, "
                             f"not of --method {args.method}")
    try:
        return FisherConfig(method=args.method, progress=not args.no_progress, options=options, **values)
    except ValueError as error:
        raise ValueError(_with_flags(str(error))) from None


def _with_flags(message: str) -> str:
    """`message` with each `FisherConfig.<field>` it names spelled as the field's flag (`--batches`,
    not `FisherConfig.num_batches`): on the command line the flag is what the user typed."""
    for item, _ in _cli_fields(FisherConfig):
        message = re.sub(rf"\bFisherConfig\.{item.name}\b", _flag(item), message)
    return message

