"""The one mechanism between settings dataclasses and flags, and the `--help` formatting.

Every field declared with `slmkit.options.option()` becomes one flag: `--kebab-name` (or its `cli`
name) plus its aliases, its help with the dataclass default appended once, its choices listed. The
flag's own default is None, so `given()` reads back only what the command line said and the dataclass
fills in the rest: each default is written once, in the dataclass, for the CLI and the Python API.

RunConfig's sections (`add_config_flags`), GenerationConfig, FinetuneConfig and SweepOptions all go
through `add_dataclass_flags`; `--device`, `--dtype`, `--compile` and `--weights` are the fields of
the settings they belong to, added to any command by `add_runtime_flags`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any

from slmkit.config import SECTIONS, TrainConfig

# ----------------------------------------------------------------------------- parser and help


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default, once: added as "(default: X)" unless its help already states one, and
    never for an option without a default to show (None, an empty string, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == "" or default is argparse.SUPPRESS
        if nothing or not action.option_strings or "(default" in text or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """`slm` and its subcommands (subparsers are made with the parent's class), all with HelpFormatter.

    A subcommand may be given `build`, the function that adds its flags: it runs when that subcommand
    is parsed or its help printed, not before. So `slm --help` and `slm train` never import what
    another command's flags need (torch, for the generation and fine-tuning settings)."""

    def __init__(self, *args: Any, build: Callable[[Parser], None] | None = None, **kwargs: Any) -> None:
        if kwargs.get("formatter_class") in (None, argparse.ArgumentDefaultsHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)
        self._build = build

    def built(self) -> Parser:
        """This parser with its flags added (once)."""
        build, self._build = self._build, None
        if build is not None:
            build(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        self.built()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.built()
        return super().format_usage()

    def format_help(self) -> str:
        self.built()
        return super().format_help()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, Parser]:
    """Each subcommand's parser by name, with its flags added (for tests and tooling)."""
    found: dict[str, Parser] = {}
    for action in parser._actions:  # argparse keeps its subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            found.update({name: p.built() for name, p in action.choices.items()})
    return found


# ----------------------------------------------------------------------------- dataclass fields -> flags


_KINDS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def _kind(f: Field) -> tuple[type, bool]:
    """(value type, repeatable) of a field annotated int, float, str, bool, `X | None` or `tuple[X, ...]`
    (annotations are strings here: the dataclass modules use `from __future__ import annotations`)."""
    name = str(f.type).replace("builtins.", "").removesuffix(" | None")
    if name.startswith("tuple[") and name.endswith(", ...]"):
        return _KINDS[name[len("tuple["):-len(", ...]")]], True
    return _KINDS[name], False


def is_flag(f: Field) -> bool:
    """Whether a field is a command-line setting at all (`cli=False` fields are not)."""
    return f.metadata.get("cli", True) is not False


def flag_names(f: Field) -> list[str]:
    """The field's flag, then its aliases."""
    cli = f.metadata.get("cli", True)
    first = cli if isinstance(cli, str) else "--" + f.name.replace("_", "-")
    return [first, *f.metadata.get("flags", ())]


def field_help(f: Field) -> str:
    """The field's help with its default appended: the flag's own default is None, so argparse cannot."""
    return f.metadata.get("help", "") + _default_note(f.default)


def _default_note(default: Any) -> str:
    """' (default: X)' for help text; nothing for an empty default (it would read "(default: )")."""
    if default is MISSING or default is None or default == "" or default == ():
        return ""
    return f" (default: {default})".replace("%", "%%")


def add_field_flag(group: Any, f: Field, dest: str) -> argparse.Action:
    """One flag for one field; a bool gets --name and --no-name, a tuple a repeatable flag."""
    kind, repeatable = _kind(f)
    names, help_text = flag_names(f), field_help(f)
    if kind is bool:
        return group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                  help=help_text)
    choices = f.metadata.get("choices")
    metavar = None if choices else f.metadata.get("metavar", f.name.upper())
    return group.add_argument(*names, dest=dest, type=kind, default=None, choices=choices, metavar=metavar,
                              action="append" if repeatable else "store", help=help_text)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, section: str, title: str | None = None) -> None:
    """A flag per field of `cls` (dest `section.field`), in an argument group when `title` is given.

    Runtime fields (device, dtype, weights) are left to add_runtime_flags, which declares them once."""
    group = parser.add_argument_group(title) if title else parser
    for f in fields(cls):
        if is_flag(f) and not f.metadata.get("runtime"):
            add_field_flag(group, f, f"{section}.{f.name}")


def given(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The settings of `section` that the command line gave; the flags left out are absent."""
    prefix = section + "."
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith(prefix) and value is not None:
            out[key[len(prefix):]] = tuple(value) if isinstance(value, list) else value
    return out


# ----------------------------------------------------------------------------- RunConfig sections


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """The model, data and train settings; unset flags stay None so they override no preset or file."""
    for section in sections:
        add_dataclass_flags(parser, SECTIONS[section], section, f"{section} settings")


def config_flags(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """`{section: {name: value}}` of the RunConfig settings given on the command line."""
    return {section: values for section in SECTIONS if (values := given(args, section))}


# ----------------------------------------------------------------------------- runtime flags


def runtime_field(name: str) -> Field:
    """The one declaration of a runtime flag: --device, --dtype and --compile are TrainConfig's fields,
    --weights is GenerationConfig's (how a model's weights are held for generating and scoring)."""
    owner: type = TrainConfig
    if name == "weights":
        from slmkit.generate import GenerationConfig  # imports torch: only model-loading commands ask

        owner = GenerationConfig
    return next(f for f in fields(owner) if f.name == name)


def add_runtime_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """--device, --dtype, ... for a command that is not `train` (whose TrainConfig flags include them)."""
    for name in names:
        add_field_flag(parser, runtime_field(name), name)


def runtime(args: argparse.Namespace, name: str) -> Any:
    """A runtime flag's value, or its declared default when it was not given."""
    value = getattr(args, name)
    return runtime_field(name).default if value is None else value
