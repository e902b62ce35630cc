"""Training: fine-tune LoRA/QLoRA adapters from a button, search their hyperparameters, evaluate and export.

Runs and searches are background jobs (their own processes): the loss curve, trials, progress
and log come back from the store, so a reload or an app restart finds them intact. One
training job (a search counts as one) runs at a time on this machine; others wait in the queue
shown here. The forms are built from the configurations' fields (workbench.forms) and refuse bad
settings before any process starts. What a job left (adapter, export) comes from core.train_results.
"""

from pathlib import Path

import streamlit as st

from core import evaluation, jobs, preferences, runs, train_results, train_search, training
from core.config import spec, specs
from core.errors import NotFound
from core.train_config import ALL_LINEAR, TrainConfig
from core.train_search import SearchConfig, SearchSpace
from workbench import figures, forms, ui

TARGET_PRESETS = {
    "attention q, v (the study's QLoRA)": ("q_proj", "v_proj"),
    "all linear layers": ALL_LINEAR,
    "custom": None,
}
RANK_CHOICES = [2, 4, 8, 16, 32, 64, 128]
ALPHA_CHOICES = [4, 8, 16, 32, 64, 128, 256]
# The labels these fields have always had on this page (users, and the browser tests, find them by these).
LABELS = {
    "method": "Method",
    "model": "Base model",
    "part": "Train on",
    "limit": "Pairs (empty = all)",
    "learning_rate": "Learning rate",
    "lora_r": "LoRA r",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "grad_accum": "Grad. accumulation",
    "max_seq_len": "Max sequence length",
    "prompt_template": "Prompt template (training and evaluation use the same one)",
    "evaluate_with": "Evaluate with",
    "eval_baseline_run": "Decoding parameters at evaluation",
    "export_merged": "Export merged GGUF",
    "output_dir": "Output folder",
    "dpo_base": "DPO base weights",
    "beta": "DPO beta",
    "from_adapter": "Start from adapter",
    "trials": "Trials",
    "workers": "Worker processes",
    "objective": "Score trials by",
    "folds": "Folds (0 = validation part)",
    "prune_startup_trials": "Prune after trials",
    "prune_warmup_epochs": "Train before pruning (epochs)",
    "storage": "Optuna storage",
}


def baseline_choices(name: str) -> dict[int | None, str]:
    """Scored runs without an adapter on this dataset: their decoding parameters can be reused at evaluation."""
    choices: dict[int | None, str] = {None: "greedy decoding (no baseline run)"}
    for s in reversed(runs.list_runs(ui.store())):
        if s.run.dataset == name and not s.run.adapter and s.mean_f1 is not None:
            choices[s.run.id] = f"run {s.run.id} · {runs.describe_params(s.run.params)} · mean F1 {s.mean_f1:.3f}"
    return choices


def picked(choices: dict) -> dict:
    """Widget arguments for a field whose choices are runs: their ids, shown by their description."""
    return {"options": list(choices), "format_func": choices.get}


# ---- form parts (both forms draw them, under their own keys) --------------------------------------------


def model_settings(key: str) -> dict:
    """What is trained and on what: method, base model, target modules, pairs."""
    c1, c2, c3, c4 = st.columns([1, 2, 2, 1])
    values = {
        "method": forms.widget(spec(TrainConfig, "method"), key=f"{key}-method", label=LABELS["method"], where=c1),
        "model": forms.widget(
            spec(TrainConfig, "model"),
            key=f"{key}-model",
            label=LABELS["model"],
            where=c2,
            placeholder="Settings' generator model, else embedded Gemma 3 270M",
        ),
    }
    targets = spec(TrainConfig, "target_modules")
    preset = c3.selectbox("LoRA target modules", list(TARGET_PRESETS), help=targets.help, key=f"{key}-preset")
    custom = c3.text_input("Custom target modules", "", placeholder="q_proj,k_proj,o_proj", key=f"{key}-custom")
    values["target_modules"] = TARGET_PRESETS[preset] or tuple(t.strip() for t in custom.split(",") if t.strip())
    for name in ("limit", "part"):
        values[name] = forms.widget(spec(TrainConfig, name), key=f"{key}-{name}", label=LABELS[name], where=c4)
    values["model"] = values["model"].strip()
    return values


