"""The one convention of the configuration dataclasses (core.config): what every one of them does alike.

Each is a frozen dataclass deriving from `Config`; its fields carry their help, choices and range;
construction refuses what they refuse; `from_dict` is strict about keys and builds nested
configurations from mappings; `to_dict` and `from_dict` round-trip through JSON.
"""

from __future__ import annotations

import json

import pytest

from core import settings
from core.config import Config, spec, specs
from core.decoding import INT_PARAMS, DecodingParams
from core.errors import BadInput
from core.evaluation import EvalConfig
from core.qa_generation import QAGenerationConfig
from core.quality import QualityConfig
from core.scoring import ScorerConfig
from core.settings import WorkbenchSettings
from core.sweep import SweepConfig
from core.train_config import SEARCH_FIELDS, TrainConfig

pytestmark = pytest.mark.empty_workspace  # nothing here reads the starter dataset

# Each configuration class with the least it needs (its required fields).
CONFIGS = [
    (DecodingParams, {}),
    (SweepConfig, {"dataset": "starter", "grid": {"temperature": [0.0, 0.7]}}),
    (TrainConfig, {"dataset": "starter"}),
    (EvalConfig, {"train_dir": "artifacts/train-1"}),
    (QAGenerationConfig, {"dataset": "generated", "topics": ["nlp"]}),
    (QualityConfig, {}),
    (ScorerConfig, {}),
    (WorkbenchSettings, {}),
]
IDS = [cls.__name__ for cls, _ in CONFIGS]


@pytest.mark.parametrize(("cls", "required"), CONFIGS, ids=IDS)
def test_every_config_is_a_frozen_config_whose_fields_all_have_help(cls, required):
    assert issubclass(cls, Config) and cls.what != Config.what
    config = cls(**required)
    with pytest.raises(AttributeError):
        config.some_field = 1  # frozen
    assert all(s.help for s in specs(cls)), [s.name for s in specs(cls) if not s.help]


@pytest.mark.parametrize(("cls", "required"), CONFIGS, ids=IDS)
def test_an_unknown_key_is_refused_with_the_known_ones_named(cls, required):
    with pytest.raises(BadInput, match=f"unknown {cls.what}\\(s\\): no_such_setting; known: ") as refused:
        cls.from_dict({**required, "no_such_setting": 1})
    message = str(refused.value)
    assert "\n" not in message
    assert all(s.name in message for s in specs(cls))


@pytest.mark.parametrize(("cls", "required"), CONFIGS, ids=IDS)
def test_defaults_round_trip_through_json(cls, required):
    config = cls(**required)
    saved = json.loads(json.dumps(config.to_dict()))
    assert cls.from_dict(saved) == config
    assert set(saved) == {s.name for s in specs(cls)}


def test_a_mapping_is_needed():
    with pytest.raises(BadInput, match="a quality setting mapping is needed, got list"):
        QualityConfig.from_dict([0.5])


def test_nested_configs_are_built_from_their_mappings_and_strict_too():
    sweep = SweepConfig.from_dict({"dataset": "d", "grid": {"top_p": [0.5]}, "baseline": {"temperature": 0}})
    assert sweep.baseline == DecodingParams(temperature=0) and sweep.baseline.greedy
    generation = QAGenerationConfig.from_dict({"dataset": "d", "topics": ["nlp"], "answer_params": {"max_tokens": 64}})
    assert generation.answer_params == DecodingParams(max_tokens=64)
    assert generation.question_params == QAGenerationConfig(dataset="d", topics=["nlp"]).question_params
    with pytest.raises(BadInput, match="unknown decoding parameter"):
        SweepConfig.from_dict({"dataset": "d", "grid": {"top_p": [0.5]}, "baseline": {"temprature": 0}})
    with pytest.raises(BadInput, match="max_tokens=0 is outside 1..4096"):
        QAGenerationConfig.from_dict({"dataset": "d", "topics": ["nlp"], "question_params": {"max_tokens": 0}})


