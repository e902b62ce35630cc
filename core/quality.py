"""Quality flags: hints that guide a reviewer to the QA pairs worth a second look.

A flag says "look here" (a near-duplicate question, a one-line answer, an answer that only
restates its question, a pair not in English); the reviewer decides. Flags are derived data,
recomputed from scratch by `flag_dataset`: this module never deletes a pair and never changes
its question, answer, field, status, version, updated_at or history.

Near-duplicates compare MiniLM sentence embeddings of the questions (the embedded BERTScore
model, mean-pooled and L2-normalised as sentence-transformers does); embeddings are cached in
the store by text hash, so re-flagging a dataset only embeds questions never seen before.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from core.config import Config, option
from core.dataset import dataset_id
from core.errors import BadInput
from core.store import Store

FLAGS: dict[str, str] = {
    "near_duplicate": "The question closely paraphrases an earlier question of the dataset.",
    "short_answer": "The answer is shorter than the minimum number of words.",
    "long_answer": "The answer is longer than the maximum number of words.",
    "no_question_mark": "The question has no question mark.",
    "answer_repeats_question": "The answer's first sentence mostly restates the question.",
    "non_english": "The question or the answer does not look like English.",
}

CONFIG_KEY = "quality_config"  # the settings key of the saved QualityConfig
EMBED_MODEL = "all-MiniLM-L6-v2"  # stamped on every cached vector, so vectors of other models never mix
EMBED_DIM = 384
EMBED_BATCH = 64
MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2's sentence_bert_config.json; longer texts are truncated


@dataclass(frozen=True)
class QualityConfig(Config):
    what = "quality setting"

    # 0.67 measured on tests/fixtures/near_duplicates.csv: best F1 (0.80; precision 0.875, recall 0.74) of
    # the thresholds that flag none of the 117 distinct starter questions (their closest pair scores 0.652).
    # The bounds are _check's: a share is above 0, which a range (its ends included) cannot say.
    duplicate_threshold: float = option(
        0.67,
        help="Flag a question as a near-duplicate when the cosine similarity of its embedding with an earlier"
        " question's reaches this value (0-1; higher flags fewer).",
    )
    min_answer_words: int = option(12, help="Flag answers with fewer words than this.")
    max_answer_words: int = option(250, help="Flag answers with more words than this.")
    repeat_overlap: float = option(
        0.8,
        help="Flag an answer whose first sentence restates the question: at least this share of the question's"
        " content words appear in it verbatim, and they make up at least this share of its content words.",
    )

    def _check(self) -> None:
        for name in ("duplicate_threshold", "repeat_overlap"):
            if not 0 < getattr(self, name) <= 1:
                raise BadInput(f"{name} must be above 0 and at most 1, got {getattr(self, name)}")
        if self.min_answer_words < 0:
            raise BadInput(f"min_answer_words must be 0 or more, got {self.min_answer_words}")
        if self.min_answer_words >= self.max_answer_words:
            raise BadInput(
                f"min_answer_words ({self.min_answer_words}) must be below max_answer_words ({self.max_answer_words})"
            )


def save_config(store: Store, config: QualityConfig) -> None:
    """Keep `config` as the workspace's default for flag_dataset (validated on the way in and out)."""
    config = QualityConfig.from_dict(config.to_dict())  # validated again: a saved config must load back
    store.set_setting(CONFIG_KEY, config.to_dict())


def load_config(store: Store) -> QualityConfig:
    """The saved configuration, or the defaults when none was saved."""
    saved = store.get_setting(CONFIG_KEY)
    return QualityConfig() if saved is None else QualityConfig.from_dict(saved)


# ---- text flags: pure functions of one pair ------------------------------------------------

