"""Many answers at once from one llama.cpp context: continuous batching over llama-cpp-python's low-level API.

On a CPU, decoding one sequence reads every weight once per token, so it is bound by memory bandwidth;
one `llama_decode` over N sequences reads them once for all N. `BatchedEngine.answers` keeps up to
`parallel` sequences in flight, each with its own sampler chain (its configuration's temperature, top_p,
top_k, repeat penalty and seed), and gives a finished sequence's slot to the next request at once.

Requests asking the same prompt (a sweep asks every question under every configuration and repeat) have
it evaluated once. Those admitted together put each prompt token in the batch with the seq_ids of all of
them (one cell of the unified KV cache shared by all), the way llama.cpp's `batched` example shares a
prompt; one admitted later, while a sequence of its prompt is still answering, has that sequence's prompt
cells copied to it (`llama_memory_seq_cp`, which in a unified cache only adds its seq_id to the cells)
and reads just the prompt's last token, whose logits it needs.

Sampling follows llama-cpp-python's `create_completion` step for step (core.backends.llamacpp's single
stream): the same chain (penalties over the last 64 tokens, then greedy, or top_k, typical 1.0, top_p,
min_p 0.05, temperature, dist(seed)), prompt tokens not fed to the penalties, end at an end-of-generation
token, at a stop string or after max_tokens, an answer at most `seq_ctx` tokens with its prompt. The
answers are not bit-identical to the single stream's: a batch of N rows is computed with other kernels'
rounding than one row, and a greedy answer near a tie can take the other branch (the sweep benchmark
measures how often, and the F1 shift).
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from core import engine
from core.backends.base import Answer, Request, cut_at_stop
from core.decoding import DecodingParams
from core.errors import BackendError, BackendUnavailable, BadInput

PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size default, which create_completion samples with
MIN_P = 0.05  # create_completion's defaults for what DecodingParams does not carry
TYPICAL_P = 1.0
N_BATCH = 512  # tokens per llama_decode call, llama-cpp-python's default
CTX_ROUND = 256


def sampler_chain(params: DecodingParams, seed: int, n_vocab: int, model: Any = None, grammar: Any = None) -> Any:
    """The chain llama-cpp-python's create_completion builds for these parameters (Llama._init_sampler); a
    grammar (a `LlamaGrammar` of the answer's JSON schema, with the `model` it is read against) goes where
    create_completion puts one, after the penalties."""
    from llama_cpp import _internals

    chain = _internals.LlamaSampler()
    chain.add_penalties(
        n_vocab=n_vocab,
        penalty_last_n=PENALTY_LAST_N,
        penalty_repeat=params.repeat_penalty,
        penalty_freq=0.0,
        penalty_present=0.0,
    )
    if grammar is not None:
        chain.add_grammar(model, grammar)
    if params.greedy:
        chain.add_greedy()
    else:
        chain.add_top_k(params.top_k)
        chain.add_typical(TYPICAL_P, 1)
        chain.add_top_p(params.top_p, 1)
        chain.add_min_p(MIN_P, 1)
        chain.add_temp(params.temperature)
        chain.add_dist(seed)
    return chain


class _Samplers:
    """Samples every answering sequence's next token, the sequences spread over the cores.

    Each sample is `llama_sampler_sample`'s work done in two parts: the logits rows are fetched here, on one
    thread (the first fetch after a decode may reorder the context's outputs), then each chain is applied to
    its own candidate array (all n_vocab tokens, as llama_sampler_sample builds it) and accepts its token on a
    worker thread; ctypes lets go of the GIL in both calls. With 262,144 tokens in Gemma's vocabulary a sample
    takes about a millisecond, a tenth of a 16-sequence decoding step when done one after the other.
    """

    def __init__(self, n_vocab: int, threads: int) -> None:
        import concurrent.futures

        import numpy as np

        self.n_vocab = n_vocab
        self._fresh = np.zeros(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        self._fresh["id"] = np.arange(n_vocab)  # what each sample starts from, its logits then written in
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sampler")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _candidates(self) -> tuple[Any, Any]:
        """This thread's candidate array (llama_token_data's layout) and its header, made once per thread."""
        import llama_cpp
        import numpy as np

        if not hasattr(self._local, "data"):
            self._local.data = np.empty_like(self._fresh)
            self._local.header = llama_cpp.llama_token_data_array()
        return self._local.data, self._local.header

    def _sample(self, sampler: Any, logits: Any) -> int:
        import llama_cpp
        import numpy as np

        data, header = self._candidates()
        data.view(np.uint8)[:] = self._fresh.view(np.uint8)  # bytes: numpy copies a record array field by field
        data["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        header.data = data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))  # a sampler may move it
        header.size, header.selected, header.sorted = self.n_vocab, -1, False
        llama_cpp.llama_sampler_apply(sampler.sampler, ctypes.byref(header))
        if not 0 <= header.selected < header.size:
            raise BackendError("llama.cpp's sampler chain selected no token")
        token = int(header.data[header.selected].id)
        llama_cpp.llama_sampler_accept(sampler.sampler, token)
        return token

    def sample(self, ctx: Any, sequences: Sequence[_Sequence]) -> list[int]:
        import llama_cpp

        rows = [llama_cpp.llama_get_logits_ith(ctx.ctx, seq.logit_row) for seq in sequences]
        if len(sequences) == 1:
            return [self._sample(sequences[0].sampler, rows[0])]
        return list(self._pool.map(self._sample, [seq.sampler for seq in sequences], rows))


@dataclass
class _Sequence:
    """One request in flight in a slot (its seq_id)."""

    index: int
    seq_id: int
    max_tokens: int
    stop: Sequence[str]
    sampler: Any
    started: float
    pos: int = 0  # the position its next token takes
    logit_row: int = -1  # its row in the last decode's logits, -1 while its prompt is being read
    generated: list[int] = field(default_factory=list)
    text: bytes = b""


@dataclass
class _Prompt:
    """A prompt being read into the cache, for every sequence that asked it."""

    tokens: list[int]
    sequences: list[_Sequence]
    done: int = 0  # tokens already in the cache


class BatchedEngine:
    """A model and a context sized for `parallel` sequences of up to `seq_ctx` tokens each."""

    def __init__(
        self,
        model_path: str,
        lora_path: str | None = None,
        parallel: int = 8,
        seq_ctx: int = 2048,
        n_threads: int | None = None,
        share_prompts: bool = True,
    ) -> None:
        if parallel < 1:
            raise BadInput(f"parallel sequences must be at least 1, got {parallel}")
        self.model_path = model_path
        self.lora_path = lora_path
        self.parallel = parallel
        self.seq_ctx = seq_ctx
        self.n_threads = n_threads
        self.share_prompts = share_prompts  # False only to measure what sharing saves (the sweep benchmark)
        self.completion_tokens = 0
        self.prompt_tokens_read = 0
        self._model: Any = None
        self._lora: Any = None
        self._ctx: Any = None
        self._ctx_cells = self._ctx_parallel = 0
        self._stack = contextlib.ExitStack()

    # ---- loading ----

    def load(self) -> None:
        if self._model is not None:
            return
        try:
            with engine.load_guard():
                import llama_cpp
                from llama_cpp import _internals

                params = llama_cpp.llama_model_default_params()
                params.use_mmap = self.lora_path is None  # as Llama does: an adapter is applied to loaded weights
                self._model = self._stack.enter_context(
                    contextlib.closing(_internals.LlamaModel(path_model=self.model_path, params=params, verbose=False))
                )
                if self.lora_path:
                    self._lora = llama_cpp.llama_adapter_lora_init(self._model.model, self.lora_path.encode())
                    if self._lora is None:
                        raise ValueError(f"cannot read the LoRA adapter {self.lora_path}")
                    self._stack.callback(llama_cpp.llama_adapter_lora_free, self._lora)
        except (ValueError, RuntimeError, OSError) as exc:
            self.close()
            raise BackendUnavailable(f"llama.cpp could not load {self.model_path}: {exc}") from None

    def _context(self, cells: int) -> Any:
        """A context whose unified KV cache holds `cells` tokens; made again, larger, when a request needs it."""
        import llama_cpp
        from llama_cpp import _internals

        if self._ctx is not None and self._ctx_cells >= cells and self._ctx_parallel == self.parallel:
            return self._ctx
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = self.parallel
        params.kv_unified = True  # one cache for all: a shared prompt is one set of cells
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as Llama's default
        threads = self.n_threads or _cores()
        params.n_threads = params.n_threads_batch = threads
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        except ValueError as exc:
            raise BackendUnavailable(f"llama.cpp could not make a context of {cells} tokens: {exc}") from None
        if self._lora is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora)
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
                raise BackendUnavailable(f"llama.cpp could not apply the LoRA adapter {self.lora_path}")
        self._ctx_cells, self._ctx_parallel = cells, self.parallel
        return self._ctx

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self._stack.close()
        self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def model_bytes(self) -> int:
        """Bytes of the model's weights: what one decoding step reads."""
        self.load()
        return int(self._model.size())

    # ---- tokens ----

    def tokenize(self, text: str) -> list[int]:
        self.load()
        return self._model.tokenize(text.encode(), add_bos=True, special=True)

    def count_tokens(self, text: str) -> int:
        """Tokens of an answer as the engine reads it (no BOS)."""
        self.load()
        return len(self._model.tokenize(text.encode(), add_bos=False, special=False))

    # ---- answering ----

    def answers(self, requests: Sequence[Request], stop: Sequence[str] = ()) -> Iterator[Answer]:
        """Every request's answer, in the order they finish; requests with the same prompt share its reading.

        A consumer that stops early (a cancel) closes the generator: the sequences in flight are dropped
        from the cache, and the engine is ready for the next call.
        """
        import llama_cpp

        if not requests:
            return
        self.load()
        model = self._model
        prompts = {text: self.tokenize(text) for text in dict.fromkeys(r.prompt for r in requests)}
        if (most := max(len(tokens) for tokens in prompts.values())) >= self.seq_ctx:
            raise BadInput(f"a prompt of {most} tokens does not fit the engine's {self.seq_ctx}-token context")
        longest = max(min(len(prompts[r.prompt]) + r.params.max_tokens, self.seq_ctx) for r in requests)
        ctx = self._context(_round_up(self.parallel * longest + N_BATCH, CTX_ROUND))
        memory = llama_cpp.llama_get_memory(ctx.ctx)
        vocab, n_vocab = model.vocab, model.n_vocab()
        grammars = _grammars(requests)

        # Requests of one prompt next to each other, in the order their prompts first appear.
        rank = {text: k for k, text in enumerate(prompts)}
        order = sorted(range(len(requests)), key=lambda i: rank[requests[i].prompt])
        waiting = list(order)
        free = list(range(self.parallel))
        reading: list[_Prompt] = []
        answering: list[_Sequence] = []
        batch = llama_cpp.llama_batch_init(N_BATCH, 0, self.parallel)
        samplers = _Samplers(n_vocab, self.n_threads or _cores())
        try:
            while waiting or reading or answering:
                # Admit: free slots go to the next requests, those of one prompt together.
                while waiting and free:
                    text = requests[waiting[0]].prompt
                    group: list[_Sequence] = []
                    while (
                        waiting and free and requests[waiting[0]].prompt == text and (self.share_prompts or not group)
                    ):
                        index = waiting.pop(0)
                        params = requests[index].params
                        seed = params.seed if params.seed is not None else random.randrange(2**31)
                        group.append(
                            _Sequence(
                                index=index,
                                seq_id=free.pop(0),
                                max_tokens=min(params.max_tokens, self.seq_ctx - len(prompts[text])),
                                stop=stop,
                                sampler=sampler_chain(params, seed, n_vocab, model, grammars.get(index)),
                                started=time.monotonic(),
                            )
                        )
                    prompt = _Prompt(prompts[text], group)
                    donor = next((other for other in answering if requests[other.index].prompt == text), None)
                    if donor is not None and self.share_prompts:
                        prompt.done = len(prompt.tokens) - 1  # the last token is read again: its logits
                        for seq in group:
                            llama_cpp.llama_memory_seq_cp(memory, donor.seq_id, seq.seq_id, 0, prompt.done)
                    reading.append(prompt)

                # One batch: the next token of every answering sequence, then as much prompt as fits.
                batch.n_tokens = 0
                for seq in answering:
                    seq.logit_row = _add(batch, seq.generated[-1], seq.pos, [seq.seq_id], logits=True)
                    seq.pos += 1
                for prompt in reading:
                    room = N_BATCH - batch.n_tokens
                    if room <= 0:
                        break
                    ids = [s.seq_id for s in prompt.sequences]
                    upto = min(len(prompt.tokens), prompt.done + room)
                    for pos in range(prompt.done, upto):
                        row = _add(batch, prompt.tokens[pos], pos, ids, logits=pos == len(prompt.tokens) - 1)
                    self.prompt_tokens_read += upto - prompt.done
                    prompt.done = upto
                    if upto == len(prompt.tokens):
                        for seq in prompt.sequences:
                            seq.logit_row, seq.pos = row, upto
                status = llama_cpp.llama_decode(ctx.ctx, batch)
                if status != 0:
                    raise BackendError(f"llama.cpp could not decode {batch.n_tokens} tokens at once (status {status})")

                # Prompts read in full start answering; every sequence with a row samples its next token.
                answering += [s for p in reading if p.done == len(p.tokens) for s in p.sequences]
                reading = [p for p in reading if p.done < len(p.tokens)]
                still: list[_Sequence] = []
                for seq, token in zip(answering, samplers.sample(ctx, answering)):
                    ended = bool(llama_cpp.llama_vocab_is_eog(vocab, token))
                    if not ended:
                        seq.generated.append(token)
                        seq.text += _piece(vocab, token)
                    self.completion_tokens += 1
                    text_so_far = seq.text.decode(errors="ignore")
                    stopped = len(cut_at_stop(text_so_far, seq.stop)) < len(text_so_far)
                    if ended or stopped or len(seq.generated) >= seq.max_tokens:
                        yield self._finish(seq, memory, free)
                    else:
                        still.append(seq)
                answering = still
        finally:
            for seq in answering + [s for p in reading for s in p.sequences]:
                self._release(seq, memory, free)
            llama_cpp.llama_batch_free(batch)
            samplers.close()

    def _finish(self, seq: _Sequence, memory: Any, free: list[int]) -> Answer:
        self._release(seq, memory, free)
        text = cut_at_stop(seq.text.decode(errors="ignore"), seq.stop).strip()
        return Answer(seq.index, text, time.monotonic() - seq.started)

    @staticmethod
    def _release(seq: _Sequence, memory: Any, free: list[int]) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(memory, seq.seq_id, -1, -1)
        seq.sampler.close()
        if seq.seq_id not in free:
            free.append(seq.seq_id)


def _grammars(requests: Sequence[Request]) -> dict[int, Any]:
    """The grammar of each request that asks for a JSON schema, by its index (one per distinct schema)."""
    import json

    from llama_cpp.llama_grammar import LlamaGrammar

    made: dict[str, Any] = {}
    out = {}
    for index, request in enumerate(requests):
        if request.schema is None:
            continue
        text = json.dumps(request.schema, sort_keys=True)
        if text not in made:
            try:
                made[text] = LlamaGrammar.from_json_schema(json.dumps(request.schema), verbose=False)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise BadInput(f"llama.cpp cannot constrain an answer to this JSON schema: {exc}") from None
        out[index] = made[text]
    return out


def _add(batch: Any, token: int, pos: int, seq_ids: Sequence[int], logits: bool) -> int:
    """Put one token in the batch for the given sequences; returns its row."""
    row = batch.n_tokens
    batch.token[row] = token
    batch.pos[row] = pos
    batch.n_seq_id[row] = len(seq_ids)
    for k, seq_id in enumerate(seq_ids):
        batch.seq_id[row][k] = seq_id
    batch.logits[row] = logits
    batch.n_tokens = row + 1
    return row


def _piece(vocab: Any, token: int) -> bytes:
    """The bytes a token stands for (a piece may be part of a UTF-8 character)."""
    import llama_cpp

    buffer = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
    if n < 0:  # longer than the buffer: -n is its length
        buffer = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
    return buffer.raw[:n]


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
