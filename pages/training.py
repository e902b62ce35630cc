"""Training: fine-tune LoRA/QLoRA adapters from a button, search their hyperparameters, evaluate and export.

Runs and searches are background jobs (their own processes): the loss curve, trials, progress
and log come back from the store, so a reload or an app restart finds them intact. One
training job (a search counts as one) runs at a time on this machine; others wait in the queue
shown here. The forms refuse bad settings before any process starts.
"""

from pathlib import Path

import streamlit as st

from core import evaluation, jobs, runs, train_search, training
from core.decoding import field_help
from core.errors import NotFound
from core.train_config import ALL_LINEAR, EVAL_ENGINES, METHODS, SCHEDULERS, TrainConfig
from core.train_search import SearchConfig, SearchSpace
from workbench import figures, ui

TARGET_PRESETS = {
    "attention q, v (the study's QLoRA)": ("q_proj", "v_proj"),
    "all linear layers": ALL_LINEAR,
    "custom": None,
}
RANK_CHOICES = [2, 4, 8, 16, 32, 64, 128]
ALPHA_CHOICES = [4, 8, 16, 32, 64, 128, 256]

st.title("Training")
store = ui.store()
name = ui.dataset_picker()
if name is None:
    st.stop()
ui.show_flashes()
DEFAULTS = TrainConfig(dataset=name)
SPACE = SearchSpace()


def helptext(field: str) -> str:
    return field_help(TrainConfig, field)


def baseline_choices() -> dict[int | None, str]:
    """Scored runs without an adapter on this dataset: their decoding parameters can be reused at evaluation."""
    choices: dict[int | None, str] = {None: "greedy decoding (no baseline run)"}
    for s in reversed(runs.list_runs(store)):
        if s.run.dataset == name and not s.run.adapter and s.mean_f1 is not None:
            choices[s.run.id] = f"run {s.run.id} · {runs.describe_params(s.run.params)} · mean F1 {s.mean_f1:.3f}"
    return choices


BASELINES = baseline_choices()  # once per rerun: every form offers the same runs


# ---- form parts (both forms draw them, under their own keys) --------------------------------------------


def model_settings(key: str) -> dict:
    """What is trained and on what: method, base model, target modules, pairs."""
    c1, c2, c3, c4 = st.columns([1, 2, 2, 1])
    method = c1.selectbox("Method", METHODS, help=helptext("method"), key=f"{key}-method")
    model = c2.text_input(
        "Base model", "", placeholder="embedded Gemma 3 270M", help=helptext("model"), key=f"{key}-model"
    )
    preset = c3.selectbox(
        "LoRA target modules", list(TARGET_PRESETS), help=helptext("target_modules"), key=f"{key}-preset"
    )
    custom = c3.text_input("Custom target modules", "", placeholder="q_proj,k_proj,o_proj", key=f"{key}-custom")
    limit = c4.number_input("Pairs (0 = all)", 0, 1_000_000, 0, help=helptext("limit"), key=f"{key}-limit")
    targets = TARGET_PRESETS[preset] or tuple(t.strip() for t in custom.split(",") if t.strip())
    return {"method": method, "model": model.strip(), "target_modules": targets, "limit": int(limit) or None}


def loop_settings(key: str) -> dict:
    """How the loop runs: batches, schedule, sequence length, seed, checkpointing, prompt template."""
    c1, c2, c3, c4, c5, c6 = st.columns(6)
    values = {
        "batch_size": c1.number_input(
            "Batch size", 1, 512, DEFAULTS.batch_size, help=helptext("batch_size"), key=f"{key}-batch"
        ),
        "grad_accum": c2.number_input(
            "Grad. accumulation", 1, 512, DEFAULTS.grad_accum, help=helptext("grad_accum"), key=f"{key}-accum"
        ),
        "scheduler": c3.selectbox("Scheduler", SCHEDULERS, help=helptext("scheduler"), key=f"{key}-scheduler"),
        "warmup_ratio": c4.number_input(
            "Warmup ratio", 0.0, 0.99, DEFAULTS.warmup_ratio, step=0.01, help=helptext("warmup_ratio"), key=f"{key}-wu"
        ),
        "max_seq_len": c5.number_input(
            "Max sequence length", 8, 32768, DEFAULTS.max_seq_len, help=helptext("max_seq_len"), key=f"{key}-len"
        ),
        "seed": c6.number_input("Seed", 0, 2**31 - 1, DEFAULTS.seed, help=helptext("seed"), key=f"{key}-seed"),
    }
    values["gradient_checkpointing"] = st.checkbox(
        "Gradient checkpointing",
        DEFAULTS.gradient_checkpointing,
        help=helptext("gradient_checkpointing"),
        key=f"{key}-checkpointing",
    )
    values["prompt_template"] = st.text_area(
        "Prompt template (training and evaluation use the same one)",
        DEFAULTS.prompt_template,
        height=80,
        help=helptext("prompt_template"),
        key=f"{key}-template",
    )
    return values


