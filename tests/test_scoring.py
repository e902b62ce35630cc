"""core.scoring: BERTScore equal to bert_score's, reference embeddings computed once, every score stored once."""

from __future__ import annotations

from dataclasses import fields
from importlib.metadata import version

import numpy as np
import pytest

from core import scoring
from core.dataset import dataset_id, select_pairs
from core.errors import BadInput, NotFound
from core.models import EMBEDDED_SCORER, SCORER_NUM_LAYERS, resolve_scorer
from core.runs import RunSpec, create_run, get_run, run_pairs
from core.scoring import (
    Scorer,
    ScorerConfig,
    dataset_baseline,
    mismatched_pairs,
    rouge_l,
    run_scores,
    score_generations,
    score_run,
    scorer_stamp,
)
from core.store import Store, now


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    """The embedded MiniLM scorer, loaded once for the module."""
    return Scorer()


def accepted(store: Store) -> list:
    return select_pairs(store, "starter", "all", "accepted")


def five_answers(store: Store, answers: list[str]) -> tuple[int, list[int]]:
    """A run over the first 5 starter pairs (echo backend) with these answers; its id and the generation ids."""
    run_id = create_run(store, RunSpec(dataset="starter", backend="echo", part="all", limit=5))
    pairs = run_pairs(store, get_run(store, run_id))
    with store.transaction() as conn:
        ids = [
            conn.execute(
                "INSERT INTO generations (run_id, pair_id, repeat, answer, created_at) VALUES (?, ?, 0, ?, ?)",
                (run_id, pair.id, answer, now()),
            ).lastrowid
            for pair, answer in zip(pairs, answers)
        ]
    return run_id, ids


def count(store: Store, table: str) -> int:
    return store.one(f"SELECT COUNT(*) FROM {table}")[0]


# ---- the numbers -----------------------------------------------------------------------------


def test_scores_equal_bert_score(store, scorer, monkeypatch):
    import bert_score
    from transformers.models.bert.tokenization_bert import BertTokenizer

    pairs = accepted(store)[:10]
    refs = [p.answer for p in pairs]
    cands = [p.question for p in pairs]  # a short, loosely related "answer"
    cands[1] = ""  # an empty answer
    cands[2] = pairs[3].answer  # another question's answer
    cands[3] = refs[3]  # a perfect answer
    cands[4] = " ".join(p.answer for p in accepted(store)[20:40])  # over 512 tokens: truncated alike
    refs[5] = refs[6]  # two answers to one reference
    # bert_score tokenizes an empty text with build_inputs_with_special_tokens([]), which transformers 5
    # removed; give it back as transformers 4 defined it for BERT, so bert_score can score the empty answer.
    monkeypatch.setattr(
        BertTokenizer,
        "build_inputs_with_special_tokens",
        lambda self, ids: [self.cls_token_id, *ids, self.sep_token_id],
        raising=False,
    )
    expected = bert_score.score(cands, refs, model_type=resolve_scorer(None), num_layers=SCORER_NUM_LAYERS)

    ours = scorer.score(cands, refs, store)

    got = np.array([[s.precision, s.recall, s.f1] for s in ours])
    np.testing.assert_allclose(got, np.stack([t.numpy() for t in expected], axis=1), atol=1e-4)
    assert (ours[1].precision, ours[1].recall, ours[1].f1) == (0.0, 0.0, 0.0)  # bert_score's value for ""
    assert ours[3].f1 == pytest.approx(1.0, abs=1e-4)
    assert all(s.f1_rescaled is None for s in ours)  # no baseline given


def test_rouge_l_of_identical_texts_is_1_and_of_unrelated_texts_0():
    assert rouge_l("Randomise the order of conditions.", "Randomise the order of conditions.") == 1.0
    assert rouge_l("Blinding helps.", "Report effect sizes with intervals.") == 0.0
    assert 0 < rouge_l("Randomising conditions helps.", "Randomise the order of conditions.") < 1  # stemmed words


# ---- the stamp -------------------------------------------------------------------------------