def loop_settings(key: str) -> dict:
    """How the loop runs: batches, schedule, sequence length, seed, checkpointing, prompt template."""
    values = forms.config_form(
        TrainConfig,
        key=key,
        only=("batch_size", "grad_accum", "scheduler", "warmup_ratio", "max_seq_len", "seed"),
        labels=LABELS,
        widgets={"warmup_ratio": {"step": 0.01}},
        columns=6,
    )
    return values | forms.config_form(
        TrainConfig,
        key=key,
        only=("gradient_checkpointing", "prompt_template"),
        labels=LABELS,
        widgets={"prompt_template": {"height": 80}},
    )


def evaluation_settings(key: str, baselines: dict) -> dict:
    return forms.config_form(
        TrainConfig,
        key=key,
        only=("evaluate_with", "eval_baseline_run", "export_merged"),
        labels=LABELS,
        widgets={"eval_baseline_run": picked(baselines)},
        columns=[2, 5, 2],
    )


def adapter_settings() -> dict:
    """The settings a search varies, as single values (the training form)."""
    return forms.config_form(
        TrainConfig,
        key="train",
        only=("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "epochs"),
        labels=LABELS,
        widgets={"learning_rate": {"format": "%.2e", "step": 1e-5}, "lora_dropout": {"step": 0.01}},
        columns=5,
    )


def search_ranges() -> dict:
    """The settings a search varies, as ranges and choices (the search form); a SearchSpace mapping."""
    space, helps = SearchSpace(), {s.name: s.help for s in specs(SearchSpace)}
    c1, c2, c3, c4, c5, c6 = st.columns(6)
    lr_low = c1.number_input(
        "Learning rate from", 0.0, 1.0, space.learning_rate[0], format="%.1e", step=1e-5, key="lr-lo"
    )
    lr_high = c2.number_input(
        "to", 0.0, 1.0, space.learning_rate[1], format="%.1e", step=1e-5, help=helps["learning_rate"], key="lr-hi"
    )
    drop_low = c3.number_input("Dropout from", 0.0, 0.99, space.lora_dropout[0], step=0.01, key="drop-lo")
    drop_high = c4.number_input(
        "to", 0.0, 0.99, space.lora_dropout[1], step=0.01, help=helps["lora_dropout"], key="drop-hi"
    )
    ep_low = c5.number_input("Epochs from", 0, 100, space.epochs[0], key="ep-lo")
    ep_high = c6.number_input("to", 0, 100, space.epochs[1], help=helps["epochs"], key="ep-hi")
    c1, c2 = st.columns(2)
    ranks = c1.multiselect("LoRA r choices", RANK_CHOICES, list(space.lora_r), help=helps["lora_r"], key="r-in")
    alphas = c2.multiselect(
        "LoRA alpha choices", ALPHA_CHOICES, list(space.lora_alpha), help=helps["lora_alpha"], key="alpha-in"
    )
    return {
        "learning_rate": [lr_low, lr_high],
        "lora_r": sorted(ranks),
        "lora_alpha": [float(a) for a in sorted(alphas)],
        "lora_dropout": [drop_low, drop_high],
        "epochs": [int(ep_low), int(ep_high)],
    }


def preference_settings(adapters: dict[str, str]) -> dict:
    """DPO's own settings, and the adapter a run continues (DPO after SFT, or more SFT)."""
    c1, c2, c3 = st.columns([1, 1, 3])
    values = {
        name: forms.widget(spec(TrainConfig, name), key=f"train-{name}", label=LABELS[name], where=where, **extra)
        for name, where, extra in (("dpo_base", c1, {}), ("beta", c2, {"step": 0.05}))
    }
    choices = {"": "a fresh adapter", **adapters}
    values["from_adapter"] = forms.widget(
        spec(TrainConfig, "from_adapter"),
        key="train-from_adapter",
        label=LABELS["from_adapter"],
        where=c3,
        **picked(choices),
    )
    return values


def preference_panel(name: str) -> None:
    """What DPO would train on: the triples the ratings give for this dataset's train questions, to read and export."""
    data = preferences.preference_data(ui.store(), name)
    with st.expander(f"Preference data for DPO: {len(data.train)} train triples", expanded=False):
        st.caption(ui.plain(data.describe()))
        if not data.train:
            st.info(
                "Rate two runs' answers to this dataset's train questions blind on the Compare page (or let a judge"
                " that agrees with itself in both orders do it): each verdict that is not a tie becomes a triple.",
                icon=":material/info:",
            )
            return
        st.dataframe(
            [
                {"question": t.question, "chosen": t.chosen, "rejected": t.rejected, "source": t.source}
                for t in data.train
            ],
            hide_index=True,
            height=220,
        )
        st.download_button(
            "Download train triples (JSONL: prompt, chosen, rejected)",
            preferences.jsonl(data),
            file_name=f"{name}-preferences-train.jsonl",
            mime="application/jsonl",
            icon=":material/download:",
            on_click="ignore",
        )


def start_train_form(name: str, baselines: dict, adapters: dict[str, str], expanded: bool) -> None:
    with st.expander("New training run", expanded=expanded), st.form("train"):
        values = {**adapter_settings(), **model_settings("train"), **preference_settings(adapters)}
        values |= loop_settings("train")
        values |= evaluation_settings("train", baselines)
        values["output_dir"] = forms.widget(
            spec(TrainConfig, "output_dir"),
            key="train-output_dir",
            label=LABELS["output_dir"],
            placeholder="the workspace's artifacts/train-JOB",
        )
        go = st.form_submit_button("Start training", type="primary", icon=":material/play_arrow:")
    if go:
        store = ui.store()
        job_id = ui.attempt(lambda: training.start_training(store, TrainConfig.from_dict({"dataset": name, **values})))
        if job_id is not None:
            st.session_state["train_job"] = job_id
            st.rerun()


def start_search_form(name: str, baselines: dict, expanded: bool) -> None:
    with st.expander("New hyperparameter search", expanded=expanded), st.form("search"):
        st.markdown("**Searched** (each trial draws its own values)")
        space = search_ranges()
        values = forms.config_form(
            SearchConfig,
            key="search",
            only=("trials", "workers", "objective", "folds", "prune_startup_trials", "prune_warmup_epochs"),
            labels=LABELS,
            columns=6,
        )
        c1, c2 = st.columns(2)
        first = c1.text_area(
            "First trials (one a line)",
            placeholder="learning_rate=2e-4 lora_r=8",
            height=68,
            help=spec(SearchConfig, "first_trials").help,
            key="search-first_trials",
        )
        values["storage"] = forms.widget(
            spec(SearchConfig, "storage"), key="search-storage", label=LABELS["storage"], where=c2, type="password"
        )
        st.markdown("**Fixed** (every trial and the final training)")
        base = {**model_settings("search"), **loop_settings("search"), **evaluation_settings("search", baselines)}
        go = st.form_submit_button("Start search", type="primary", icon=":material/travel_explore:")
    if go:

        def start() -> int:
            base_config = TrainConfig.from_dict({"dataset": name, **base}).to_dict()
            config = SearchConfig.from_dict(
                {**values, "base": base_config, "space": space, "first_trials": train_search.parse_trials(first)}
            )
            return train_search.start_search(ui.store(), config)

        if (job_id := ui.attempt(start)) is not None:
            st.session_state["search_job"] = job_id
            st.rerun()


def pick_job(label: str, choices: list[jobs.JobInfo], state_key: str) -> int:
    """A job picker that shows a job just started (show_job) instead of keeping the earlier choice."""
    ids = [j.id for j in choices]
    if (started := st.session_state.pop(state_key, None)) in ids:  # a keyed widget ignores index= once set
        st.session_state[f"pick-{state_key}"] = started
    return st.selectbox(
        label,
        ids,
        format_func=lambda i: train_results.describe(next(j for j in choices if j.id == i)),
        key=f"pick-{state_key}",
    )


# ---- a training run -------------------------------------------------------------------------------------


def live_run(job_id: int) -> None:
    store = ui.store()

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
        if "reward_margin" in latest:  # a DPO run
            dpo_tiles(latest)
        job_figures = jobs.get(store, job_id).figures
        if "eval_note" in job_figures:  # instead of an eval curve: why there is none
            st.info(ui.plain(f"No eval loss: {job_figures['eval_note']}"), icon=":material/info:")
        if metrics.empty:
            st.caption("The loss curve appears once the model is loaded and the validation part evaluated.")
        else:
            st.plotly_chart(figures.loss_curve(metrics), width="stretch", key=f"loss-{job_id}")
            if "reward_margin" in latest:
                st.plotly_chart(figures.preference_curve(metrics), width="stretch", key=f"prefs-{job_id}")
        stage = job_figures.get("stage")
        if stage in ("exporting", "evaluating"):
            st.caption(f"Stage: {stage} …")

    curve()


def dpo_tiles(latest: dict) -> None:
    """Where a DPO run stands: the reward margin and preference accuracy of its last step and on validation."""
    tiles = st.columns(6)
    quiet = {"delta_color": "off", "delta_arrow": "off"}  # what the figure is, not a change
    tiles[0].metric("Reward margin", f"{latest['reward_margin']['value']:+.3f}", "chosen − rejected", **quiet)
    tiles[1].metric("Preference accuracy", f"{latest['preference_accuracy']['value']:.0%}", "last step", **quiet)
    if "eval_preference_accuracy" in latest:
        tiles[2].metric(
            "Validation accuracy",
            f"{latest['eval_preference_accuracy']['value']:.0%}",
            f"margin {latest['eval_reward_margin']['value']:+.3f}",
            **quiet,
        )
    for tile, name, label in (
        (tiles[3], "chosen_reward", "Chosen reward"),
        (tiles[4], "rejected_reward", "Rejected reward"),
    ):
        tile.metric(label, f"{latest[name]['value']:+.3f}")


def evaluation_section(job_id: int, output: train_results.TrainOutput, baselines: dict) -> None:
    st.subheader("Evaluation")
    if output.eval_run_id:
        scored = next((s for s in runs.list_runs(ui.store()) if s.run.id == output.eval_run_id), None)
        if scored and scored.mean_f1 is not None:
            st.markdown(
                f"Run **{output.eval_run_id}**: {scored.n_scored} answers, mean BERTScore F1 "
                f"**{scored.mean_f1:.3f}**, median {scored.median_f1:.3f}."
            )
            st.page_link(
                Path(__file__).with_name("compare.py"),
                label="Compare it with other runs",
                icon=":material/compare_arrows:",
            )
    with st.form(f"evaluate-{job_id}"):
        values = forms.config_form(
            evaluation.EvalConfig,
            key=f"evaluate-{job_id}",
            only=("backend", "baseline_run", "limit"),
            labels={"backend": "Engine", "baseline_run": "Decoding parameters", "limit": "Questions (empty = all)"},
            widgets={"baseline_run": picked(baselines)},
            columns=[1, 3, 1],
        )
        with st.expander("More"):
            values |= forms.config_form(
                evaluation.EvalConfig,
                key=f"evaluate-{job_id}",
                only=("part", "split_id", "base_gguf", "scorer_model"),
                columns=4,
            )
        if st.form_submit_button("Evaluate again", icon=":material/fact_check:"):
            ui.attempt(
                lambda: evaluation.start_evaluation(
                    ui.store(), evaluation.EvalConfig.from_dict({"train_dir": str(output.folder), **values})
                ),
                "evaluation started; see the Jobs page",
            )


def export_section(output: train_results.TrainOutput) -> None:
    st.subheader("Export")
    st.caption(ui.plain(f"Folder: {output.export_dir}"))
    st.dataframe(output.files, hide_index=True, column_config={"size": st.column_config.NumberColumn(format="bytes")})
    if output.modelfile is not None:
        st.markdown("**Into Ollama**: the merged model (Ollama's own engine does not apply LoRA adapters).")
        if output.ollama_command:
            st.code(output.ollama_command, language="bash")
        with st.expander("Modelfile"):
            st.code(output.modelfile, language=None)
    st.markdown("**Into llama.cpp**: `Llama(model_path=<base GGUF>, lora_path=<export>/adapter.gguf)`")
    st.download_button(
        "Download all (zip)",
        lambda: train_results.zipped(output.folder),  # built on the click: a merged GGUF is hundreds of MB
        file_name=f"{output.folder.name}.zip",
        mime="application/zip",
        icon=":material/download:",
        on_click="ignore",
    )


def show_runs(train_jobs: list[jobs.JobInfo], baselines: dict) -> None:
    job_id = pick_job("Training run", train_jobs, "train_job")
    ui.job_panel(job_id, log_lines=8, figures=False)  # the tiles below show them
    job = jobs.get(ui.store(), job_id)
    if how := train_results.chosen_how(job):
        st.caption(ui.plain(f"Settings chosen: {how}."))
    live_run(job_id)
    if (output := train_results.train_output(job)) is not None:
        evaluation_section(job_id, output, baselines)
        if output.export_dir is not None:
            export_section(output)


# ---- a search ------------------------------------------------------------------------------------------


@st.cache_data(max_entries=64, show_spinner=False)
def cached_importances(job_id: int, completed: int) -> dict[str, float]:
    """fANOVA fits a random forest: once per new completed trial, not on every refresh of every viewer."""
    return train_search.param_importances(ui.store(), job_id)


def show_searches(search_jobs: list[jobs.JobInfo]) -> None:
    store = ui.store()
    job_id = pick_job("Search", search_jobs, "search_job")
    ui.job_panel(job_id, log_lines=8)
    objective = train_results.objective(next(j for j in search_jobs if j.id == job_id))

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


def device_queue() -> None:
    queue = [j for j in jobs.list_jobs(ui.store()) if j.kind in jobs.DEVICE_KINDS and j.state in jobs.ACTIVE]
    if len(queue) > 1:
        st.caption("Device queue (one training job at a time on this machine; the others wait):")
        st.dataframe(
            [{"job": j.id, "kind": j.kind, "state": j.state, "message": j.message} for j in reversed(queue)],
            hide_index=True,
        )


def train_tab(name: str, baselines: dict) -> None:
    train_jobs = [j for j in jobs.list_jobs(ui.store(), kind="train") if train_results.dataset_of(j) == name]
    preference_panel(name)
    start_train_form(name, baselines, train_results.continuable(train_jobs), expanded=not train_jobs)
    if train_jobs:
        show_runs(train_jobs, baselines)
    else:
        st.info("No training run on this dataset yet: start one above.")


def search_tab(name: str, baselines: dict) -> None:
    search_jobs = [j for j in jobs.list_jobs(ui.store(), kind="train-search") if train_results.dataset_of(j) == name]
    start_search_form(name, baselines, expanded=not search_jobs)
    if search_jobs:
        show_searches(search_jobs)
    else:
        st.info("No hyperparameter search on this dataset yet: start one above.")


def render() -> None:
    st.title("Training")
    name = ui.dataset_picker()
    if name is None:
        return
    ui.show_flashes()
    device_queue()
    baselines = baseline_choices(name)  # once per rerun: every form offers the same runs
    train, search = st.tabs(["Train", "Search hyperparameters"])
    with train:
        train_tab(name, baselines)
    with search:
        search_tab(name, baselines)


render()