def evaluation_settings(key: str) -> dict:
    c1, c2, c3 = st.columns([2, 5, 2])
    engine = c1.selectbox("Evaluate with", EVAL_ENGINES, help=helptext("evaluate_with"), key=f"{key}-engine")
    choices = BASELINES
    baseline = c2.selectbox(
        "Decoding parameters at evaluation",
        list(choices),
        format_func=choices.get,
        help=helptext("eval_baseline_run"),
        key=f"{key}-baseline",
    )
    merged = c3.checkbox("Export merged GGUF", True, help=helptext("export_merged"), key=f"{key}-merged")
    return {"evaluate_with": engine, "eval_baseline_run": baseline, "export_merged": merged}


def adapter_settings() -> dict:
    """The settings a search varies, as single values (the training form)."""
    c1, c2, c3, c4, c5 = st.columns(5)
    return {
        "learning_rate": c1.number_input(
            "Learning rate", 0.0, 1.0, DEFAULTS.learning_rate, format="%.2e", step=1e-5, help=helptext("learning_rate")
        ),
        "lora_r": c2.number_input("LoRA r", 0, 1024, DEFAULTS.lora_r, help=helptext("lora_r")),
        "lora_alpha": c3.number_input(
            "LoRA alpha", 0.0, 4096.0, float(DEFAULTS.lora_alpha), help=helptext("lora_alpha")
        ),
        "lora_dropout": c4.number_input(
            "LoRA dropout", 0.0, 0.99, DEFAULTS.lora_dropout, step=0.01, help=helptext("lora_dropout")
        ),
        "epochs": c5.number_input("Epochs", 0, 100, DEFAULTS.epochs, help=helptext("epochs")),
    }


def search_ranges() -> SearchSpace:
    """The settings a search varies, as ranges and choices (the search form)."""
    space_help = {f: field_help(SearchSpace, f) for f in ("learning_rate", "lora_r", "lora_alpha", "lora_dropout")}
    c1, c2, c3, c4, c5, c6 = st.columns(6)
    lr_low = c1.number_input(
        "Learning rate from", 0.0, 1.0, SPACE.learning_rate[0], format="%.1e", step=1e-5, key="lr-lo"
    )
    lr_high = c2.number_input(
        "to", 0.0, 1.0, SPACE.learning_rate[1], format="%.1e", step=1e-5, help=space_help["learning_rate"], key="lr-hi"
    )
    drop_low = c3.number_input("Dropout from", 0.0, 0.99, SPACE.lora_dropout[0], step=0.01, key="drop-lo")
    drop_high = c4.number_input(
        "to", 0.0, 0.99, SPACE.lora_dropout[1], step=0.01, help=space_help["lora_dropout"], key="drop-hi"
    )
    ep_low = c5.number_input("Epochs from", 0, 100, SPACE.epochs[0], key="ep-lo")
    ep_high = c6.number_input("to", 0, 100, SPACE.epochs[1], help=field_help(SearchSpace, "epochs"), key="ep-hi")
    c1, c2 = st.columns(2)
    ranks = c1.multiselect("LoRA r choices", RANK_CHOICES, list(SPACE.lora_r), help=space_help["lora_r"])
    alphas = c2.multiselect("LoRA alpha choices", ALPHA_CHOICES, list(SPACE.lora_alpha), help=space_help["lora_alpha"])
    return SearchSpace(
        learning_rate=(lr_low, lr_high),
        lora_r=tuple(sorted(ranks)),
        lora_alpha=tuple(float(a) for a in sorted(alphas)),
        lora_dropout=(drop_low, drop_high),
        epochs=(int(ep_low), int(ep_high)),
    )


