"""Every plotly figure the pages draw, one builder per chart kind, so the same data always looks the same.

Score histograms share bins and axes across runs, so distributions can be compared by eye.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#1098ad", "#f08c00", "#5c940d"]
F1_RANGE = (0.0, 1.0)


def _layout(fig: go.Figure, height: int) -> go.Figure:
    fig.update_layout(
        height=height,
        margin={"l": 40, "r": 10, "t": 40, "b": 40},
        template="plotly_white",
        font={"size": 12},
        bargap=0.05,
    )
    return fig


def score_histograms(
    scores: Mapping[str, Sequence[float]],
    metric: str = "F1",
    bins: int = 20,
    value_range: tuple[float, float] = F1_RANGE,
    columns: int = 3,
) -> go.Figure:
    """Small multiples: one histogram per run, identical bins and axes, the mean marked."""
    names = list(scores)
    cols = max(1, min(columns, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=names,
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.04,
        vertical_spacing=0.12,
    )
    size = (value_range[1] - value_range[0]) / bins
    for i, name in enumerate(names):
        values = np.asarray([v for v in scores[name] if v == v], dtype=float)
        row, col = i // cols + 1, i % cols + 1
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(
            go.Histogram(
                x=values,
                xbins={"start": value_range[0], "end": value_range[1], "size": size},
                marker_color=color,
                name=name,
                showlegend=False,
                hovertemplate=f"{metric} %{{x}}<br>answers %{{y}}<extra>{name}</extra>",
            ),
            row=row,
            col=col,
        )
        if len(values):
            fig.add_vline(x=float(values.mean()), line_dash="dash", line_color="#495057", row=row, col=col)
    fig.update_xaxes(range=list(value_range), title_text=metric, row=rows)
    fig.update_yaxes(rangemode="tozero")
    fig.update_yaxes(title_text="answers", col=1)
    return _layout(fig, 260 * rows + 40)


def mean_with_ci(table, parameter: str, others: Sequence[str] = (), metric: str = "mean F1") -> go.Figure:
    """Mean score with its 95% confidence interval against one parameter; one line per setting of the others."""
    fig = go.Figure()
    groups = table.groupby(list(others), dropna=False) if others else [((), table)]
    for i, (key, group) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        name = " ".join(f"{o}={v}" for o, v in zip(others, key)) or metric
        ordered = group.sort_values(parameter)
        fig.add_trace(
            go.Scatter(
                x=ordered[parameter],
                y=ordered["mean_f1"],
                mode="markers+lines",
                name=name,
                marker={"size": 9, "color": PALETTE[i % len(PALETTE)]},
                line={"color": PALETTE[i % len(PALETTE)]},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": ordered["ci_high"] - ordered["mean_f1"],
                    "arrayminus": ordered["mean_f1"] - ordered["ci_low"],
                },
                hovertemplate=f"{parameter} %{{x}}<br>{metric} %{{y:.4f}}<extra>{name}</extra>",
            )
        )
    fig.update_layout(
        title=f"{metric} by {parameter} (95% CI)", xaxis_title=parameter, yaxis_title=metric, showlegend=bool(others)
    )
    return _layout(fig, 340)


def overlaid_histograms(
    scores: Mapping[str, Sequence[float]],
    metric: str = "F1",
    bins: int = 20,
    value_range: tuple[float, float] = F1_RANGE,
    mode: str = "histogram",
) -> go.Figure:
    """All runs on one axis: semi-transparent histograms with the same bins ("histogram", counts;
    "density", areas of 1 so runs of different sizes compare), or empirical CDFs ("ecdf")."""
    if mode not in ("histogram", "density", "ecdf"):
        raise ValueError(f"mode must be histogram, density or ecdf, got {mode!r}")
    fig = go.Figure()
    size = (value_range[1] - value_range[0]) / bins
    for i, (name, run_scores) in enumerate(scores.items()):
        values = np.sort(np.asarray([v for v in run_scores if v == v], dtype=float))
        color = PALETTE[i % len(PALETTE)]
        if mode == "ecdf":
            fig.add_trace(
                go.Scatter(
                    x=values,
                    y=np.arange(1, len(values) + 1) / max(len(values), 1),
                    mode="lines",
                    line={"color": color, "shape": "hv"},
                    name=name,
                    hovertemplate=f"{metric} ≤ %{{x:.4f}}<br>share %{{y:.2f}}<extra>{name}</extra>",
                )
            )
            continue
        fig.add_trace(
            go.Histogram(
                x=values,
                xbins={"start": value_range[0], "end": value_range[1], "size": size},
                histnorm="probability density" if mode == "density" else "",
                marker_color=color,
                opacity=0.55,
                name=name,
                hovertemplate=f"{metric} %{{x}}<br>%{{y}}<extra>{name}</extra>",
            )
        )
    y_title = {"histogram": "answers", "density": "density", "ecdf": "share of answers ≤ x"}[mode]
    fig.update_layout(barmode="overlay", xaxis_title=metric, yaxis_title=y_title, legend_title_text="run")
    fig.update_xaxes(range=list(value_range))
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, 360)


def score_boxes(scores: Mapping[str, Sequence[float]], metric: str = "F1", kind: str = "box") -> go.Figure:
    """One box (quartiles, whiskers, outliers) or violin (with its box) per run, side by side."""
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be box or violin, got {kind!r}")
    fig = go.Figure()
    for i, (name, run_scores) in enumerate(scores.items()):
        values = [v for v in run_scores if v == v]
        color = PALETTE[i % len(PALETTE)]
        if kind == "violin":
            trace = go.Violin(y=values, name=name, line_color=color, box_visible=True, meanline_visible=True)
        else:
            trace = go.Box(y=values, name=name, marker_color=color, boxmean=True)
        fig.add_trace(trace)
    fig.update_layout(yaxis_title=metric, showlegend=False)
    return _layout(fig, 360)


def loss_curve(metrics) -> go.Figure:
    """Training loss per optimizer step, eval loss per epoch (markers), learning rate on a second axis.

    `metrics` has columns step, epoch, name, value (one row per recorded figure).
    """
    fig = make_subplots(specs=[[{"secondary_y": True}]])

    def series(name: str) -> Any:
        return metrics[metrics["name"] == name].sort_values("step")

    def trace(frame: Any, label: str, hover: str, **style: Any) -> go.Scatter:
        return go.Scatter(
            x=frame["step"], y=frame["value"], name=label, customdata=frame["epoch"], hovertemplate=hover, **style
        )

    train, evals, lr = series("train_loss"), series("eval_loss"), series("learning_rate")
    train_hover = "step %{x} (epoch %{customdata:.2f})<br>train loss %{y:.4f}<extra></extra>"
    train_mode = "lines+markers" if len(train) < 60 else "lines"
    fig.add_trace(trace(train, "train loss", train_hover, mode=train_mode, line={"color": PALETTE[0]}))
    eval_hover = "after epoch %{customdata:.0f} (step %{x})<br>eval loss %{y:.4f}<extra></extra>"
    eval_style = {
        "marker": {"size": 10, "symbol": "diamond", "color": PALETTE[1]},
        "line": {"color": PALETTE[1], "dash": "dot"},
    }
    fig.add_trace(trace(evals, "eval loss (validation part)", eval_hover, mode="lines+markers", **eval_style))
    lr_hover = "step %{x}<br>learning rate %{y:.2e}<extra></extra>"
    lr_line = {"color": "#adb5bd", "width": 1}
    fig.add_trace(trace(lr, "learning rate", lr_hover, mode="lines", line=lr_line), secondary_y=True)
    fig.update_xaxes(title_text="optimizer step", rangemode="tozero")
    fig.update_yaxes(title_text="loss (answer tokens)", secondary_y=False)
    top = float(lr["value"].max()) * 1.05 if len(lr) else 1.0
    fig.update_yaxes(title_text="learning rate", secondary_y=True, showgrid=False, exponentformat="e", range=[0, top])
    fig.update_layout(legend={"orientation": "h", "y": 1.12, "x": 0})
    return _layout(fig, 380)


def preference_curve(metrics) -> go.Figure:
    """DPO's reward margin per optimizer step (left axis) and its preference accuracy (right axis, 0-1), with the
    validation triples' figures per epoch as markers. `metrics` as for loss_curve."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for name, label, color, secondary in (
        ("reward_margin", "reward margin", PALETTE[0], False),
        ("preference_accuracy", "preference accuracy", PALETTE[2], True),
        ("eval_reward_margin", "reward margin (validation)", PALETTE[0], False),
        ("eval_preference_accuracy", "preference accuracy (validation)", PALETTE[2], True),
    ):
        frame = metrics[metrics["name"] == name].sort_values("step")
        held_out = name.startswith("eval_")
        style: dict[str, Any] = (
            {"mode": "lines+markers", "marker": {"size": 10, "symbol": "diamond"}, "line": {"dash": "dot"}}
            if held_out
            else {"mode": "lines+markers" if len(frame) < 60 else "lines"}
        )
        style.setdefault("line", {})["color"] = color
        fig.add_trace(
            go.Scatter(
                x=frame["step"],
                y=frame["value"],
                name=label,
                hovertemplate=f"step %{{x}}<br>{label} %{{y:.3f}}<extra></extra>",
                **style,
            ),
            secondary_y=secondary,
        )
    fig.update_xaxes(title_text="optimizer step", rangemode="tozero")
    fig.update_yaxes(title_text="reward margin (chosen − rejected)", secondary_y=False)
    fig.update_yaxes(
        title_text="preference accuracy",
        secondary_y=True,
        range=[0, 1.02],
        tickvals=[0, 0.25, 0.5, 0.75, 1],
        tickformat=".0%",
        showgrid=False,
    )
    fig.update_layout(legend={"orientation": "h", "y": 1.12, "x": 0})
    return _layout(fig, 340)


