"""Decoding parameters: one dataclass shared by every backend, the CLI and the pages.

Field metadata carries the help text and the range, so flags and sliders cannot drift.
Never engine-specific: each backend maps these fields to its own names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from core.errors import BadInput


def _param(default: Any, help: str, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "min": lo, "max": hi})


@dataclass(frozen=True)
class DecodingParams:
    temperature: float = _param(0.7, "Sampling temperature; 0 means greedy decoding.", 0.0, 2.0)
    top_p: float = _param(
        0.9, "Nucleus sampling: keep the smallest token set whose probability reaches top_p.", 0.0, 1.0
    )
    top_k: int = _param(40, "Keep only the k most likely tokens; 0 disables the limit.", 0, 1000)
    max_tokens: int = _param(128, "Maximum number of tokens to generate (Ollama's num_predict).", 1, 4096)
    repeat_penalty: float = _param(1.1, "Penalty for repeating recent tokens; 1.0 disables it.", 0.5, 2.0)
    seed: int | None = _param(None, "Random seed for sampling; empty means a fresh seed each call.")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            lo, hi = f.metadata["min"], f.metadata["max"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadInput(f"{f.name} must be a number, got {value!r}")
            if f.type in ("int", "int | None") and int(value) != value:
                raise BadInput(f"{f.name} must be a whole number, got {value!r}")
            if lo is not None and value < lo or hi is not None and value > hi:
                raise BadInput(f"{f.name}={value} is outside {lo}..{hi}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecodingParams:
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise BadInput(f"unknown decoding parameter(s): {', '.join(sorted(unknown))}")
        cast: dict[str, Any] = {}
        for name, value in values.items():
            if value is None or value == "":
                cast[name] = None if name == "seed" else known[name].default
                continue
            try:
                cast[name] = int(value) if known[name].type in ("int", "int | None") else float(value)
            except (TypeError, ValueError):
                raise BadInput(f"{name} must be a number, got {value!r}") from None
        return cls(**cast)


# Parameters that take whole numbers (the rest are floats).
INT_PARAMS = tuple(f.name for f in fields(DecodingParams) if f.type in ("int", "int | None"))


def field_help(cls: type, name: str) -> str:
    """The help text of a configuration dataclass field, shared by CLI flags and form widgets."""
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def field_range(cls: type, name: str) -> tuple[float | None, float | None]:
    f = next(f for f in fields(cls) if f.name == name)
    return f.metadata.get("min"), f.metadata.get("max")