# Function words only: they carry no topic, so their share tells English from other languages,
# and they are left out when an answer's wording is compared with its question's.
_ENGLISH_FUNCTION_WORDS = """
    a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each either few for from
    further had has have having he her here hers him his how i if in into is it its itself just more
    most my neither nor not of off on once only or other our ours out over own same she should so
    some such than that the their theirs them then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you
    your yours
"""
_STOP_WORDS = frozenset(_ENGLISH_FUNCTION_WORDS.split())
# The commonest function words of German, French and Spanish that are not English words: a text
# with more of these than English ones is not English even when it is full of English jargon.
_FOREIGN_FUNCTION_WORDS = """
    der das und ist nicht ein eine einen dem den des zu mit sich auf für von im wie ich sie es wir
    auch noch nach bei oder aber wenn kann sind wird werden meine mein sollte soll ob sehr welche
    de le la les des du un une et est pas pour dans que qui ne sur avec ce cette sont au aux je nous vous
    il elle ils ou mais leur mes comment quelle quel quels faut peut très combien
    el los las del y en es por para con una se lo su como más pero sus al le qué cómo cuántas
    cuántos debo puedo muy entre sin sobre también este esta estos mis
"""
_FOREIGN_STOP_WORDS = frozenset(_FOREIGN_FUNCTION_WORDS.split())
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|[?!]")


def words(text: str) -> list[str]:
    """Lower-cased words (letters and digits; inner hyphens and apostrophes kept)."""
    return _WORD.findall(text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in _STOP_WORDS and (len(w) > 1 or w.isdigit())}


def first_sentence(text: str) -> str:
    """Up to the first '.', '!' or '?' that ends a sentence (a '?' or '!' always does)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def looks_english(text: str) -> bool:
    """A cheap guess: mostly Latin letters and, for 6 words or more, enough English function words
    (and more of them than German, French or Spanish ones).

    Short texts get the benefit of the doubt (a term like "Dropout?" is no evidence either way).
    """
    letters = [c for c in text if c.isalpha()]
    if letters:
        non_latin = sum(1 for c in letters if not unicodedata.name(c, "").startswith("LATIN"))
        if non_latin / len(letters) > 0.3:
            return False
    tokens = words(text)
    if len(tokens) < 6:
        return True
    # English prose runs at 35-50 % function words, terse technical questions at 15 % and up.
    english = sum(1 for w in tokens if w in _STOP_WORDS)
    foreign = sum(1 for w in tokens if w in _FOREIGN_STOP_WORDS)
    return english / len(tokens) >= 0.1 and english > foreign


def repeats_question(question: str, answer: str, overlap: float) -> bool:
    """True when the answer's first sentence is mostly the question's own content words again."""
    asked, said = content_words(question), content_words(first_sentence(answer))
    if len(asked) < 2 or not said:
        return False
    shared = len(asked & said)
    return shared / len(asked) >= overlap and shared / len(said) >= overlap


def text_flags(question: str, answer: str, config: QualityConfig = QualityConfig()) -> list[str]:
    """Every flag that one pair earns on its own (all but near_duplicate), in FLAGS order."""
    n_words = len(words(answer))
    raised = {
        "short_answer": n_words < config.min_answer_words,
        "long_answer": n_words > config.max_answer_words,
        "no_question_mark": "?" not in question and "？" not in question,
        "answer_repeats_question": repeats_question(question, answer, config.repeat_overlap),
        "non_english": not (looks_english(question) and looks_english(answer)),
    }
    return [name for name in FLAGS if raised.get(name)]


# ---- near-duplicates -----------------------------------------------------------------------


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _load_encoder():
    """The MiniLM tokenizer and encoder, loaded once per process (about a second)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from core.models import scorer_path

    path = scorer_path()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModel.from_pretrained(path, trust_remote_code=False, use_safetensors=True, dtype=torch.float32)
    model.eval()
    return tokenizer, model