def search_history(history, objective: str) -> go.Figure:
    """Each finished trial's value (pruned ones hollow, at their last reported value) and the best so far.

    `history` has columns number, state, value, best (core.train_search.history).
    """
    fig = go.Figure()
    for state, symbol, color in (("complete", "circle", PALETTE[0]), ("pruned", "circle-open", "#868e96")):
        rows = history[history["state"] == state]
        fig.add_trace(
            go.Scatter(
                x=rows["number"],
                y=rows["value"],
                mode="markers",
                name=f"{state} trial",
                marker={"symbol": symbol, "size": 10, "color": color},
                hovertemplate=f"trial %{{x}} ({state})<br>{objective} %{{y:.4f}}<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=history["number"],
            y=history["best"],
            mode="lines",
            line={"shape": "hv", "color": PALETTE[1]},
            name="best so far",
            hovertemplate="after trial %{x}<br>best %{y:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="trial", dtick=1, rangemode="tozero")
    fig.update_yaxes(title_text=objective.replace("_", " "))
    fig.update_layout(title="Optimisation history", legend={"orientation": "h", "y": -0.25, "x": 0})
    return _layout(fig, 340)


def param_importances(importances: Mapping[str, float]) -> go.Figure:
    """Horizontal bars, the most important setting on top (Optuna's fANOVA importance, summing to 1)."""
    ranked = sorted(importances.items(), key=lambda kv: kv[1])
    fig = go.Figure(
        go.Bar(
            x=[v for _, v in ranked],
            y=[k.replace("_", " ") for k, _ in ranked],
            orientation="h",
            marker_color=PALETTE[0],
            text=[f"{v:.2f}" for _, v in ranked],
            textposition="auto",
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="importance", range=[0, 1])
    fig.update_layout(title="Parameter importances")
    return _layout(fig, 340)