def start_train_form(expanded: bool) -> None:
    with st.expander("New training run", expanded=expanded), st.form("train"):
        values = {**adapter_settings(), **model_settings("train"), **loop_settings("train")}
        values |= evaluation_settings("train")
        go = st.form_submit_button("Start training", type="primary", icon=":material/play_arrow:")
    if go:
        config = TrainConfig(dataset=name, **values)
        if (job_id := ui.attempt(lambda: training.start_training(store, config))) is not None:
            st.session_state["train_job"] = job_id
            st.rerun()


def start_search_form(expanded: bool) -> None:
    with st.expander("New hyperparameter search", expanded=expanded), st.form("search"):
        st.markdown("**Searched** (each trial draws its own values)")
        space = search_ranges()
        c1, c2, c3, c4, c5 = st.columns(5)
        trials = c1.number_input("Trials", 1, 1000, 10, help=field_help(SearchConfig, "trials"))
        workers = c2.number_input("Worker processes", 1, 16, 1, help=field_help(SearchConfig, "workers"))
        objective = c3.selectbox(
            "Score trials by", list(train_search.OBJECTIVES), help=field_help(SearchConfig, "objective")
        )
        folds = c4.number_input("Folds (0 = validation part)", 0, 20, 0, help=field_help(SearchConfig, "folds"))
        startup = c5.number_input(
            "Prune after trials", 0, 100, 2, help=field_help(SearchConfig, "prune_startup_trials")
        )
        st.markdown("**Fixed** (every trial and the final training)")
        base = {**model_settings("search"), **loop_settings("search"), **evaluation_settings("search")}
        go = st.form_submit_button("Start search", type="primary", icon=":material/travel_explore:")
    if go:
        config = SearchConfig(
            base=TrainConfig(dataset=name, **base).to_dict(),
            trials=int(trials),
            workers=int(workers),
            objective=objective,
            folds=int(folds),
            space=space,
            prune_startup_trials=int(startup),
        )
        if (job_id := ui.attempt(lambda: train_search.start_search(store, config))) is not None:
            st.session_state["search_job"] = job_id
            st.rerun()


def pick_job(label: str, choices: list[jobs.JobInfo], state_key: str, describe) -> int:
    """A job picker that shows a job just started (show_job) instead of keeping the earlier choice."""
    ids = [j.id for j in choices]
    if (started := st.session_state.pop(state_key, None)) in ids:  # a keyed widget ignores index= once set
        st.session_state[f"pick-{state_key}"] = started
    return st.selectbox(
        label, ids, format_func=lambda i: describe(next(j for j in choices if j.id == i)), key=f"pick-{state_key}"
    )


# ---- a training run -------------------------------------------------------------------------------------


def live_run(job_id: int) -> None:
    @st.fragment(run_every=2.0)
    def curve() -> None:
        metrics = training.metrics_frame(store, job_id)
        latest = {n: g.iloc[-1] for n, g in metrics.groupby("name")} if not metrics.empty else {}
        tiles = st.columns(6)
        if "train_loss" in latest:
            first = metrics[metrics["name"] == "train_loss"].iloc[0]["value"]
            row = latest["train_loss"]
            tiles[0].metric(
                "Step", f"{int(row['step'])}", f"epoch {row['epoch']:.2f}", delta_color="off", delta_arrow="off"
            )
            tiles[1].metric("Train loss", f"{row['value']:.4f}", f"{row['value'] - first:+.4f} since step 1", "inverse")
        if "eval_loss" in latest:
            evals = metrics[metrics["name"] == "eval_loss"]["value"]
            change = f"{evals.iloc[-1] - evals.iloc[0]:+.4f} since start" if len(evals) > 1 else "before training"
            tiles[2].metric("Eval loss", f"{evals.iloc[-1]:.4f}", change, "inverse")
        if "learning_rate" in latest:
            tiles[3].metric("Learning rate", f"{latest['learning_rate']['value']:.2e}")
        if "tokens_per_s" in latest:
            tiles[4].metric("Tokens/s", f"{latest['tokens_per_s']['value']:,.0f}")
        if "peak_memory_mb" in latest:
            tiles[5].metric("Peak memory", f"{latest['peak_memory_mb']['value'] / 1024:.2f} GB")
        job_figures = jobs.get(store, job_id).figures
        if "eval_note" in job_figures:  # instead of an eval curve: why there is none
            st.info(ui.plain(f"No eval loss: {job_figures['eval_note']}"), icon=":material/info:")
        if metrics.empty:
            st.caption("The loss curve appears once the model is loaded and the validation part evaluated.")
        else:
            st.plotly_chart(figures.loss_curve(metrics), width="stretch", key=f"loss-{job_id}")
        stage = job_figures.get("stage")
        if stage in ("exporting", "evaluating"):
            st.caption(f"Stage: {stage} …")

    curve()


