"""A comparison of runs as one self-contained HTML file: figures, tables and the answers that differ most.

Pure rendering: the figures arrive already built (core never imports workbench or streamlit;
workbench/comparison.py fetches the data and builds them). plotly.js is embedded once, inline, so
the file opens offline; every piece of user or model text is HTML-escaped, never passed raw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

import pandas as pd
import plotly.graph_objects as go

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #212529; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #dee2e6; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border: 1px solid #dee2e6; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f1f3f5; }
article { border: 1px solid #dee2e6; border-radius: 6px; padding: 0.5rem 1rem; margin: 1rem 0; }
article h3 { font-size: 1rem; margin: 0.4rem 0; }
dt { font-weight: 600; margin-top: 0.4rem; } dd { margin-left: 1rem; white-space: pre-wrap; }
.note { background: #fff3bf; border-left: 4px solid #f08c00; padding: 0.4rem 0.8rem; margin: 0.4rem 0; }
"""


def _figure_html(fig: go.Figure, first: bool) -> str:
    # include_plotlyjs=True embeds the library inline (never "cdn": the file must open offline).
    return fig.to_html(full_html=False, include_plotlyjs=first, include_mathjax=False)


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(escape=True, index=False, na_rep="–", float_format=lambda v: f"{v:.4f}", border=0)


def _answer_html(row: pd.Series) -> str:
    """One differing question: its first column as the heading, every other column as a term and its value."""
    heading, *rest = row.index
    items = "".join(f"<dt>{escape(str(col))}</dt><dd>{escape(_cell(row[col]))}</dd>" for col in rest)
    return f"<article><h3>{escape(_cell(row[heading]))}</h3><dl>{items}</dl></article>"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "–" if value != value else f"{value:.4f}"
    return str(value)


def render_report(
    title: str,
    figures: Sequence[go.Figure],
    tables: Mapping[str, pd.DataFrame],
    differing_answers: pd.DataFrame,
    notes: Sequence[str] = (),
) -> str:
    """The whole HTML page: its notes (e.g. optimistic comparisons) under the title, figures in order, then
    each titled table, then one card per differing answer."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    parts += [f'<p class="note">{escape(note)}</p>' for note in notes]
    parts += [_figure_html(fig, first=i == 0) for i, fig in enumerate(figures)]
    for name, frame in tables.items():
        parts += [f"<h2>{escape(name)}</h2>", _table_html(frame)]
    parts.append(f"<h2>Questions where the runs differ most ({len(differing_answers)})</h2>")
    parts += [_answer_html(row) for _, row in differing_answers.iterrows()]
    parts.append("</body></html>")
    return "\n".join(parts)