def test_stamps_name_model_layers_and_rescaling_as_bert_score_does():
    import bert_score
    from bert_score.utils import get_hash

    def bert_score_hash(*settings) -> str:
        # get_hash(model, num_layers, idf, rescale_with_baseline, use_custom_baseline, use_fast_tokenizer),
        # with the installed version (bert-score 0.3.13 still calls itself 0.3.12)
        return get_hash(*settings).replace(f"version={bert_score.__version__}", f"version={version('bert-score')}")

    assert scorer_stamp(ScorerConfig()) == bert_score_hash(EMBEDDED_SCORER, 6, False, False, False, False)
    assert scorer_stamp(ScorerConfig(rescale=True)) == bert_score_hash(EMBEDDED_SCORER, 6, False, True, False, False)
    assert (
        scorer_stamp(ScorerConfig())
        == f"all-MiniLM-L6-v2_L6_no-idf_version=0.3.13(hug_trans={version('transformers')})"
    )
    assert scorer_stamp(ScorerConfig(model="bert-base-uncased")).startswith("bert-base-uncased_L9_no-idf_")  # tuned
    assert scorer_stamp(ScorerConfig(model=EMBEDDED_SCORER)) == scorer_stamp(ScorerConfig())
    assert scorer_stamp(ScorerConfig(batch_size=8)) == scorer_stamp(ScorerConfig())  # speed, not numbers
    variants = [
        ScorerConfig(),
        ScorerConfig(num_layers=4),
        ScorerConfig(model="bert-base-uncased"),
        ScorerConfig(model="bert-base-uncased", num_layers=12),
        ScorerConfig(rescale=True),
    ]
    assert len({scorer_stamp(c) for c in variants}) == len(variants)


def test_config_fields_carry_help_and_bad_values_are_refused():
    assert all(f.metadata.get("help") for f in fields(ScorerConfig))
    for bad in ({"batch_size": 0}, {"num_layers": -1}, {"num_layers": 2.5}, {"rescale": "yes"}):
        with pytest.raises(BadInput):
            ScorerConfig(**bad)
    with pytest.raises(BadInput, match="at most 6"):
        Scorer(ScorerConfig(num_layers=7))
    with pytest.raises(NotFound):
        scorer_stamp(ScorerConfig(model="/no/such/scorer"))


# ---- the reference cache ---------------------------------------------------------------------


def test_reference_embeddings_are_computed_once_per_scorer(store, scorer, monkeypatch):
    pairs = accepted(store)[40:45]
    refs = [p.answer for p in pairs]
    embedded: list[int] = []  # how many texts each pass through the model embeds
    real_embed = Scorer._embed
    monkeypatch.setattr(Scorer, "_embed", lambda self, ids: embedded.append(len(ids)) or real_embed(self, ids))
    scoring._MEMORY.clear()  # as in a fresh process

    first = scorer.score([p.question for p in pairs], refs, store)
    assert embedded == [5, 5]  # the answers, then the references
    assert count(store, "reference_embeddings") == 5

    embedded.clear()
    scorer.score([p.question.upper() for p in pairs], refs, store)  # new answers, same references
    assert embedded == [5]  # only the answers

    embedded.clear()
    scoring._MEMORY.clear()  # another process: the references come from the store
    again = scorer.score([p.question for p in pairs], refs, store)
    assert embedded == [5]
    assert again == first  # a cached reference scores exactly as a fresh one
    assert count(store, "reference_embeddings") == 5


# ---- baselines -------------------------------------------------------------------------------


def test_rescaling_maps_the_baseline_to_0_and_a_perfect_answer_to_1(store):
    config = ScorerConfig(rescale=True)
    starter = dataset_id(store, "starter")
    baseline = dataset_baseline(store, starter, config)
    assert baseline.n_pairs == 1000  # a seeded sample of the 117 x 116 mismatched pairs
    assert 0.2 < baseline.f1 < 0.7  # unrelated answers still score far above 0 raw: the compression rescaling undoes
    assert dataset_baseline(store, starter, config) == baseline  # kept in the store
    assert count(store, "score_baselines") == 1

    answers = [p.answer for p in accepted(store)]
    sample = mismatched_pairs(len(answers))
    mismatched = Scorer(config).score([answers[i] for i, _ in sample], [answers[j] for _, j in sample], store, baseline)
    assert np.mean([s.f1_rescaled for s in mismatched]) == pytest.approx(0.0, abs=1e-4)
    (perfect,) = Scorer(config).score([answers[0]], [answers[0]], store, baseline)
    assert perfect.f1_rescaled == pytest.approx(1.0, abs=1e-4)