def evaluation_section(job_id: int, out: str, eval_run_id: int | None) -> None:
    st.subheader("Evaluation")
    if eval_run_id:
        scored = next((s for s in runs.list_runs(store) if s.run.id == eval_run_id), None)
        if scored and scored.mean_f1 is not None:
            st.markdown(
                f"Run **{eval_run_id}**: {scored.n_scored} answers, mean BERTScore F1 **{scored.mean_f1:.3f}**, "
                f"median {scored.median_f1:.3f}."
            )
            st.page_link(
                Path(__file__).with_name("compare.py"),
                label="Compare it with other runs",
                icon=":material/compare_arrows:",
            )
    with st.form(f"evaluate-{job_id}"):
        c1, c2, c3 = st.columns([1, 3, 1])
        engine = c1.selectbox("Engine", evaluation.ENGINES, help=field_help(evaluation.EvalConfig, "backend"))
        choices = BASELINES
        baseline = c2.selectbox("Decoding parameters", list(choices), format_func=choices.get)
        limit = c3.number_input("Questions (0 = all)", 0, 100_000, 0)
        if st.form_submit_button("Evaluate again", icon=":material/fact_check:"):
            config = evaluation.EvalConfig(
                train_dir=out, backend=engine, baseline_run=baseline, limit=int(limit) or None
            )
            ui.attempt(lambda: evaluation.start_evaluation(store, config), "evaluation started; see the Jobs page")


def export_section(out: Path) -> None:
    export_dir = out / "export"
    st.subheader("Export")
    st.caption(ui.plain(f"Folder: {export_dir}"))
    st.dataframe(
        [
            {"file": p.name, "size": _size(p)}
            for p in sorted(export_dir.iterdir())
            if not p.name.endswith((".part", ".tmp")) and p.name != "merged-hf"  # an export's work in progress
        ],
        hide_index=True,
        column_config={"size": st.column_config.NumberColumn(format="bytes")},
    )
    if (modelfile := export_dir / "Modelfile").exists():
        st.markdown("**Into Ollama**: the merged model (Ollama's own engine does not apply LoRA adapters).")
        st.code((export_dir / "ollama-create.txt").read_text().strip(), language="bash")
        with st.expander("Modelfile"):
            st.code(modelfile.read_text(), language=None)
    st.markdown("**Into llama.cpp**: `Llama(model_path=<base GGUF>, lora_path=<export>/adapter.gguf)`")

    def zipped() -> bytes:
        from core import export

        return export.zip_export(out).read_bytes()

    st.download_button(
        "Download all (zip)",
        zipped,
        file_name=f"{out.name}.zip",
        mime="application/zip",
        icon=":material/download:",
        on_click="ignore",
    )


def _size(path: Path) -> int:
    """Bytes in a file or folder; 0 for what an export still running renames or removes meanwhile."""
    try:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    except FileNotFoundError:
        return 0


