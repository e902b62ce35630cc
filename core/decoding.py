"""Decoding parameters: one dataclass shared by every backend, the CLI and the pages.

Field metadata (core.config's `option`) carries the help text and the range, so flags and sliders
cannot drift. Never engine-specific: each backend maps these fields to its own names.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import Config, option, specs


@dataclass(frozen=True)
class DecodingParams(Config):
    what = "decoding parameter"

    temperature: float = option(0.7, help="Sampling temperature; 0 means greedy decoding.", min=0.0, max=2.0)
    top_p: float = option(
        0.9, help="Nucleus sampling: keep the smallest token set whose probability reaches top_p.", min=0.0, max=1.0
    )
    top_k: int = option(40, help="Keep only the k most likely tokens; 0 disables the limit.", min=0, max=1000)
    max_tokens: int = option(128, help="Maximum number of tokens to generate (Ollama's num_predict).", min=1, max=4096)
    repeat_penalty: float = option(1.1, help="Penalty for repeating recent tokens; 1.0 disables it.", min=0.5, max=2.0)
    seed: int | None = option(None, help="Random seed for sampling; empty means a fresh seed each call.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# Parameters that take whole numbers (the rest are floats).
INT_PARAMS = tuple(s.name for s in specs(DecodingParams) if s.kind is int)