def _encode(texts: list[str]) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2."""
    import torch

    tokenizer, model = _load_encoder()
    out = []
    for start in range(0, len(texts), EMBED_BATCH):
        batch = tokenizer(
            texts[start : start + EMBED_BATCH],
            padding=True,
            truncation=True,
            max_length=MAX_SEQ_LENGTH,
            return_tensors="pt",
        )
        with torch.inference_mode():
            tokens = model(**batch).last_hidden_state
        # mean over real tokens only: padding positions are masked out of sum and count
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def embed(store: Store, texts: list[str]) -> np.ndarray:
    """L2-normalised MiniLM embeddings, shape (len(texts), 384), float32; computed once per text ever."""
    hashes = [text_hash(t) for t in texts]
    rows = store.query_in(
        "SELECT text_hash, vector FROM embeddings WHERE model = ? AND text_hash IN ({ids})",
        list(dict.fromkeys(hashes)),
        before=(EMBED_MODEL,),
    )
    known = {r["text_hash"]: np.frombuffer(r["vector"], dtype=np.float32) for r in rows}
    missing = {h: t for h, t in zip(hashes, texts) if h not in known}
    if missing:
        vectors = _encode(list(missing.values()))
        with store.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO embeddings (text_hash, model, vector) VALUES (?, ?, ?)",
                [(h, EMBED_MODEL, v.tobytes()) for h, v in zip(missing, vectors)],
            )
        known.update(zip(missing, vectors))
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    return np.stack([known[h] for h in hashes]).astype(np.float32, copy=False)


def near_duplicates(vectors: np.ndarray, threshold: float, block: int = 1024) -> list[tuple[int, float] | None]:
    """For each row i, (j, cosine) of the most similar earlier row j < i if it reaches `threshold`, else None.

    Rows are compared in blocks of `block` rows against all earlier rows, so memory stays at
    block x n similarities (about 40 MB for 10,000 rows) instead of n x n.
    """
    v: np.ndarray = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms == 0, 1, norms)
    found: list[tuple[int, float] | None] = []
    for start in range(0, len(v), block):
        stop = min(start + block, len(v))
        sims = v[start:stop] @ v[:stop].T  # (rows of this block) x (every row up to its end)
        rows = np.arange(start, stop)[:, None]
        sims[np.arange(stop)[None, :] >= rows] = -np.inf  # only strictly earlier rows count
        best = sims.argmax(axis=1)  # the first of equally similar rows: the earliest
        for i, j in zip(range(start, stop), best):
            score = float(sims[i - start, j])
            found.append((int(j), score) if score >= threshold else None)
    return found


# ---- a whole dataset -----------------------------------------------------------------------


@dataclass(frozen=True)
class FlagSummary:
    dataset: str
    pairs: int
    counts: dict[str, int]  # every name of FLAGS -> how many pairs carry it


def flag_dataset(store: Store, dataset: str, config: QualityConfig | None = None) -> FlagSummary:
    """Recompute the flags of every pair of a dataset (any status) and store them in one transaction.

    Pairs are taken in id order, so of two near-duplicates the later one is flagged and points at
    the earlier one (`duplicate_of`, `duplicate_score`). Only flags, duplicate_of and
    duplicate_score are written: version, updated_at and history stay as they are.
    """
    config = config or load_config(store)
    ds = dataset_id(store, dataset)
    rows = store.query("SELECT id, question, answer FROM pairs WHERE dataset_id = ? ORDER BY id", (ds,))
    duplicates = near_duplicates(embed(store, [r["question"] for r in rows]), config.duplicate_threshold)
    counts = dict.fromkeys(FLAGS, 0)
    updates = []
    for row, dup in zip(rows, duplicates):
        flags = text_flags(row["question"], row["answer"], config)
        if dup is not None:
            flags = ["near_duplicate", *flags]
        for name in flags:
            counts[name] += 1
        dup_of, dup_score = (rows[dup[0]]["id"], round(dup[1], 4)) if dup else (None, None)
        updates.append((json.dumps(flags), dup_of, dup_score, row["id"]))
    with store.transaction() as conn:
        conn.executemany("UPDATE pairs SET flags = ?, duplicate_of = ?, duplicate_score = ? WHERE id = ?", updates)
    return FlagSummary(dataset, len(rows), counts)
