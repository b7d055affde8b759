"""Search spaces: `--grid name=v1,v2` and `--param name=lo:hi | log:lo:hi | v1,v2` specs, checked
against the config dataclasses before any trial starts."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from slmkit.config import RunConfig, find_section, set_field, show
from slmkit.errors import UserError

# A grid is expanded (and every cell checked) in memory before anything runs.
MAX_GRID_CELLS = 100_000

# Settings a sweep cannot vary: they change the data (and so the tokenizer) or the hardware.
NOT_SWEEPABLE = {"device", "dtype", "compile", "sample_tokens", "checkpoint_interval", "log_interval", "vocab_size",
                 "final_eval"}
# Hyperparameters whose plots use a log axis even when given as a list.
LOG_SCALE_NAMES = ("learning_rate", "min_lr", "weight_decay")


@dataclass
class Param:
    """One varied hyperparameter: a list of choices, or an int / float range (optionally log)."""

    name: str
    section: str
    kind: str  # "choice", "int" or "float"
    values: list[Any] = field(default_factory=list)
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Param:
        """A parameter read back from sweep.json, checked (a one-line UserError if malformed)."""
        if not isinstance(d, dict):
            raise UserError(f"a parameter must be a JSON object, got {show(d)}")
        known = {f.name for f in fields(cls)}
        if not {"name", "section", "kind"} <= d.keys() or not d.keys() <= known:
            raise UserError(f"a parameter needs name, section and kind (and only {', '.join(sorted(known))})")
        p = cls(**d)
        p.check()
        return p

    def check(self) -> None:
        if not isinstance(self.name, str) or find_section(self.name) != self.section:
            raise UserError(f"parameter {show(self.name)} is not a setting of section {show(self.section)}")
        if self.kind == "choice":
            ok = isinstance(self.values, list) and self.values and all(_is_choice(v) for v in self.values)
            if not ok:
                raise UserError(f"parameter {self.name}: values must be a non-empty list of numbers, strings or "
                                f"booleans, got {show(self.values)}")
            return
        if self.kind not in ("int", "float") or not isinstance(self.log, bool):
            raise UserError(f"parameter {self.name}: kind must be choice, int or float, got {show(self.kind)}")
        if not (_is_number(self.low) and _is_number(self.high) and self.low < self.high):
            raise UserError(f"parameter {self.name}: needs numbers low < high, got {show(self.low)}, {show(self.high)}")
        if self.log and self.low <= 0:
            raise UserError(f"parameter {self.name}: a log range needs low > 0")

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.values)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    @property
    def log_axis(self) -> bool:
        return self.log or self.name in LOG_SCALE_NAMES

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(map(str, self.values))}}}"
        return f"{self.name} in [{self.low}, {self.high}]{' (log)' if self.log else ''}"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_choice(v: Any) -> bool:
    return isinstance(v, str | bool) or _is_number(v)


def _field_type(section: str, name: str) -> str:
    from dataclasses import fields

    from slmkit.config import SECTIONS

    return next(f.type for f in fields(SECTIONS[section]) if f.name == name)


def _coerce(base: RunConfig, section: str, name: str, raw: str, flag: str) -> Any:
    scratch = copy.deepcopy(getattr(base, section))
    set_field(scratch, name, raw.strip(), flag)
    return getattr(scratch, name)


def parse_param(spec: str, base: RunConfig, flag: str = "--grid", ranges: bool = False) -> Param:
    """`name=v1,v2,...`; with ranges=True also `name=lo:hi` and `name=log:lo:hi`."""
    if "=" not in spec:
        raise UserError(f"{flag} {spec!r}: expected NAME=VALUES, for example {flag} \"n_layer=2,4,6\"")
    name, _, body = spec.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    section = find_section(name)  # unknown names: a clear error
    if section == "data" or name in NOT_SWEEPABLE:
        raise UserError(f"{flag}: {name!r} cannot be swept (it changes the data or the hardware, not the model)")
    body = body.strip()
    if not body:
        raise UserError(f"{flag} {spec!r}: no values given")
    kind = _field_type(section, name)
    if ":" in body:
        if not ranges:
            raise UserError(f"{flag} {spec!r}: a grid takes a list of values (a,b,c); ranges go in --param "
                            "with --random N or --search tpe")
        parts = body.split(":")
        log = parts[0].strip().lower() == "log"
        if log:
            parts = parts[1:]
        if len(parts) != 2 or kind not in ("int", "float"):
            raise UserError(f"{flag} {spec!r}: a range is LOW:HIGH or log:LOW:HIGH over a numeric setting")
        low, high = (_coerce(base, section, name, p, f"{flag} {name}") for p in parts)
        if not low < high:
            raise UserError(f"{flag} {spec!r}: LOW must be below HIGH")
        if log and low <= 0:
            raise UserError(f"{flag} {spec!r}: a log range needs LOW > 0")
        return Param(name, section, kind, low=low, high=high, log=log)
    raw_values = [v for v in body.split(",") if v.strip()]
    values = [_coerce(base, section, name, v, f"{flag} {name}") for v in raw_values]
    if len(set(values)) != len(values):
        raise UserError(f"{flag} {spec!r}: repeated values")
    return Param(name, section, "choice", values=values)


def parse_space(specs: list[str], base: RunConfig, flag: str, ranges: bool) -> list[Param]:
    params = [parse_param(s, base, flag, ranges) for s in specs]
    names = [p.name for p in params]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{flag}: {', '.join(dup)} given more than once")
    return params


def apply_params(base: RunConfig, params: list[Param], values: dict[str, Any]) -> RunConfig:
    cfg = copy.deepcopy(base)
    for p in params:
        set_field(getattr(cfg, p.section), p.name, values[p.name], "sweep")
    return cfg


def check_cell(base: RunConfig, params: list[Param], values: dict[str, Any]) -> str | None:
    """None when the configuration is valid, else the reason."""
    try:
        apply_params(base, params, values).validate()
    except UserError as exc:
        return str(exc)
    return None


def format_cell(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def expand_grid(params: list[Param]) -> list[dict[str, Any]]:
    """Every combination, the first parameter varying slowest."""
    size = math.prod(len(p.values) for p in params)
    if size > MAX_GRID_CELLS:
        raise UserError(f"the grid has {size:,} cells; at most {MAX_GRID_CELLS:,} (use --random or --search)")
    return [dict(zip([p.name for p in params], combo, strict=True))
            for combo in itertools.product(*(p.values for p in params))]


def valid_grid(base: RunConfig, params: list[Param], skip_invalid: bool) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(valid cells, skipped (cell, reason)); invalid cells are an error unless skip_invalid."""
    cells = expand_grid(params)
    invalid = [(c, why) for c in cells if (why := check_cell(base, params, c)) is not None]
    if invalid and not skip_invalid:
        listed = "; ".join(f"{format_cell(c)} ({why})" for c, why in invalid[:4])
        more = f"; and {len(invalid) - 4} more" if len(invalid) > 4 else ""
        raise UserError(f"{len(invalid)} of {len(cells)} grid cells are invalid: {listed}{more}; "
                        "pass --skip-invalid to skip them")
    bad = [c for c, _ in invalid]
    valid = [c for c in cells if c not in bad]
    if not valid:
        raise UserError(f"all {len(cells)} grid cells are invalid: {invalid[0][1]}")
    return valid, invalid
