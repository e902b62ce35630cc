"""BERTScore (precision, recall, F1) and ROUGE-L of generated answers against reference answers.

The numbers equal `bert_score.score(cands, refs, model_type=..., num_layers=...)` (no idf)
within 1e-4, but do not depend on which other pairs share a batch (see `_match`). The
difference is speed: a reference answer's token embeddings are computed once per scorer and
kept in the store (`reference_embeddings`) and in an in-process LRU, so every later run on the
same dataset only embeds its new answers and matches them greedily against the cache.

Every stored score carries its scorer stamp (`scorer_stamp`, named as bert_score's `get_hash`
names its settings); numbers with different stamps must never be mixed. This module only adds
scores, cached reference embeddings and baselines: it never generates answers and never changes
a generation, a pair or a run.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import astuple, dataclass, replace
from importlib.metadata import version
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from core import models, runs
from core.config import Config, option
from core.errors import BadInput, NotFound
from core.quality import text_hash
from core.store import Store, now

BASELINE_PAIRS = 1000  # mismatched reference pairs averaged into a dataset's baseline
BASELINE_SEED = 0
# Cached reference embeddings are float16 (half the space of float32); the matching sees them
# as stored whether they come from the cache or were just computed, so a score never depends on
# the cache's state. The rounding moves P/R/F1 by about 1e-5, well inside bert_score's 1e-4.
STORED_DTYPE = np.float16
MEMORY_BYTES = 256 << 20  # the in-process LRU of reference embeddings holds at most this much
SCORE_COLUMNS = ["precision", "recall", "f1", "f1_rescaled", "rouge_l"]
RUN_COLUMNS = ["pair_id", "repeat", "question", "reference", "answer", *SCORE_COLUMNS]


@dataclass(frozen=True)
class ScorerConfig(Config):
    what = "scorer setting"

    model: str = option(
        "", help="BERTScore model: a local folder or hub id (e.g. bert-base-uncased); empty for the embedded MiniLM."
    )
    num_layers: int | None = option(
        None,
        help="Take token embeddings from this layer; empty for the default (6 for the embedded MiniLM, bert_score's"
        " tuned layer for the models it knows, else the model's last layer).",
        min=0,
    )
    rescale: bool = option(
        False,
        help="Also store F1 rescaled against the dataset's own baseline, (F1 - b) / (1 - b), where b is the mean F1"
        " of mismatched reference answers: 0 = as alike as unrelated answers, 1 = identical.",
    )
    batch_size: int = option(64, help="Answers embedded per forward pass (and scored per store transaction).", min=1)


@dataclass(frozen=True)
class PairScore:
    precision: float
    recall: float
    f1: float
    f1_rescaled: float | None  # None unless scored against a baseline
    rouge_l: float


@dataclass(frozen=True)
class Baseline:
    """Mean BERTScore of mismatched reference answers of one dataset: what 'unrelated' scores."""

    precision: float
    recall: float
    f1: float
    n_pairs: int

    def rescale(self, f1: float) -> float:
        return (f1 - self.f1) / (1 - self.f1)  # as bert_score rescales with a baseline


# ---- the scorer's identity -----------------------------------------------------------------


def _is_embedded(model: str) -> bool:
    return model in ("", models.EMBEDDED_SCORER)


@functools.lru_cache(maxsize=32)
def _num_layers(model: str, num_layers: int | None) -> int:
    if num_layers is not None:
        return num_layers
    if _is_embedded(model):
        return models.SCORER_NUM_LAYERS
    from bert_score.utils import model2layers

    if model in model2layers:
        return model2layers[model]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise NotFound(f"cannot read the scorer model {model!r}: {str(exc).splitlines()[0]}") from exc
    if getattr(config, "num_hidden_layers", None) is None:
        raise BadInput(f"cannot tell how many layers {model!r} has; set num_layers")
    return config.num_hidden_layers


def scorer_stamp(config: ScorerConfig) -> str:
    """Model, layer, idf, versions and rescaling, as bert_score.utils.get_hash spells them.

    The version is the installed distribution's: bert-score 0.3.13 still says __version__ = "0.3.12".
    """
    name = models.EMBEDDED_SCORER if _is_embedded(config.model) else config.model
    layers = _num_layers(config.model, config.num_layers)
    stamp = f"{name}_L{layers}_no-idf_version={version('bert-score')}(hug_trans={version('transformers')})"
    return stamp + "-rescaled" if config.rescale else stamp


def _embedding_stamp(config: ScorerConfig) -> str:
    """The key of cached reference embeddings and baselines: rescaling changes neither."""
    return scorer_stamp(replace(config, rescale=False))


# ---- the model -----------------------------------------------------------------------------

# Where each architecture keeps its stack of layers (bert_score.utils.get_model drops the same ones).
_LAYER_STACKS = (("encoder", "layer"), ("transformer", "layer"), ("layers",))


def _keep_layers(model: Any, num_layers: int) -> None:
    """Drop the layers above `num_layers`, so the model's output is that layer's token embeddings."""
    import torch

    for path in _LAYER_STACKS:
        owner = model
        for name in path[:-1]:
            owner = getattr(owner, name, None)
        stack = getattr(owner, path[-1], None)
        if isinstance(stack, torch.nn.ModuleList):
            if num_layers > len(stack):
                raise BadInput(f"num_layers must be at most {len(stack)} for this model, got {num_layers}")
            setattr(owner, path[-1], torch.nn.ModuleList(stack[:num_layers]))
            return
    raise BadInput(f"cannot pick layer {num_layers} of a {type(model).__name__}; use a BERT-like scorer model")


_LOAD_LOCK = threading.Lock()


def warm_up(config: ScorerConfig) -> threading.Thread:
    """Load the scorer in the background (imports and weights take seconds) while answers are generated."""

    def load() -> None:
        # Everything a first score needs: the model, bert_score's encoder, rouge_score and nltk's stemmer.
        _token_ids(Scorer(config).tokenizer, "warm up")
        _rouge_tokens("warm up")

    thread = threading.Thread(target=load, daemon=True, name="scorer-warm-up")
    thread.start()
    return thread


@functools.lru_cache(maxsize=2)
def _load(model: str, num_layers: int) -> tuple[Any, Any]:
    """bert_score's tokenizer (the slow one) and the encoder cut at `num_layers`, once per process."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = models.resolve_scorer(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, trust_remote_code=False)
        encoder = AutoModel.from_pretrained(path, trust_remote_code=False, use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise NotFound(f"cannot load the scorer model {model or path!r}: {str(exc).splitlines()[0]}") from exc
    encoder.eval()
    _keep_layers(encoder, num_layers)
    return tokenizer, encoder


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    from bert_score.utils import sent_encode

    if not text.strip():
        # bert_score asks build_inputs_with_special_tokens([]), which transformers 5 removed;
        # encoding "" gives the same ids ([CLS] [SEP] for BERT).
        return tokenizer.encode("", add_special_tokens=True)
    return sent_encode(tokenizer, text)


class _Memory:
    """An LRU of reference embeddings bounded by bytes, shared by the threads of one process."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: tuple[str, str], value: np.ndarray) -> None:
        with self.lock:
            if key in self.items:
                return
            self.items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes and len(self.items) > 1:
                self.bytes -= self.items.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.bytes = 0


_MEMORY = _Memory(MEMORY_BYTES)


@dataclass(frozen=True)
class _Text:
    ids: list[int]
    embedding: np.ndarray  # (len(ids), dim), L2-normalised rows
    weights: np.ndarray  # 1 per token, 0 for [CLS] and [SEP]: bert_score's idf dict without idf


class Scorer:
    """A loaded scorer model (loaded once per process per model and layer) that scores answers."""

    def __init__(self, config: ScorerConfig | None = None) -> None:
        self.config = config or ScorerConfig()
        self.stamp = scorer_stamp(self.config)
        self.embedding_stamp = _embedding_stamp(self.config)
        with _LOAD_LOCK:  # a warm-up thread may be loading the same model right now
            self.tokenizer, self.model = _load(
                self.config.model, _num_layers(self.config.model, self.config.num_layers)
            )
        self._special = {self.tokenizer.cls_token_id, self.tokenizer.sep_token_id}

    def _weights(self, ids: list[int]) -> np.ndarray:
        return np.array([0.0 if i in self._special else 1.0 for i in ids], dtype=np.float32)

    def _embed(self, ids: list[list[int]]) -> list[np.ndarray]:
        """Token embeddings of the last kept layer, L2-normalised, as bert_score computes them."""
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[np.ndarray] = [np.empty(0)] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # similar lengths pad little
        size = self.config.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            width = len(ids[batch[0]])
            tokens = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode():
                emb = self.model(tokens, attention_mask=mask)[0]
            emb = emb / emb.norm(dim=-1, keepdim=True)
            for row, i in enumerate(batch):
                out[i] = emb[row, : len(ids[i])].numpy()
        return out

    def _candidates(self, texts: list[str]) -> dict[str, _Text]:
        unique = list(dict.fromkeys(texts))
        ids = [_token_ids(self.tokenizer, t) for t in unique]
        return {t: _Text(i, e, self._weights(i)) for t, i, e in zip(unique, ids, self._embed(ids))}

    def _references(self, texts: list[str], store: Store | None) -> dict[str, _Text]:
        """Reference embeddings from the LRU, else the store, else computed (and then kept in both)."""
        unique = list(dict.fromkeys(texts))
        ids = {t: _token_ids(self.tokenizer, t) for t in unique}
        hashes = {t: text_hash(t) for t in unique}
        found = {t: e for t in unique if (e := _MEMORY.get((self.embedding_stamp, hashes[t]))) is not None}
        wanted = [t for t in unique if t not in found]
        if store is not None and wanted:
            by_hash = {hashes[t]: t for t in wanted}
            rows = store.query_in(
                "SELECT text_hash, n_tokens, dim, embedding FROM reference_embeddings"
                " WHERE scorer = ? AND text_hash IN ({ids})",
                list(by_hash),
                before=(self.embedding_stamp,),
            )
            for r in rows:
                text = by_hash[r["text_hash"]]
                if r["n_tokens"] == len(ids[text]):  # else the model files changed: recompute
                    emb = np.frombuffer(r["embedding"], dtype=STORED_DTYPE).reshape(r["n_tokens"], r["dim"])
                    found[text] = emb
                    _MEMORY.put((self.embedding_stamp, hashes[text]), emb)
        missing = [t for t in unique if t not in found]
        if missing:
            computed = [e.astype(STORED_DTYPE) for e in self._embed([ids[t] for t in missing])]
            if store is not None:
                with store.transaction() as conn:
                    conn.executemany(
                        "INSERT OR REPLACE INTO reference_embeddings (scorer, text_hash, n_tokens, dim, embedding)"
                        " VALUES (?, ?, ?, ?, ?)",
                        [(self.embedding_stamp, hashes[t], *e.shape, e.tobytes()) for t, e in zip(missing, computed)],
                    )
            for t, e in zip(missing, computed):
                found[t] = e
                _MEMORY.put((self.embedding_stamp, hashes[t]), e)
        return {t: _Text(ids[t], found[t].astype(np.float32), self._weights(ids[t])) for t in unique}

    def score(
        self,
        candidates: list[str],
        references: list[str],
        store: Store | None = None,
        baseline: Baseline | None = None,
    ) -> list[PairScore]:
        """BERTScore and ROUGE-L of each candidate against its reference; references cached in `store` if given."""
        if len(candidates) != len(references):
            raise BadInput(f"{len(candidates)} candidates but {len(references)} references")
        cands = self._candidates(candidates)
        refs = self._references(references, store)
        matched = _match([(cands[c], refs[r]) for c, r in zip(candidates, references)])
        return [
            PairScore(p, r, f, baseline.rescale(f) if baseline else None, rouge_l(cand, ref))
            for (p, r, f), cand, ref in zip(matched.tolist(), candidates, references)
        ]


MATCH_PAIRS = 64  # pairs per batched similarity product: at most 64 x 512 x 512 floats (64 MiB)


def _match(pairs: list[tuple[_Text, _Text]]) -> np.ndarray:
    """bert_score's greedy cosine matching without idf (bert_score.utils.greedy_cos_idf): (P, R, F1) per pair.

    Every token, [CLS] and [SEP] included, is a match target; only the others are averaged.
    A token's best similarity counts as 0 when negative: bert_score zeroes the similarities of
    padding positions, and a pair padded in its batch (every pair but the one holding the
    batch's longest text) therefore never scores a token below 0. MiniLM does give some tokens
    of short texts a negative best match; without this floor a score would depend on its batch.
    The floor is also why zero-padded pairs can share one product here: a padding position's
    similarity is 0, which the floor gives anyway. One product per 64 pairs replaced a numpy
    product per pair (0.15-1.4 s per 100 pairs on a busy 2-core machine, a tenth of the call).
    """
    import torch
    from torch.nn.utils.rnn import pad_sequence

    def padded(arrays: list[np.ndarray]) -> torch.Tensor:
        return pad_sequence([torch.from_numpy(a) for a in arrays], batch_first=True)

    out = np.zeros((len(pairs), 3))
    for start in range(0, len(pairs), MATCH_PAIRS):
        chunk = pairs[start : start + MATCH_PAIRS]
        cand_w, ref_w = padded([c.weights for c, _ in chunk]), padded([r.weights for _, r in chunk])
        with torch.inference_mode():
            sim = torch.bmm(padded([c.embedding for c, _ in chunk]), padded([r.embedding for _, r in chunk]).mT)
            p = (sim.amax(dim=2).clamp_min(0) * cand_w).sum(dim=1) / cand_w.sum(dim=1)
            r = (sim.amax(dim=1).clamp_min(0) * ref_w).sum(dim=1) / ref_w.sum(dim=1)
        out[start : start + len(chunk), 0] = p.double().numpy()
        out[start : start + len(chunk), 1] = r.double().numpy()
    # An empty text ([CLS] [SEP]) has no weights: bert_score sets its P and R to 0.
    empty = np.array([len(c.ids) == 2 or len(r.ids) == 2 for c, r in pairs], dtype=bool)
    out[empty, :2] = 0.0
    precision, recall = out[:, 0], out[:, 1]
    with np.errstate(invalid="ignore"):
        out[:, 2] = np.nan_to_num(2 * precision * recall / (precision + recall), nan=0.0)
    return out


@functools.lru_cache(maxsize=1)
def _stemmer() -> Any:
    """rouge_score's Porter stemmer, remembering each word: stemming was half of ROUGE-L's time."""
    from nltk.stem import porter

    return SimpleNamespace(stem=functools.lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem))


def _rouge_tokens(text: str) -> tuple[str, ...]:
    """The stemmed words rouge_score's RougeScorer(["rougeL"], use_stemmer=True) compares."""
    from rouge_score import tokenize

    return tuple(tokenize.tokenize(text, _stemmer()))


def _lcs_length(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986, as Hyyroe 2004 writes it).

    Bit i of `v` is 1 while a[i] is unmatched; one big-int step per word of `b` replaces the
    row of len(a) Python cells that rouge_score's table fills (a third of ROUGE-L's time).
    """
    masks: dict[str, int] = {}
    for i, word in enumerate(a):
        masks[word] = masks.get(word, 0) | 1 << i
    full = (1 << len(a)) - 1
    v = full
    for word in b:
        u = v & masks.get(word, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of stemmed words), equal to rouge_score's."""
    cand, ref = _rouge_tokens(candidate), _rouge_tokens(reference)
    if not cand or not ref:
        return 0.0
    lcs = _lcs_length(ref, cand)
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# ---- baselines -------------------------------------------------------------------------------


def mismatched_pairs(n: int, limit: int = BASELINE_PAIRS, seed: int = BASELINE_SEED) -> list[tuple[int, int]]:
    """Ordered pairs (i, j), i != j, of n items: all of them, or a seeded random sample of `limit`."""
    total = n * (n - 1)
    if total <= limit:
        picks = np.arange(total)
    else:
        picks = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
    i, j = picks // (n - 1), picks % (n - 1)
    j = j + (j >= i)  # skip the diagonal
    return list(zip(i.tolist(), j.tolist()))


def dataset_baseline(store: Store, dataset_id: int, config: ScorerConfig) -> Baseline:
    """The mean BERTScore of accepted reference answer i against answer j != i (up to 1000 pairs).

    Computed once per dataset and scorer, then kept (`score_baselines`): every rescaled score of
    a dataset shares one baseline, even after the dataset is edited.
    """
    stamp = _embedding_stamp(config)
    sql = "SELECT precision, recall, f1, n_pairs FROM score_baselines WHERE scorer = ? AND dataset_id = ?"
    if row := store.one(sql, (stamp, dataset_id)):
        return Baseline(row["precision"], row["recall"], row["f1"], row["n_pairs"])
    rows = store.query(
        "SELECT answer FROM pairs WHERE dataset_id = ? AND status = 'accepted' ORDER BY id", (dataset_id,)
    )
    answers = [r["answer"] for r in rows]
    if len(answers) < 2:
        raise BadInput("a baseline needs at least 2 accepted pairs in the dataset")
    texts = Scorer(config)._references(answers, store)
    scores = _match([(texts[answers[i]], texts[answers[j]]) for i, j in mismatched_pairs(len(answers))])
    p, r, f = scores.mean(axis=0)
    store.execute(
        "INSERT OR IGNORE INTO score_baselines (scorer, dataset_id, f1, precision, recall, n_pairs)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (stamp, dataset_id, float(f), float(p), float(r), len(scores)),
    )
    # Another process may have stored its own first.
    row = store.one_or_raise(sql, (stamp, dataset_id), f"no dataset with id {dataset_id}")
    return Baseline(row["precision"], row["recall"], row["f1"], row["n_pairs"])


# ---- generations of runs -------------------------------------------------------------------

_UNSCORED = "NOT EXISTS (SELECT 1 FROM scores s WHERE s.generation_id = g.id AND s.scorer = ?)"


# An answer is scored against the reference its run froze when it was made, never the pair's current text.
_FROZEN = "JOIN run_pairs rp ON rp.run_id = g.run_id AND rp.pair_id = g.pair_id"


def score_generations(store: Store, generation_ids: list[int], config: ScorerConfig) -> int:
    """Score these generations against their runs' frozen reference answers; returns how many were new.

    Generations already scored with this stamp are skipped, and the scores land in one
    transaction with INSERT OR IGNORE, so a job killed and resumed never scores one twice.
    """
    stamp = scorer_stamp(config)
    rows = store.query_in(
        "SELECT g.id, g.answer, rp.reference, r.dataset_id FROM generations g JOIN runs r ON r.id = g.run_id"
        f" {_FROZEN} WHERE g.id IN ({{ids}}) AND {_UNSCORED} ORDER BY g.id",
        generation_ids,
        after=(stamp,),
    )
    if not rows:
        return 0
    scorer = Scorer(config)
    values = []
    for dataset_id in dict.fromkeys(r["dataset_id"] for r in rows):
        group = [r for r in rows if r["dataset_id"] == dataset_id]
        baseline = dataset_baseline(store, dataset_id, config) if config.rescale else None
        scores = scorer.score([r["answer"] for r in group], [r["reference"] for r in group], store, baseline)
        values += [(r["id"], stamp, *astuple(s), now()) for r, s in zip(group, scores)]
    with store.transaction() as conn:
        return conn.executemany(
            "INSERT OR IGNORE INTO scores (generation_id, scorer, precision, recall, f1, f1_rescaled, rouge_l,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            values,
        ).rowcount


def score_run(store: Store, run_id: int, config: ScorerConfig) -> int:
    """Score every generation of a run not yet scored with this stamp, batch_size at a time."""
    runs.get_run(store, run_id)  # NotFound for an unknown run
    ids = [
        r["id"]
        for r in store.query(
            f"SELECT g.id FROM generations g WHERE g.run_id = ? AND {_UNSCORED} ORDER BY g.id",
            (run_id, scorer_stamp(config)),
        )
    ]
    size = config.batch_size
    return sum(score_generations(store, ids[start : start + size], config) for start in range(0, len(ids), size))


def run_stamps(store: Store, run_id: int) -> list[str]:
    """The scorer stamps of a run's scores, sorted."""
    return [
        r["scorer"]
        for r in store.query(
            "SELECT DISTINCT s.scorer FROM scores s JOIN generations g ON g.id = s.generation_id"
            " WHERE g.run_id = ? ORDER BY s.scorer",
            (run_id,),
        )
    ]


def run_scores(store: Store, run_id: int, stamp: str | None = None) -> pd.DataFrame:
    """One row per generation of a run with its scores under one stamp (NaN where not scored).

    Without `stamp`, the run's only stamp is used; a run scored with several refuses (BadInput)
    rather than mix numbers of different scorers. The stamp used is in `frame.attrs["scorer"]`.
    """
    runs.get_run(store, run_id)
    if stamp is None:
        stamps = run_stamps(store, run_id)
        if len(stamps) > 1:
            raise BadInput(f"run {run_id} has scores from {len(stamps)} scorers; choose one of: {', '.join(stamps)}")
        stamp = stamps[0] if stamps else ""
    rows = store.query(
        "SELECT g.pair_id, g.repeat, rp.question, rp.reference, g.answer,"
        f" s.precision, s.recall, s.f1, s.f1_rescaled, s.rouge_l FROM generations g {_FROZEN}"
        " LEFT JOIN scores s ON s.generation_id = g.id AND s.scorer = ?"
        " WHERE g.run_id = ? ORDER BY g.id",
        (stamp, run_id),
    )
    frame = pd.DataFrame([tuple(r) for r in rows], columns=RUN_COLUMNS)
    frame[SCORE_COLUMNS] = frame[SCORE_COLUMNS].astype(float)
    frame.attrs["scorer"] = stamp
    return frame
