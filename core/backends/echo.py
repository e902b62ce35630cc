"""A backend with no model: answers echo the prompt, word by word.

For fast tests of everything around generation (jobs, sweeps, pages) and for demos of the
plumbing; `delay` (seconds per answer) makes a job slow enough to watch or to kill.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from core.backends.base import cut_at_stop
from core.decoding import DecodingParams


class EchoBackend:
    name = "echo"

    def __init__(self, model: str = "echo", delay: float = 0.0) -> None:
        self.model = model
        self.delay = float(delay)
        self.completion_tokens = 0

    def _answer(self, prompt: str, params: DecodingParams, stop: Sequence[str]) -> list[str]:
        words = f"You asked: {prompt}".split()[: params.max_tokens]
        return cut_at_stop(" ".join(words), stop).split()

    def generate(
        self,
        prompts: Sequence[str],
        params: DecodingParams,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,  # an echo follows no schema
    ) -> list[str]:
        return ["".join(self.stream(p, params, stop)) for p in prompts]

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        words = self._answer(prompt, params, stop)
        time.sleep(self.delay)
        for i, word in enumerate(words):
            self.completion_tokens += 1
            yield word if i == 0 else " " + word

    def models(self) -> list[str]:
        return [self.model]
