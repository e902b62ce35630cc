"""One convention for every configuration dataclass: `option` fields, a strict `from_dict`, `check` on construction.

A field's metadata (help text, choices, range) is the single description of a setting: the CLI builds
its flags from it (`workbench.cli`), the pages build their widgets from it (`workbench.forms`), and
`Config.check` enforces it, so a flag, a form and a saved JSON file cannot disagree.

A configuration is a frozen dataclass deriving from `Config`:

    @dataclass(frozen=True)
    class SweepConfig(Config):
        what = "sweep setting"
        mode: str = option("product", help="...", choices=MODES)

`check()` runs on construction: the generic rules (types, choices, range) first, then the class's own
(`_check`, which raises BadInput with one line). `from_dict` is strict: an unknown key is refused with
the allowed ones named, a nested configuration is built from its mapping, a tuple from a list.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Self

from core.errors import BadInput


def option(
    default: Any = MISSING,
    *,
    help: str,
    choices: tuple | None = None,
    min: float | None = None,
    max: float | None = None,
    flag: str | None = None,
    cli: bool = True,
) -> Any:
    """A configuration field. `flag` names its CLI flag when it is not --field-name; `cli=False` keeps it off the CLI
    (set by the workbench itself, e.g. a search's split id). A list, dict or Config default is copied per instance."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "flag": flag, "cli": cli}
    if isinstance(default, list | dict | set | Config):
        return field(default_factory=functools.partial(_copy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _copy(value: Any) -> Any:
    return value if isinstance(value, Config) else type(value)(value)


@dataclass(frozen=True)
class FieldSpec:
    """What the CLI and the forms need to know about one field."""

    name: str
    kind: type  # int, float, bool, str, tuple, list, dict or a Config subclass
    optional: bool  # None is allowed
    default: Any  # MISSING for a required field
    help: str
    choices: tuple | None
    min: float | None
    max: float | None
    flag: str
    cli: bool

    @property
    def required(self) -> bool:
        return self.default is MISSING


class Config:
    """Base of the workbench's configuration dataclasses (see the module docstring)."""

    what: ClassVar[str] = "setting"  # names the settings in messages: "unknown training setting(s): ..."

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """BadInput (one line) for a value its field's type, choices or range refuse, then for the class's own rules."""
        for spec in specs(type(self)):
            _check_value(spec, getattr(self, spec.name))
        self._check()

    def _check(self) -> None:
        """The rules a field's metadata cannot say (a relation between fields, a template's placeholder)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, values: Any) -> Self:
        """The configuration a mapping (a saved JSON file, a job's params, a form) describes; strict about keys."""
        if not isinstance(values, dict):
            raise BadInput(f"a {cls.what} mapping is needed, got {type(values).__name__}")
        known = {spec.name: spec for spec in specs(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise BadInput(f"unknown {cls.what}(s): {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**{name: _coerce(known[name], value) for name, value in values.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return list(value)
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


# specs() per class, computed once. A plain dict, not functools.cache: mypy cannot see that a class is hashable.
_SPECS: dict[type, tuple[FieldSpec, ...]] = {}


def specs(cls: type) -> tuple[FieldSpec, ...]:
    """The fields of a configuration class, with their resolved types and metadata."""
    if cls in _SPECS:
        return _SPECS[cls]
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kind, optional = _kind(hints[f.name])
        meta = f.metadata
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else MISSING)
        )
        out.append(
            FieldSpec(
                name=f.name,
                kind=kind,
                optional=optional,
                default=default,
                help=meta.get("help", ""),
                choices=meta.get("choices"),
                min=meta.get("min"),
                max=meta.get("max"),
                flag=meta.get("flag") or "--" + f.name.replace("_", "-"),
                cli=meta.get("cli", True),
            )
        )
    _SPECS[cls] = tuple(out)
    return _SPECS[cls]


def spec(cls: type, name: str) -> FieldSpec:
    return next(s for s in specs(cls) if s.name == name)


def _kind(hint: Any) -> tuple[type, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _kind(rest[0])[0], len(rest) < len(args)
    return typing.get_origin(hint) or hint, False


def _coerce(spec: FieldSpec, value: Any) -> Any:
    """What JSON and text bring, as the field's type: '' or None for an optional field is None, 8.0 for an int is 8."""
    if value is None or (value == "" and spec.kind is not str):
        return None if spec.optional or spec.default is MISSING else spec.default
    if isinstance(spec.kind, type) and issubclass(spec.kind, Config):
        return spec.kind.from_dict(value) if isinstance(value, dict) else value
    if spec.kind is tuple:
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if spec.kind in (int, float) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadInput(f"{spec.name} must be a number, got {value!r}") from None
    if spec.kind is int and isinstance(value, float) and value == int(value):
        return int(value)
    return value


def _check_value(spec: FieldSpec, value: Any) -> None:
    if value is None:
        if not spec.optional:
            raise BadInput(f"{spec.name} must be given")
        return
    if spec.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadInput(f"{spec.name} must be a number, got {value!r}")
        if spec.kind is int and int(value) != value:
            raise BadInput(f"{spec.name} must be a whole number, got {value!r}")
        lo, hi = spec.min, spec.max
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if lo is not None and hi is not None:
                raise BadInput(f"{spec.name}={value} is outside {lo}..{hi}")
            raise BadInput(
                f"{spec.name} must be {'at least' if hi is None else 'at most'} {lo if hi is None else hi}, got {value}"
            )
    elif spec.kind is bool and not isinstance(value, bool):
        raise BadInput(f"{spec.name} must be true or false, got {value!r}")
    elif spec.kind is str and not isinstance(value, str):
        raise BadInput(f"{spec.name} must be text, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise BadInput(f"{spec.name} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
