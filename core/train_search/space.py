"""The ranges a hyperparameter search draws a trial's training settings from.

A range whose ends are equal (or a single choice) fixes that setting: it is never suggested,
always applied. Never draws anything itself but through an Optuna trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from core.config import Config, option
from core.errors import BadInput

SEARCHED = ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "epochs")


@dataclass(frozen=True)
class SearchSpace(Config):
    """The ranges a search draws from; a range whose ends are equal (or a single choice) fixes that setting.

    Built as asked, however empty a range: SearchConfig refuses what cannot be searched (check_ranges),
    so that a form can hold a space before its settings are checked.
    """

    what = "search space setting"

    learning_rate: tuple[float, float] = option((1e-5, 1e-3), help="learning rate: low, high (drawn on a log scale)")
    lora_r: tuple[int, ...] = option((4, 8, 16), help="LoRA r: the choices, e.g. 4,8,16")
    lora_alpha: tuple[float, ...] = option((8, 16, 32), help="LoRA alpha: the choices, e.g. 8,16,32")
    lora_dropout: tuple[float, float] = option((0.0, 0.1), help="LoRA dropout: low, high, within [0, 1)")
    epochs: tuple[int, int] = option((1, 3), help="epochs: low, high (whole numbers)")

    @classmethod
    def from_dict(cls, values: Any) -> Self:
        """A space from a mapping of ranges; a single value (not a list) is a range of one."""
        if isinstance(values, dict):
            unknown = set(values) - set(SEARCHED)
            if unknown:
                raise BadInput(f"cannot search {', '.join(sorted(unknown))}; searchable: {', '.join(SEARCHED)}")
            values = {k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in values.items()}
        return super().from_dict(values)

    @classmethod
    def parse(cls, text: str) -> SearchSpace:
        """'learning_rate=1e-5,1e-3 lora_r=4,8' -> those ranges, the defaults for the rest."""
        from core.sweep import parse_grid

        return cls.from_dict(parse_grid(text))

    def check_ranges(self) -> None:
        """BadInput (one line) for a range that cannot be searched."""
        for name in ("learning_rate", "lora_dropout", "epochs"):
            if len(getattr(self, name)) != 2:
                raise BadInput(f"{name} range needs two values, low and high; got {list(getattr(self, name))}")
        (lr_low, lr_high), (drop_low, drop_high), (ep_low, ep_high) = self.learning_rate, self.lora_dropout, self.epochs
        checks = [
            (lr_low > 0, f"learning rate must be > 0, got {lr_low}"),
            (lr_low <= lr_high, f"learning rate range is empty: low {lr_low} > high {lr_high}"),
            (bool(self.lora_r), "give at least one LoRA r"),
            (all(int(r) == r and r >= 1 for r in self.lora_r), f"LoRA r must be whole numbers >= 1: {self.lora_r}"),
            (bool(self.lora_alpha), "give at least one LoRA alpha"),
            (all(a > 0 for a in self.lora_alpha), f"LoRA alpha must be > 0: {self.lora_alpha}"),
            (0 <= drop_low < 1 and 0 <= drop_high < 1, f"LoRA dropout must be in [0, 1): {self.lora_dropout}"),
            (drop_low <= drop_high, f"LoRA dropout range is empty: low {drop_low} > high {drop_high}"),
            (int(ep_low) == ep_low and int(ep_high) == ep_high, f"epochs must be whole numbers: {self.epochs}"),
            (ep_low >= 1, f"epochs must be at least 1, got {ep_low}"),
            (ep_low <= ep_high, f"epochs range is empty: low {ep_low} > high {ep_high}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)

    def fixed(self) -> dict[str, Any]:
        """Settings the space does not vary (equal ends, one choice): never suggested, always applied."""
        return {name: _cast(name, values[0]) for name, values in self._values().items() if len(set(values)) == 1}

    def contains(self, name: str, value: Any) -> bool:
        values = self._values()[name]
        if name in ("lora_r", "lora_alpha"):
            return value in values
        return values[0] <= value <= values[1]

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's settings: drawn for what varies, fixed for the rest."""
        chosen = self.fixed()
        for name, values in self._values().items():
            if name in chosen:
                continue
            if name == "learning_rate":
                chosen[name] = trial.suggest_float(name, values[0], values[1], log=True)
            elif name == "lora_dropout":
                chosen[name] = trial.suggest_float(name, values[0], values[1])
            elif name == "epochs":
                chosen[name] = trial.suggest_int(name, int(values[0]), int(values[1]))
            else:
                chosen[name] = _cast(name, trial.suggest_categorical(name, list(values)))
        return chosen

    def _values(self) -> dict[str, tuple]:
        return {name: tuple(getattr(self, name)) for name in SEARCHED}


def _cast(name: str, value: Any) -> Any:
    """JSON brings 8.0 for 8: r and epochs must reach TrainConfig as whole numbers."""
    return int(value) if name in ("lora_r", "epochs") else float(value)


def parse_trials(text: str) -> list[dict[str, Any]]:
    """'learning_rate=2e-4 lora_r=8; learning_rate=1e-4' (or one trial per line) -> a search's first trials."""
    from core.sweep import parse_grid

    trials = [item for line in text.splitlines() for item in line.split(";") if item.strip()]
    return [{name: _cast(name, values[0]) for name, values in parse_grid(trial).items()} for trial in trials]