def test_text_and_json_values_arrive_as_the_fields_types():
    # What a form or a CLI flag brings: numbers as text, an empty box for "the default" (None where allowed).
    assert DecodingParams.from_dict({"top_k": "20", "temperature": "0.5", "seed": ""}) == DecodingParams(
        top_k=20, temperature=0.5
    )
    assert DecodingParams.from_dict({"max_tokens": None, "top_k": 8.0}) == DecodingParams(top_k=8)
    assert TrainConfig.from_dict({"dataset": "d", "target_modules": "q_proj,k_proj"}).target_modules == (
        "q_proj",
        "k_proj",
    )
    assert INT_PARAMS == ("top_k", "max_tokens", "seed")
    with pytest.raises(BadInput, match="top_k must be a whole number, got 7.5"):
        DecodingParams.from_dict({"top_k": "7.5"})
    with pytest.raises(BadInput, match="rescale must be true or false"):
        ScorerConfig.from_dict({"rescale": "yes"})


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (DecodingParams, {"temperature": 3}, "temperature=3 is outside 0.0..2.0"),
        (DecodingParams, {"seed": "lucky"}, "seed must be a number"),
        (SweepConfig, {"dataset": "d", "grid": {"top_p": [1]}, "mode": "random"}, "mode must be one of product"),
        (SweepConfig, {"dataset": "d", "grid": {"top_p": [1]}, "part": "everything"}, "part must be one of"),
        (SweepConfig, {"dataset": "d", "grid": {"top_p": [1]}, "backend": "gpt"}, "backend must be one of"),
        (SweepConfig, {"dataset": "d", "grid": {"top_p": [1]}, "repeats": 101}, "repeats=101 is outside 1..100"),
        (SweepConfig, {"dataset": "d", "grid": {"top_p": [1]}, "limit": 0}, "limit must be at least 1, got 0"),
        (SweepConfig, {"dataset": "d", "grid": {"top_p": [1]}, "trials": -1}, "trials must be at least 0"),
        (SweepConfig, {"dataset": "d", "grid": {"top_p": [1]}, "mode": "optuna", "trials": 0}, "at least one trial"),
        (SweepConfig, {"dataset": "d", "grid": {}}, "the grid is empty"),
        (TrainConfig, {"dataset": "d", "method": "full"}, "method must be one of qlora, lora, dpo, got 'full'"),
        (TrainConfig, {"dataset": "d", "scheduler": "step"}, "scheduler must be one of"),
        (TrainConfig, {"dataset": "d", "evaluate_with": "ollama"}, "evaluate_with must be one of"),
        (TrainConfig, {"dataset": "d", "batch_size": 0}, "batch_size must be at least 1"),
        (TrainConfig, {"dataset": "d", "max_seq_len": 4}, "max_seq_len must be at least 8"),
        (TrainConfig, {"dataset": "d", "lora_dropout": 1}, r"LoRA dropout must be in \[0, 1\)"),
        (TrainConfig, {"dataset": "d", "target_modules": ()}, "give at least one target module"),
        (TrainConfig, {"dataset": "d", "prompt_template": "no placeholder"}, r"must contain \{question\}"),
        (EvalConfig, {"train_dir": "t", "backend": "ollama"}, "backend must be one of llamacpp, transformers"),
        (EvalConfig, {"train_dir": "t", "limit": 0}, "limit must be at least 1"),
        (ScorerConfig, {"batch_size": 0}, "batch_size must be at least 1"),
        (ScorerConfig, {"num_layers": -1}, "num_layers must be at least 0"),
        (QAGenerationConfig, {"dataset": "d", "topics": ["nlp"], "backend": "gpt"}, "backend must be one of"),
        (WorkbenchSettings, {"ollama_parallel": 65}, "ollama_parallel=65 is outside 1..64"),
        (WorkbenchSettings, {"ollama_host": "my host"}, "should look like http://127.0.0.1:11434"),
        (WorkbenchSettings, {"optuna_storage": "db-host/studies"}, "Optuna storage should be a URL"),
    ],
)
def test_choices_ranges_and_the_classes_own_rules_are_enforced_on_construction(cls, values, message):
    with pytest.raises(BadInput, match=message) as refused:
        cls.from_dict(values)
    assert "\n" not in str(refused.value)


def test_the_metadata_is_what_the_cli_and_the_forms_read():
    temperature = spec(DecodingParams, "temperature")
    assert (temperature.kind, temperature.min, temperature.max, temperature.default) == (float, 0.0, 2.0, 0.7)
    assert spec(DecodingParams, "seed").optional
    assert spec(SweepConfig, "mode").choices == ("product", "one-at-a-time", "optuna")
    assert spec(TrainConfig, "method").choices == ("qlora", "lora", "dpo")
    assert spec(TrainConfig, "dataset").required
    # A search sets these for its trials; the CLI offers no flag for them.
    assert SEARCH_FIELDS == ("split_id", "cv_folds", "cv_fold", "selection")
    assert all(s.cli == (s.name not in SEARCH_FIELDS) for s in specs(TrainConfig))


def test_settings_drop_a_key_an_older_version_saved_but_refuse_a_bad_value(store):
    store.set_setting("workbench_settings", {"ollama_parallel": 4, "retired_setting": "x"})
    assert settings.load(store) == WorkbenchSettings(ollama_parallel=4)
    with pytest.raises(BadInput, match="no GGUF file at /no/such.gguf"):  # needs the disk: checked on save
        settings.save(store, WorkbenchSettings(generator_gguf=" /no/such.gguf "))
    saved = settings.save(store, WorkbenchSettings(ollama_host=" http://gpu-box:11434 "))
    assert saved.ollama_host == "http://gpu-box:11434" == settings.load(store).ollama_host
