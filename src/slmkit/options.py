"""`option()`: a dataclass field that carries its command-line description.

Every settings dataclass (RunConfig's sections, GenerationConfig, FinetuneConfig, SweepOptions)
declares its fields with `option()`, and `slmkit.cli.flags` turns those fields into flags. So a
setting, its default, its `--help` text and its choices are written once, and the CLI and the
Python API cannot disagree. This module imports nothing heavy: library modules and the CLI share it.

Metadata keys (all optional except `help`):
    help      the flag's help text (the default is appended by the CLI, never written here)
    choices   the allowed values (listed by --help and checked by argparse)
    bounds    (low, high) inclusive, for integers; checked by the dataclass's validate()
    cli       False: no flag; a string: the flag's name instead of --kebab-name
    flags     other names of the flag (aliases), e.g. ("--lr",)
    metavar   the flag's placeholder in --help (default: the field name in capitals)
    runtime   True: the shared runtime flag of that name (--device, --dtype, --weights), declared
              once in slmkit.cli.flags.RUNTIME, stands for this field
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(
    default: Any,
    help: str = "",
    *,
    bounds: tuple[int, int] | None = None,
    choices: tuple[Any, ...] | None = None,
    cli: bool | str = True,
    flags: tuple[str, ...] = (),
    metavar: str | None = None,
    runtime: bool = False,
) -> Any:
    """A dataclass field with a default and its command-line description (see the module docstring)."""
    meta: dict[str, Any] = {"help": help}
    # Only the keys given are stored: readers test `metadata.get(key)`, and the metadata of the
    # existing config fields stays exactly what it was.
    extra = {"bounds": bounds, "choices": choices, "flags": flags, "metavar": metavar}
    meta.update({key: value for key, value in extra.items() if value})
    if cli is not True:
        meta["cli"] = cli
    if runtime:
        meta["runtime"] = True
    return field(default=default, metadata=meta)