def show_runs(train_jobs: list[jobs.JobInfo]) -> None:
    def describe(job: jobs.JobInfo) -> str:
        p = job.params
        return f"job {job.id} · {job.state} · {p.get('method')} r={p.get('lora_r')} lr={p.get('learning_rate'):g}"

    job_id = pick_job("Training run", train_jobs, "train_job", describe)
    ui.job_panel(job_id, log_lines=8, figures=False)  # the tiles below show them
    job = jobs.get(store, job_id)
    if how := job.params.get("selection", {}).get("how"):
        st.caption(ui.plain(f"Settings chosen: {how}."))
    live_run(job_id)
    out = job.figures.get("output_dir")
    if out and (Path(out) / "adapter" / "adapter_config.json").exists():
        evaluation_section(job_id, out, job.figures.get("eval_run_id"))
        if (Path(out) / "export").is_dir():
            export_section(Path(out))


# ---- a search ------------------------------------------------------------------------------------------


@st.cache_data(max_entries=64, show_spinner=False)
def cached_importances(job_id: int, completed: int) -> dict[str, float]:
    """fANOVA fits a random forest: once per new completed trial, not on every refresh of every viewer."""
    return train_search.param_importances(ui.store(), job_id)


def show_searches(search_jobs: list[jobs.JobInfo]) -> None:
    def describe(job: jobs.JobInfo) -> str:
        p = job.params
        folds = f", {p['folds']}-fold cross-validation" if p.get("folds") else ""
        return f"job {job.id} · {job.state} · {p.get('trials')} trials by {p.get('objective')}{folds}"

    job_id = pick_job("Search", search_jobs, "search_job", describe)
    ui.job_panel(job_id, log_lines=8)
    objective = next(j for j in search_jobs if j.id == job_id).params.get("objective", "eval_loss")

    @st.fragment(run_every=3.0)
    def results() -> None:
        trials = train_search.study_trials(store, job_id)
        if trials.empty:
            st.caption("Trials appear here as the workers start them.")
            return
        st.dataframe(
            trials.drop(columns=["output_dir", "worker_pid"]),
            hide_index=True,
            column_config={
                "value": st.column_config.NumberColumn(objective, format="%.4f"),
                "learning_rate": st.column_config.NumberColumn("learning rate", format="%.2e"),
                "lora_dropout": st.column_config.NumberColumn("dropout", format="%.3f"),
                "seconds": st.column_config.NumberColumn(format="%.0f"),
            },
        )
        left, right = st.columns(2)
        history = train_search.history(store, job_id)
        if not history.empty:
            left.plotly_chart(figures.search_history(history, objective), width="stretch", key=f"history-{job_id}")
        importances = cached_importances(job_id, int((trials["state"] == "complete").sum()))
        if importances:
            right.plotly_chart(figures.param_importances(importances), width="stretch", key=f"imp-{job_id}")
        else:
            right.caption("Parameter importances need at least two completed trials.")

    results()
    try:
        best = train_search.best_params(store, job_id)
    except NotFound:
        return
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items())
    st.markdown(ui.plain(f"Best so far: {shown}"))
    if st.button("Train with the best parameters", type="primary", icon=":material/play_arrow:"):
        final = ui.attempt(lambda: training.start_training(store, train_search.final_config(store, job_id)))
        if final is not None:
            st.session_state["train_job"] = final
            ui.flash(f"training job {final} started with the best parameters: see the Train tab")
            st.rerun()


# ---- the page ------------------------------------------------------------------------------------------

device_queue = [j for j in jobs.list_jobs(store) if j.kind in jobs.DEVICE_KINDS and j.state in jobs.ACTIVE]
if len(device_queue) > 1:
    st.caption("Device queue (one training job at a time on this machine; the others wait):")
    st.dataframe(
        [{"job": j.id, "kind": j.kind, "state": j.state, "message": j.message} for j in reversed(device_queue)],
        hide_index=True,
    )

train_tab, search_tab = st.tabs(["Train", "Search hyperparameters"])
with train_tab:
    train_jobs = [j for j in jobs.list_jobs(store, kind="train") if j.params.get("dataset") == name]
    start_train_form(expanded=not train_jobs)
    if train_jobs:
        show_runs(train_jobs)
    else:
        st.info("No training run on this dataset yet: start one above.")
with search_tab:
    search_jobs = [
        j for j in jobs.list_jobs(store, kind="train-search") if j.params.get("base", {}).get("dataset") == name
    ]
    start_search_form(expanded=not search_jobs)
    if search_jobs:
        show_searches(search_jobs)
    else:
        st.info("No hyperparameter search on this dataset yet: start one above.")
