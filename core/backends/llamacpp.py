"""The embedded llama.cpp engine (llama-cpp-python) on a GGUF file, optionally with a LoRA adapter.

The same engine and sampler as Ollama, so a sweep here behaves like a sweep there. The
model stays loaded for the life of the backend (a sweep loads it once). Building the
sampler arguments is a pure function, apart from the engine.

Answers to lists of prompts come from core.backends.llamacpp_batch's `BatchedEngine`, `parallel` sequences
decoded together (1: one at a time, the same answers as llama-cpp-python's `create_completion`); a
streamed answer (the Playground) from `Llama.create_completion` itself.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from core import engine, models
from core.backends.base import Answer, Request, visible_pieces
from core.backends.llamacpp_batch import BatchedEngine
from core.decoding import DecodingParams
from core.errors import BackendUnavailable


def completion_kwargs(params: DecodingParams, stop: Sequence[str] = ()) -> dict[str, Any]:
    """llama.cpp's names for our decoding parameters; no seed means a fresh one per call."""
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "repeat_penalty": params.repeat_penalty,
        "seed": params.seed if params.seed is not None else random.randrange(2**31),
        "stop": list(stop) or None,
    }


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(
        self,
        model: str | None = None,
        lora_path: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        parallel: int = 1,
    ) -> None:
        self.model_path = models.resolve_generator(model, "llamacpp")
        self.lora_path = lora_path or None
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.parallel = parallel
        self._batched = BatchedEngine(self.model_path, self.lora_path, parallel, seq_ctx=n_ctx, n_threads=n_threads)
        self._streamed_tokens = 0
        self._llm: Any = None
        # One llama.cpp context is not safe to use from two threads at once.
        self._lock = threading.Lock()

    @property
    def llm(self) -> Any:
        if self._llm is None:
            try:
                with engine.load_guard():
                    from llama_cpp import Llama

                    self._llm = Llama(
                        model_path=self.model_path,
                        lora_path=self.lora_path,
                        n_ctx=self.n_ctx,
                        n_threads=self.n_threads,
                        verbose=False,
                    )
            except (ValueError, RuntimeError, OSError) as exc:
                raise BackendUnavailable(f"llama.cpp could not load {self.model_path}: {exc}") from None
        return self._llm

    @property
    def completion_tokens(self) -> int:
        return self._batched.completion_tokens + self._streamed_tokens

    @property
    def mode(self) -> str:
        """How lists of prompts are decoded, as runs record it."""
        return f"batched x{self.parallel}" if self.parallel > 1 else "single-stream"

    def load(self) -> None:
        """Load the model for lists of prompts now (it otherwise loads at the first answer)."""
        self._batched.load()

    def count_tokens(self, text: str) -> int:
        return self._batched.count_tokens(text)

    def _forget_previous_prompt(self) -> None:
        """Evaluate every prompt whole, so that an answer never depends on the question asked before it.

        llama-cpp-python reuses the cached tokens a prompt shares with the previous one and evaluates only
        the rest; on AVX2 CPUs the repacked Q4_K kernels of a whole prompt and of its short remainder round
        differently, and greedy answers to the same question diverged after ~10 tokens depending on what was
        asked before (measured here on the starter questions). The shared prefix is a few template tokens.
        """
        self.llm.reset()

    def answers(self, requests: Sequence[Request], stop: Sequence[str] = ()) -> Iterator[Answer]:
        """Each request's answer as soon as it is done (not in order); requests may differ in parameters."""
        with self._lock:
            yield from self._batched.answers(requests, stop)

    def generate(
        self,
        prompts: Sequence[str],
        params: DecodingParams,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,
    ) -> list[str]:
        texts = [""] * len(prompts)
        for answer in self.answers([Request(p, params, schema) for p in prompts], stop):
            texts[answer.index] = answer.text
        return texts

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        with self._lock:
            self._forget_previous_prompt()
            chunks = self.llm.create_completion(prompt, stream=True, **completion_kwargs(params, stop))
            for piece in visible_pieces((c["choices"][0]["text"] for c in chunks), stop):
                self._streamed_tokens += 1
                yield piece

    def models(self) -> list[str]:
        return [self.model_path]
