"""Quality flags: what raises each flag, how near-duplicates are found, and what flagging never touches."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from core import dataset, intake, quality
from core.errors import BadInput, NotFound
from core.quality import FLAGS, QualityConfig, looks_english, near_duplicates, text_flags

ROOT = Path(__file__).resolve().parent.parent
LABELLED = ROOT / "tests" / "fixtures" / "near_duplicates.csv"
STARTER = ROOT / "data" / "research_qa.csv"

GOOD_QUESTION = "How many random seeds should I run for each configuration?"
GOOD_ANSWER = (
    "Run at least three to five seeds per configuration, and more when the differences you care about"
    " are small compared with the spread between runs."
)

pytestmark = pytest.mark.empty_workspace  # counts embeddings and imports the starter itself


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ---- text flags ----------------------------------------------------------------------------


def test_flag_names_are_fixed_and_described():
    assert list(FLAGS) == [
        "near_duplicate",
        "short_answer",
        "long_answer",
        "no_question_mark",
        "answer_repeats_question",
        "non_english",
    ]
    assert all(description.strip() and "\n" not in description for description in FLAGS.values())


def test_a_good_pair_raises_no_flag():
    assert text_flags(GOOD_QUESTION, GOOD_ANSWER) == []


@pytest.mark.parametrize(
    ("flag", "question", "answer"),
    [
        ("short_answer", GOOD_QUESTION, "Three to five."),
        ("long_answer", GOOD_QUESTION, " ".join([GOOD_ANSWER] * 12)),
        ("no_question_mark", "Explain how many random seeds to run for each configuration.", GOOD_ANSWER),
        (
            "answer_repeats_question",
            "Why should negative results be reported?",
            "Negative results should be reported. They keep other groups from repeating the same dead ends.",
        ),
        (
            "answer_repeats_question",  # an answer that opens by echoing the question word for word
            "Why should negative results be reported?",
            "Why should negative results be reported? Because hiding them inflates effect sizes across a field.",
        ),
        (
            "non_english",
            "Wie viele Zufallsseeds sollte ich für jede Konfiguration verwenden?",
            "Mindestens drei bis fünf Seeds pro Konfiguration, und mehr, wenn die Unterschiede klein sind.",
        ),
        (
            "non_english",
            GOOD_QUESTION,
            "Используйте не меньше трёх или пяти случайных зерён для каждой конфигурации, а больше, когда"
            " различия между методами малы.",
        ),
    ],
)
def test_each_text_flag_triggers_on_a_tiny_example(flag, question, answer):
    assert text_flags(question, answer) == [flag]


def test_an_answer_that_starts_from_the_question_but_adds_substance_is_not_a_repeat():
    question = "Why should negative results be reported?"
    answer = (
        "Negative results should be reported because hidden failures inflate published effect sizes and"
        " send other groups down the same dead ends."
    )
    assert text_flags(question, answer) == []


def test_word_limits_come_from_the_config():
    config = QualityConfig(min_answer_words=3, max_answer_words=5)
    assert text_flags(GOOD_QUESTION, "Three to five seeds.", config) == []
    assert text_flags(GOOD_QUESTION, GOOD_ANSWER, config) == ["long_answer"]


def test_text_flags_never_include_near_duplicate():
    assert "near_duplicate" not in text_flags(GOOD_QUESTION, GOOD_QUESTION)


# ---- looks_english -------------------------------------------------------------------------


def test_every_starter_question_and_answer_looks_english():
    rows = read_csv(STARTER)
    not_english = [r[k] for r in rows for k in ("question", "answer") if not looks_english(r[k])]
    assert not_english == []


@pytest.mark.parametrize(
    "text",
    [
        "Wie viele Zufallsseeds sollte ich für meine Experimente verwenden?",
        "Die Ergebnisse sollten immer mit einem starken Vergleichsmodell und mehreren Seeds berichtet werden.",
        "Combien de graines aléatoires faut-il utiliser pour une expérience fiable ?",
        "Il est important de séparer les données de test avant de choisir les hyperparamètres du modèle.",
        "¿Cuántas semillas aleatorias debo usar para comparar dos modelos de aprendizaje automático?",
        "Es importante informar la varianza entre ejecuciones y no solo el mejor resultado obtenido.",
        "我应该使用多少个随机种子来评估机器学习模型的性能？",
        "在选择超参数之前，应该先把测试集分离出来。",
        "Сколько случайных зерен нужно использовать для надежного сравнения моделей?",
        "Результаты следует сообщать вместе с доверительными интервалами и несколькими запусками.",
    ],
)
def test_german_french_spanish_chinese_and_russian_do_not_look_english(text):
    assert not looks_english(text)


@pytest.mark.parametrize("text", ["Dropout?", "Was ist das?", "BERTScore F1 über Seeds", "Why use k-fold CV?"])
def test_short_latin_texts_get_the_benefit_of_the_doubt(text):
    assert looks_english(text)


def test_english_full_of_jargon_still_looks_english():
    assert looks_english("Which design choices make figures in a paper communicate experimental results honestly?")


# ---- near_duplicates (pure) ----------------------------------------------------------------


def unit(*xs: float) -> list[float]:
    v = np.array(xs, dtype=np.float64)
    return list(v / np.linalg.norm(v))


def test_the_earliest_row_is_never_a_duplicate_and_later_rows_point_back():
    vectors = np.array([unit(1, 0, 0), unit(1, 0, 0), unit(0, 1, 0)], dtype=np.float32)
    found = near_duplicates(vectors, 0.9)
    assert found[0] is None  # identical to row 1, but nothing comes before it
    assert found[1] == (0, pytest.approx(1.0))
    assert found[2] is None


def test_picks_the_most_similar_earlier_row_not_the_nearest_in_order():
    target = unit(1, 0.05, 0)
    vectors = np.array([unit(1, 0.5, 0), unit(1, 0, 0), unit(1, 0.3, 0), target], dtype=np.float32)
    j, score = near_duplicates(vectors, 0.5)[3]
    assert j == 1
    assert score == pytest.approx(float(np.dot(target, unit(1, 0, 0))), abs=1e-6)


def test_of_equally_similar_earlier_rows_the_first_is_chosen():
    vectors = np.array([unit(1, 0), unit(1, 0), unit(1, 0)], dtype=np.float32)
    assert near_duplicates(vectors, 0.9)[2] == (0, pytest.approx(1.0))


def test_the_threshold_is_inclusive_and_respected():
    cos = 0.75
    vectors = np.array([[1.0, 0.0], [cos, np.sqrt(1 - cos**2)]], dtype=np.float32)
    assert near_duplicates(vectors, 0.74)[1] == (0, pytest.approx(cos, abs=1e-6))
    assert near_duplicates(vectors, 0.76)[1] is None


def test_vectors_need_not_be_normalised():
    vectors = np.array([[3.0, 0.0], [0.5, 0.0], [0.0, 0.0]], dtype=np.float32)
    assert near_duplicates(vectors, 0.99) == [None, (0, pytest.approx(1.0)), None]


def test_blocks_do_not_change_the_answer():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    blocked, whole = near_duplicates(vectors, 0.5, block=7), near_duplicates(vectors, 0.5, block=1000)
    assert [d and d[0] for d in blocked] == [d and d[0] for d in whole]
    assert [d and d[1] for d in blocked] == pytest.approx([d and d[1] for d in whole], abs=1e-5)
    assert near_duplicates(np.zeros((0, 384), dtype=np.float32), 0.5) == []


def test_ten_thousand_rows_stay_memory_bounded():
    vectors = np.random.default_rng(0).normal(size=(10_000, 384)).astype(np.float32)
    tracemalloc.start()
    try:
        found = near_duplicates(vectors, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(found) == 10_000
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB; a full 10,000 x 10,000 matrix would take 400 MB"


# ---- embeddings ----------------------------------------------------------------------------


def count_embeddings(store) -> int:
    return store.one("SELECT COUNT(*) FROM embeddings")[0]


def test_embeddings_are_normalised_minilm_vectors_in_input_order(store):
    texts = ["How many seeds should I run?", "What is an ablation study?", "How many seeds should I run?"]
    vectors = quality.embed(store, texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(vectors[0], vectors[2])
    assert count_embeddings(store) == 2  # one row per distinct text
    assert quality.embed(store, []).shape == (0, 384)


def test_embeddings_match_sentence_transformers(store):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from core.models import scorer_path

    texts = ["How many seeds should I run?", "Wie viele Seeds?", "A much longer sentence " * 40]
    reference = sentence_transformers.SentenceTransformer(str(scorer_path()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    assert np.abs(quality.embed(store, texts) - reference).max() < 1e-5


def test_embeddings_are_cached_so_only_new_texts_are_computed(store, monkeypatch):
    computed: list[str] = []
    encode = quality._encode

    def counting_encode(texts):
        computed.extend(texts)
        return encode(texts)

    monkeypatch.setattr(quality, "_encode", counting_encode)
    first = quality.embed(store, ["How many seeds should I run?", "What is an ablation study?"])
    assert len(computed) == 2 and count_embeddings(store) == 2

    again = quality.embed(store, ["What is an ablation study?", "How many seeds should I run?"])
    assert len(computed) == 2, "a second call computed something already cached"
    assert np.array_equal(again, first[::-1])

    quality.embed(store, ["How many seeds should I run?", "Why tune on a validation set?"])
    assert computed[2:] == ["Why tune on a validation set?"]
    assert count_embeddings(store) == 3


# ---- flag_dataset --------------------------------------------------------------------------


def stored_pairs(store, name: str) -> list[dict]:
    rows = store.query("SELECT * FROM pairs WHERE dataset_id = ? ORDER BY id", (dataset.dataset_id(store, name),))
    return [dict(r) for r in rows]


def precision_recall(pairs: list[dict]) -> tuple[float, float]:
    """Every member of a dup_group after the first (by id) should be flagged as a duplicate of its group."""
    group_of = {p["id"]: json.loads(p["metadata"]).get("dup_group", "") for p in pairs}
    seen: set[str] = set()
    expected = 0
    for p in pairs:
        group = group_of[p["id"]]
        expected += bool(group) and group in seen
        seen.add(group)
    flagged = [p for p in pairs if "near_duplicate" in json.loads(p["flags"])]
    right = sum(1 for p in flagged if group_of[p["id"]] and group_of[p["duplicate_of"]] == group_of[p["id"]])
    return right / max(len(flagged), 1), right / expected


def test_the_labelled_near_duplicates_are_found(store):
    # The labelled file mixes light rewordings (all caught at the default threshold) with paraphrases
    # in different words (MiniLM misses most of these) and close-but-distinct questions. Measured at
    # the default 0.67: precision 14/16 = 0.875, recall 14/19 = 0.74; see QualityConfig.
    intake.import_file(store, LABELLED, "dups")
    summary = quality.flag_dataset(store, "dups")
    pairs = stored_pairs(store, "dups")
    precision, recall = precision_recall(pairs)
    print(
        f"\nnear-duplicates at threshold {QualityConfig().duplicate_threshold}: "
        f"precision {precision:.3f}, recall {recall:.3f}"
    )
    assert precision >= 0.85
    assert recall >= 0.7
    assert summary.pairs == len(pairs) == len(read_csv(LABELLED))
    for p in pairs:
        flags = json.loads(p["flags"])
        assert ("near_duplicate" in flags) == (p["duplicate_of"] is not None) == (p["duplicate_score"] is not None)
        if p["duplicate_of"] is not None:
            assert p["duplicate_of"] < p["id"]
            assert p["duplicate_score"] >= QualityConfig().duplicate_threshold
    assert summary.counts == {name: sum(name in json.loads(p["flags"]) for p in pairs) for name in FLAGS}


def test_the_starter_dataset_has_no_near_duplicates_and_no_non_english_pairs(store):
    intake.import_file(store, STARTER, "starter")
    summary = quality.flag_dataset(store, "starter")
    assert summary.pairs == 117
    assert summary.counts["near_duplicate"] == 0
    assert summary.counts["non_english"] == 0
    assert all(p["duplicate_of"] is None for p in stored_pairs(store, "starter"))


def test_flagging_never_changes_content_version_updated_at_or_history(store):
    intake.import_file(store, LABELLED, "dups")
    first = stored_pairs(store, "dups")[0]["id"]
    dataset.update_pair(store, first, answer="Run three to five seeds, more when the differences are small.")
    watched = ("question", "answer", "field", "status", "metadata", "provenance", "version", "created_at", "updated_at")

    def snapshot():
        pairs = {p["id"]: tuple(p[k] for k in watched) for p in stored_pairs(store, "dups")}
        history = [tuple(r) for r in store.query("SELECT * FROM pair_history ORDER BY id")]
        changes = [tuple(r) for r in store.query("SELECT * FROM changes ORDER BY id")]
        return pairs, history, changes

    before = snapshot()
    quality.flag_dataset(store, "dups")
    quality.flag_dataset(store, "dups", QualityConfig(duplicate_threshold=0.3, min_answer_words=40))
    assert snapshot() == before
    assert dataset.last_change(store, "dups").pair_ids == [first]  # Undo still reverts the edit, not the flags


def test_flags_are_recomputed_from_scratch(store):
    intake.import_file(store, LABELLED, "dups")
    strict = quality.flag_dataset(store, "dups", QualityConfig(min_answer_words=100, max_answer_words=200))
    assert strict.counts["short_answer"] == strict.pairs
    relaxed = quality.flag_dataset(store, "dups", QualityConfig(duplicate_threshold=1.0))
    assert relaxed.counts["short_answer"] == 0
    assert relaxed.counts["near_duplicate"] == 0
    assert all(p["duplicate_of"] is None and p["duplicate_score"] is None for p in stored_pairs(store, "dups"))


def test_flag_dataset_uses_the_saved_config_and_names_unknown_datasets(store):
    intake.import_file(store, LABELLED, "dups")
    quality.save_config(store, QualityConfig(min_answer_words=100, max_answer_words=200))
    summary = quality.flag_dataset(store, "dups")
    assert summary.counts["short_answer"] == summary.pairs
    with pytest.raises(NotFound, match="no dataset named 'nope'"):
        quality.flag_dataset(store, "nope")


# ---- configuration -------------------------------------------------------------------------


def test_config_round_trips_through_the_store(store):
    assert quality.load_config(store) == QualityConfig()
    config = QualityConfig(duplicate_threshold=0.75, min_answer_words=5, max_answer_words=80, repeat_overlap=0.6)
    quality.save_config(store, config)
    assert quality.load_config(store) == config


def test_every_config_field_has_help():
    from dataclasses import fields

    assert all(f.metadata["help"] for f in fields(QualityConfig))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"duplicate_threshold": 0}, "duplicate_threshold must be above 0 and at most 1"),
        ({"duplicate_threshold": 1.2}, "duplicate_threshold must be above 0 and at most 1"),
        ({"repeat_overlap": -0.1}, "repeat_overlap must be above 0 and at most 1"),
        ({"min_answer_words": 50, "max_answer_words": 50}, "must be below max_answer_words"),
        ({"min_answer_words": -1}, "min_answer_words must be 0 or more"),
        ({"min_answer_words": 2.5}, "must be a whole number"),
        ({"duplicate_threshold": "high"}, "must be a number"),
        ({"threshold": 0.5}, "unknown quality setting"),
    ],
)
def test_bad_configs_are_refused_with_one_line(values, message):
    with pytest.raises(BadInput, match=message) as error:
        QualityConfig.from_dict(values)
    assert "\n" not in str(error.value)


def test_a_bad_saved_config_is_refused_on_load(store):
    store.set_setting("quality_config", {"duplicate_threshold": 2})
    with pytest.raises(BadInput):
        quality.load_config(store)
