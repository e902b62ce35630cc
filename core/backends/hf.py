"""A Hugging Face transformers model, optionally with a PEFT adapter; batched generation.

Used for fine-tuned adapters and base-vs-adapter comparisons. Prompts are left-padded so
a batch generates together. Weights load only from safetensors, never with remote code.
transformers has no JSON-schema constraint of its own: a `schema` is not enforced, and an answer
asked for as JSON is read by its caller as it comes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from core import models
from core.backends.base import cut_at_stop, visible_pieces
from core.decoding import DecodingParams
from core.errors import BackendUnavailable


def generate_kwargs(params: DecodingParams, pad_token_id: int) -> dict[str, Any]:
    """transformers' names for our decoding parameters; temperature 0 means greedy."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "repetition_penalty": params.repeat_penalty,
        "pad_token_id": pad_token_id,
        "do_sample": not params.greedy,
    }
    if not params.greedy:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    else:
        # Unset the sampling knobs a checkpoint's generation_config may carry, so greedy is greedy.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


class TransformersBackend:
    name = "transformers"

    def __init__(
        self, model: str | None = None, adapter: str | None = None, batch_size: int = 16, device: str | None = None
    ) -> None:
        self.model_name = models.resolve_generator(model, "transformers")
        self.adapter = adapter or None
        self.batch_size = batch_size
        self.device = device
        self.completion_tokens = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            tokenizer = AutoTokenizer.from_pretrained(self.model_name, trust_remote_code=False)
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            # Any: transformers' stubs type .to() as unbound and a PeftModel as no PreTrainedModel.
            model: Any = AutoModelForCausalLM.from_pretrained(
                self.model_name,
                trust_remote_code=False,
                use_safetensors=True,
                dtype=torch.bfloat16 if device == "cuda" else torch.float32,
            )
            if self.adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, self.adapter)
            self._model, self._tokenizer, self.device = model.to(device).eval(), tokenizer, device
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BackendUnavailable(f"transformers could not load {self.model_name}: {reason}") from None

    def generate(
        self,
        prompts: Sequence[str],
        params: DecodingParams,
        stop: Sequence[str] = (),
        schema: Mapping[str, Any] | None = None,
    ) -> list[str]:
        import torch

        self._load()
        answers: list[str] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                batch = list(prompts[start : start + self.batch_size])
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                enc = self._tokenizer(batch, return_tensors="pt", padding=True).to(self.device)
                kwargs = generate_kwargs(params, self._tokenizer.pad_token_id)
                if stop:
                    kwargs.update(stop_strings=list(stop), tokenizer=self._tokenizer)
                out = self._model.generate(**enc, **kwargs)
                new = out[:, enc["input_ids"].shape[1] :]
                self.completion_tokens += int((new != self._tokenizer.pad_token_id).sum())
                for text in self._tokenizer.batch_decode(new, skip_special_tokens=True):
                    answers.append(cut_at_stop(text, stop).strip())
        return answers

    def stream(self, prompt: str, params: DecodingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        self._load()
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        enc = self._tokenizer([prompt], return_tensors="pt").to(self.device)
        kwargs = generate_kwargs(params, self._tokenizer.pad_token_id)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self._tokenizer)

        def work() -> None:
            with self._lock, torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                self._model.generate(**enc, **kwargs, streamer=streamer)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        for piece in visible_pieces(iter(streamer), stop):
            self.completion_tokens += 1
            yield piece
        worker.join()

    def models(self) -> list[str]:
        return [self.model_name]
