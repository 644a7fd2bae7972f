"""Job configs: a dataclass per job, filled from defaults, then a YAML file, then CLI flags.

Each field's ``metadata["help"]`` is its ``--help`` text; ``--some-field`` sets ``some_field``.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A config field with its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


def _field_type(config_cls: type, field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(config_cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def parse_list(text: str) -> list[str]:
    """A list on the command line: comma-separated items, spaces around them dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _argument_type(kind: type):
    if kind is bool:
        return _parse_bool
    if typing.get_origin(kind) is list:
        return parse_list
    return kind


def build_parser(config_cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--config`` and one flag per field of the dataclass
    ``config_cls``, each defaulting to unset so that only the flags given override the YAML."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file of settings; command-line flags override it")
    for field in dataclasses.fields(config_cls):
        kind = _field_type(config_cls, field)
        # A switch alone turns it on (--dry-run); with a value it is that value (--dry-run false).
        switch = {"nargs": "?", "const": True} if kind is bool else {}
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=_argument_type(kind),
            default=argparse.SUPPRESS,
            help=f"{field.metadata.get('help', '')} (default: {field.default})",
            **switch,
        )
    return parser


def load_config(config_cls: type[ConfigT], argv: Sequence[str] | None, prog: str, description: str) -> ConfigT:
    """The config for a job: dataclass defaults < ``--config`` YAML < command-line flags."""
    parser = build_parser(config_cls, prog, description)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        values.update(read_yaml(config_path, config_cls))
    values.update(args)
    return config_cls(**values)


def read_yaml(path: Path, config_cls: type) -> dict[str, Any]:
    """The settings in YAML file ``path``; unknown keys are an error that names them."""
    if not Path(path).exists():
        raise SystemExit(f"config file {path} does not exist")
    loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    known = {field.name for field in dataclasses.fields(config_cls)}
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise SystemExit(f"config file {path}: unknown settings {unknown}; known: {sorted(known)}")
    return loaded
