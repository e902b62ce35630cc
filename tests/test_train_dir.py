"""The training folder's layout (core.train_dir) and the Optuna storage helpers shared by both integrations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core import studies
from core.errors import BadInput, NotFound
from core.train_dir import TrainDir


def _finished_run(root) -> TrainDir:
    run = TrainDir(root)
    run.adapter.mkdir(parents=True)
    run.adapter_config.write_text("{}")
    run.train_config.write_text(json.dumps({"dataset": "d", "resolved_model": "/m"}))
    return run


def test_a_run_folder_is_found_from_itself_or_from_its_adapter_folder(tmp_path):
    run = _finished_run(tmp_path / "train-1")
    assert TrainDir.holding(run.root) == run == TrainDir.holding(run.adapter)
    assert run.settings() == {"dataset": "d", "resolved_model": "/m"}
    assert run.gguf_adapter == run.root / "export" / "adapter.gguf"


def test_an_unfinished_run_has_no_settings_and_says_what_is_missing(tmp_path):
    run = TrainDir(tmp_path / "train-2")
    run.adapter.mkdir(parents=True)
    run.adapter_config.write_text("{}")  # the adapter is saved, train_config.json (written last) is not yet
    assert not run.finished()
    with pytest.raises(NotFound, match=r"not a finished training run \(no adapter/ and train_config.json\)"):
        run.settings()
    with pytest.raises(BadInput):
        run.settings(BadInput)


def test_the_layout_is_read_without_loading_torch():
    code = "import sys, core.train_dir, core.studies, core.train_search; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_interrupted_trials_are_failed_and_live_ones_left_running():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    gone, alive = study.ask(), study.ask()
    alive.set_user_attr("live", True)
    assert studies.fail_interrupted(study, alive=lambda trial: trial.user_attrs.get("live", False)) == [gone.number]
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    assert states == {gone.number: "FAIL", alive.number: "RUNNING"}


def test_a_storage_url_never_shows_its_password():
    url = "postgresql://me:secret@127.0.0.1:1/studies"
    assert studies.redact(url) == "postgresql://me:***@127.0.0.1:1/studies"
    with pytest.raises(BadInput, match="cannot open the Optuna storage") as refused:
        studies.open_storage(url)
    assert "secret" not in str(refused.value)
