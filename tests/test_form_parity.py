"""Every setting a page edits can be set on its page and from the CLI, with the same default and help text.

The pages' forms (workbench.forms) and the CLI's flags (workbench.cli) are both built from the fields of the
configuration classes (core.config.specs); these tests hold both sides to those fields. A field that one side
lacks, or shows with another default or help text, fails the test by name.
"""

import argparse
from dataclasses import MISSING

import pytest
from streamlit.testing.v1 import AppTest

from core.config import Config, specs
from core.decoding import DecodingParams
from core.evaluation import EvalConfig
from core.judge import JudgeConfig
from core.qa_generation import QAGenerationConfig
from core.quality import QualityConfig
from core.settings import WorkbenchSettings
from core.sweep import SweepConfig
from core.train_config import TrainConfig
from core.train_search import SearchConfig
from workbench import cli, ui

# A form keys each field's widget PREFIX-FIELD (workbench.forms); `keys` names the widgets keyed otherwise.
# `own`: fields a page draws its own way (a preset list, a grid, a nested form): their widget must be there,
# their default and help are the page's business.
PAGE_FORMS = {
    "training": {
        "page": "../pages/training.py",
        "cls": TrainConfig,
        "prefix": "train",
        "keys": {"dataset": "dataset", "target_modules": "train-preset"},
        "own": {"dataset", "target_modules"},
    },
    "search": {
        "page": "../pages/training.py",
        "cls": SearchConfig,
        "prefix": "search",
        # the fixed settings are a TrainConfig form of their own; the space is drawn as ranges
        "keys": {"base": "search-method", "space": "lr-lo"},
        "own": {"base", "space", "first_trials"},  # first trials are typed as lines of name=value
    },
    "sweep": {
        "page": "../pages/sweep.py",
        "cls": SweepConfig,
        "prefix": "sweep",
        "keys": {"dataset": "dataset", "grid": "sweep-grid-temperature", "baseline": "sweep-base-t"},
        "own": {"dataset", "grid", "baseline"},
    },
    "decoding": {
        "page": "../pages/sweep.py",
        "cls": DecodingParams,
        "prefix": "sweep-base",
        # the sliders keep the short keys the Playground's have always had
        "keys": {name: f"sweep-base-{suffix}" for name, (suffix, _, _) in ui.DECODING_SLIDERS.items()},
        "own": set(),
    },
    "generation": {
        "page": "../pages/dataset.py",
        "cls": QAGenerationConfig,
        "prefix": "generate",
        "keys": {"dataset": "dataset", "question_params": "generate-q-t", "answer_params": "generate-a-t"},
        "own": {"dataset", "question_params", "answer_params"},
    },
    "quality": {"page": "../pages/dataset.py", "cls": QualityConfig, "prefix": "quality", "keys": {}, "own": set()},
    "settings": {
        "page": "../pages/settings.py",
        "cls": WorkbenchSettings,
        "prefix": "settings",
        "keys": {},
        "own": set(),
    },
}

# The command whose flags set a configuration; None: whichever command has the flag.
COMMANDS = {
    TrainConfig: "train",
    SearchConfig: "train",
    SweepConfig: "sweep",
    DecodingParams: "sweep",
    QAGenerationConfig: "generate-qa",
    EvalConfig: "evaluate",
    JudgeConfig: "judge",
    QualityConfig: None,
    WorkbenchSettings: None,
}
# Fields whose flags are another configuration's: a search's fixed settings are `train`'s TrainConfig flags.
NESTED = {SearchConfig: {"base"}}
WIDGETS = ("checkbox", "toggle", "number_input", "slider", "selectbox", "multiselect", "text_input", "text_area")


def editable(cls: type) -> list:
    """The fields a user sets: those the workbench sets itself (cli=False, e.g. a search's split) are left out."""
    return [s for s in specs(cls) if s.cli]


def plain(value):
    """A default as a widget or a flag holds it: a tuple as a list of its items, a mapping as itself."""
    return [str(v) for v in value] if isinstance(value, list | tuple) else value


@pytest.fixture(scope="module")
def drawn() -> dict[str, dict]:
    """The keyed widgets of each page, drawn once (a page run under AppTest takes seconds)."""
    return {}


def page_widgets(drawn: dict, page: str) -> dict:
    if page not in drawn:
        app = AppTest.from_file("../workbench/app.py", default_timeout=60)
        app.switch_page(page).run()
        assert not app.exception, app.exception
        drawn[page] = {w.key: w for kind in WIDGETS for w in app.get(kind) if w.key}
    return drawn[page]


@pytest.mark.parametrize("form", PAGE_FORMS)
def test_every_field_has_a_widget_with_its_default_and_help(drawn, form):
    page, cls, prefix, keys, own = (PAGE_FORMS[form][k] for k in ("page", "cls", "prefix", "keys", "own"))
    widgets = page_widgets(drawn, page)
    problems = []
    for field in editable(cls):
        key = keys.get(field.name, f"{prefix}-{field.name}")
        widget = widgets.get(key)
        if widget is None:
            problems.append(f"{field.name}: no widget keyed {key!r}")
        elif field.name not in own:
            if (widget.help or "") != field.help:
                problems.append(f"{field.name}: help {widget.help!r}, the field's is {field.help!r}")
            if field.default is not MISSING and plain(widget.value) != plain(field.default):
                problems.append(f"{field.name}: shows {widget.value!r}, the default is {field.default!r}")
    assert not problems, f"{cls.__name__} on {page}: " + "; ".join(problems)


def helptext(action: argparse.Action) -> str:
    """A flag's help as printed, less its expansions: it may add to the field's text (a default, a unit)."""
    return (action.help or "").replace("%%", "%")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("cls", list(COMMANDS), ids=lambda c: c.__name__)
def test_every_field_has_a_flag_with_its_default_and_help(cls):
    commands = subcommands()
    command = COMMANDS[cls]
    parsers = [commands[command]] if command else list(commands.values())
    problems = []
    for field in editable(cls):
        if field.name in NESTED.get(cls, ()) or (isinstance(field.kind, type) and issubclass(field.kind, Config)):
            continue  # a nested configuration (a sweep's baseline): its own fields are its flags
        flags = [a for p in parsers for a in p._actions if field.flag in a.option_strings]
        if command is None:  # on whichever command: the flag that says what the field says
            flags = [a for a in flags if field.help in helptext(a)]
        if not flags:
            problems.append(f"{field.name}: no {field.flag} on {command or 'any command'}")
            continue
        flag = flags[0]
        if field.help not in helptext(flag):
            problems.append(f"{field.name}: {field.flag}'s help {flag.help!r} lacks the field's {field.help!r}")
        default = flag.default
        if field.kind in (list, tuple) and isinstance(default, str):
            default = default.split(",")
        # None: the flag leaves the field at its default (from_dict fills it in)
        if field.default is not MISSING and default is not None and plain(default) != plain(field.default):
            problems.append(f"{field.name}: {field.flag} defaults to {flag.default!r}, the field to {field.default!r}")
    assert not problems, f"{cls.__name__}: " + "; ".join(problems)