def test_mismatched_pairs_never_pair_an_answer_with_itself():
    assert sorted(mismatched_pairs(3)) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    sample = mismatched_pairs(117)
    assert len(sample) == len(set(sample)) == 1000
    assert all(i != j for i, j in sample)
    assert sample == mismatched_pairs(117)  # seeded


# ---- scoring runs ----------------------------------------------------------------------------


def test_score_generations_scores_each_generation_exactly_once(store):
    run_id, ids = five_answers(store, [p.question for p in accepted(store)[:5]])
    config = ScorerConfig()

    assert score_generations(store, ids[:3], config) == 3
    assert score_generations(store, ids, config) == 2  # the three already scored are skipped
    assert score_generations(store, ids, config) == 0  # a resumed job redoes nothing
    assert score_run(store, run_id, config) == 0
    assert count(store, "scores") == 5


def test_run_scores_round_trip(store, scorer):
    pairs = accepted(store)[:5]
    answers = [pairs[0].answer, "", *(p.question for p in pairs[2:])]
    run_id, _ = five_answers(store, answers)

    assert score_run(store, run_id, ScorerConfig(batch_size=2)) == 5  # in 3 batches
    frame = run_scores(store, run_id)

    assert list(frame.columns) == scoring.RUN_COLUMNS
    assert frame.attrs["scorer"] == scorer_stamp(ScorerConfig())
    assert frame["answer"].tolist() == answers
    assert frame["reference"].tolist() == [p.answer for p in pairs]
    direct = scorer.score(answers, [p.answer for p in pairs])
    np.testing.assert_allclose(frame["f1"], [s.f1 for s in direct], atol=1e-6)
    assert frame.loc[0, "rouge_l"] == 1.0
    assert frame["f1_rescaled"].isna().all()

    # a second scorer on the same run: its numbers sit beside the first's, never mixed with them
    rescaled = ScorerConfig(rescale=True)
    assert score_run(store, run_id, rescaled) == 5
    with pytest.raises(BadInput, match="2 scorers"):
        run_scores(store, run_id)
    chosen = run_scores(store, run_id, scorer_stamp(rescaled))
    np.testing.assert_allclose(chosen["f1"], frame["f1"], atol=1e-6)
    assert chosen.loc[0, "f1_rescaled"] == pytest.approx(1.0, abs=1e-4)
    assert chosen["f1_rescaled"].notna().all()


def test_unknown_runs_are_refused(store):
    with pytest.raises(NotFound):
        score_run(store, 999, ScorerConfig())
    with pytest.raises(NotFound):
        run_scores(store, 999)


# ---- the fast path equals the plain libraries ------------------------------------------------


def test_cached_references_score_as_bert_score_does_to_1e_5(store, scorer):
    import bert_score

    pairs = accepted(store)[50:58]
    refs = [p.answer for p in pairs]
    cands = [f"{p.question} {q.answer}" for p, q in zip(pairs, pairs[1:] + pairs[:1])]
    scorer.score(refs, refs, store)  # the references' embeddings go into the store
    scoring._MEMORY.clear()  # and are read back from it, as by a later run

    ours = scorer.score(cands, refs, store)

    expected = bert_score.score(cands, refs, model_type=resolve_scorer(None), num_layers=SCORER_NUM_LAYERS)[2]
    np.testing.assert_allclose([s.f1 for s in ours], expected.numpy(), atol=1e-5)


def test_a_pair_scores_the_same_alone_and_among_others(store, scorer):
    pairs = accepted(store)[60:70]
    cands, refs = [p.question for p in pairs], [p.answer for p in pairs]

    together = scorer.score(cands, refs)
    alone = [scorer.score([c], [r])[0] for c, r in zip(cands, refs)]

    np.testing.assert_allclose([s.f1 for s in together], [s.f1 for s in alone], atol=1e-6)


def test_rouge_l_equals_rouge_score(store):
    from rouge_score import rouge_scorer

    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = accepted(store)
    texts = [p.answer for p in pairs[:30]] + [p.question for p in pairs[:30]] + ["", "a b a", "b a b b"]
    for cand in texts:
        for ref in texts[::7]:
            assert rouge_l(cand, ref) == plain.score(ref, cand)["rougeL"].fmeasure, (cand, ref)
