"""Streamlit widgets built from a configuration's fields (`core.config.specs`), as the CLI builds its flags.

A field's label, help text, default, choices and range come from its metadata, so a form, a flag and a
saved file cannot disagree. A form only reads values: it returns them as a mapping for `Cls.from_dict`,
whose checks (BadInput, one line) the page shows as a banner. It never builds or checks a configuration.

Every widget is keyed KEY-FIELD (e.g. "train-learning_rate"), so a test finds a field's widget by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING
from typing import Any

import streamlit as st

from core.config import FieldSpec, spec, specs

# A list or tuple field is typed as one line; topics are written "nlp; systems", modules "q_proj,v_proj".
_SEPARATORS = re.compile(r"[;,\n]")


def label_of(name: str) -> str:
    """The label a field gets unless its page names it: learning_rate -> "Learning rate"."""
    return name.replace("_", " ").capitalize()


def widget(
    field: FieldSpec,
    value: Any = MISSING,
    key: str | None = None,
    *,
    label: str | None = None,
    slider: bool = False,
    bounds: tuple[float, float] | None = None,
    where: Any = st,
    **extra: Any,
) -> Any:
    """One widget for one field showing `value` (default: the field's default); returns what it holds.

    bool: checkbox; choices (the field's, or `options=` for choices only the page knows): selectbox; int and
    float: number_input within the field's range (a slider with `slider=True`, within `bounds` when the slider
    should be narrower than the range); str: text_input (text_area for a multi-line default or with `height=`);
    list/tuple: one line of items. An optional field may be left empty (None). `where` is a column or container;
    `extra` goes to the Streamlit widget (step, format, placeholder, format_func, ...).
    """
    value = field.default if value is MISSING else value
    value = None if value is MISSING else value  # a required field: empty until the user fills it
    common = {"help": field.help or None, "key": key}
    label = label or label_of(field.name)
    options = extra.pop("options", field.choices)
    if options is not None:
        options = list(options)
        if field.optional and None not in options:
            options.insert(0, None)
            extra.setdefault("format_func", lambda v: "—" if v is None else str(v))
        index = options.index(value) if value in options else 0
        return where.selectbox(label, options, index=index, **common, **extra)
    if field.kind is bool:
        return where.checkbox(label, bool(value), **common, **extra)
    if field.kind in (int, float):
        cast = field.kind
        lo, hi = bounds or (field.min, field.max)
        lo, hi = (None if lo is None else cast(lo)), (None if hi is None else cast(hi))
        shown = None if value is None else cast(value)
        if cast is int:  # without a whole step Streamlit takes an empty or unbounded input for a float
            extra.setdefault("step", 1)
        if slider:
            return where.slider(label, lo, hi, shown, **common, **extra)
        if field.optional:
            extra.setdefault("placeholder", "none")
        return where.number_input(label, lo, hi, shown, **common, **extra)
    if field.kind is str:
        text = "" if value is None else value
        if "\n" in text or "height" in extra:
            return where.text_area(label, text, **common, **extra)
        return where.text_input(label, text, **common, **extra)
    if field.kind in (list, tuple):
        typed = where.text_input(label, ", ".join(map(str, value or ())), **common, **extra)
        return field.kind(part.strip() for part in _SEPARATORS.split(typed) if part.strip())
    raise TypeError(f"no widget for {field.name} (a {field.kind.__name__}): its page draws it")


def config_form(
    cls: type,
    *,
    key: str,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    defaults: Any = None,
    labels: Mapping[str, str] | None = None,
    widgets: Mapping[str, Mapping[str, Any]] | None = None,
    columns: int | list[float] = 1,
    slider: bool = False,
) -> dict[str, Any]:
    """Widgets for the fields of `cls`: those named in `only` (in that order), else every field not in `skip`.

    `defaults` (an instance or a mapping, e.g. the saved settings) replaces the fields' own defaults;
    `labels` and `widgets` give a field its page's label and widget arguments (see `widget`); `columns`
    lays the widgets out side by side. Returns {field: value} for `cls.from_dict`.
    """
    skipped = set(skip)
    chosen = (
        [spec(cls, name) for name in only] if only is not None else [s for s in specs(cls) if s.name not in skipped]
    )
    places = st.columns(columns) if columns != 1 else [st]
    values = {}
    for i, field in enumerate(chosen):
        values[field.name] = widget(
            field,
            _shown(defaults, field),
            f"{key}-{field.name}",
            label=(labels or {}).get(field.name),
            slider=slider,
            where=places[i % len(places)],
            **(widgets or {}).get(field.name, {}),
        )
    return values


def _shown(defaults: Any, field: FieldSpec) -> Any:
    if defaults is None:
        return MISSING
    if isinstance(defaults, Mapping):
        return defaults.get(field.name, MISSING)
    return getattr(defaults, field.name, MISSING)
