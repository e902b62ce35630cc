"""`python -m workbench …`: the CLI over the same core functions the pages call.

Exit 0 on success; exit 2 with a one-line reason (no traceback) on anything a user can
cause, with nothing written. Bad input is checked before the workspace is opened.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from core import compare, dataset, formats, jobs, models, qa_generation, runs
from core.backends import USER_BACKENDS
from core.decoding import INT_PARAMS, DecodingParams, field_help
from core.errors import BadInput, WorkbenchError
from core.store import Store
from core.sweep import MODES, SWEEPABLE, SweepConfig

BENCH_DIR = Path(__file__).resolve().parent.parent / "tests" / "benchmarks"


def open_workspace(dataset_name: str | None = None) -> Store:
    """The workspace's store; the starter dataset is imported on first use when the command may need it.

    A command about another named dataset does not import it, so a refused command writes nothing.
    """
    store = Store()
    if dataset_name in (None, dataset.STARTER_NAME):
        dataset.ensure_starter(store)
    return store


# ---- commands --------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    parsed = formats.read_pairs(args.path)  # refuses a bad file before anything is opened or written
    with open_workspace() as store:
        summary = dataset.import_parsed(store, parsed, args.dataset, args.status)
        counts = dataset.status_counts(store, summary.dataset)
    print(f"{dataset.describe_import(summary)}; dataset now: {', '.join(f'{v} {k}' for k, v in counts.items())}")
    if warning := dataset.describe_pending_flags(summary):  # the pairs are in: still a success
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with open_workspace(args.dataset) as store:
        n = dataset.export_pairs(store, args.dataset, args.output, args.format, args.split, args.status)
    print(f"wrote {n} pair(s) to {args.output}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    with open_workspace(args.dataset) as store:
        info = dataset.make_split(store, args.dataset, args.test_size, args.seed, args.validation_size)
    kind = "stratified by field" if info.stratified else "not stratified (one field)"
    print(f"split {info.describe()} of {info.dataset!r} (seed {info.seed}, {kind})")
    if not info.validation:
        print("without a validation part, choices (best decoding, trials) are made on the questions they are scored on")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    with open_workspace() as store:
        rows = dataset.overview(store)
    _print_rows(rows, args.json)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    with open_workspace() as store:
        summaries = runs.list_runs(store)
    rows = [
        {
            "id": s.run.id,
            "kind": s.run.kind,
            "backend": s.run.backend,
            "model": Path(s.run.model).name or "-",
            "adapter": s.run.adapter or "-",
            "params": runs.describe_params(s.run.params),
            "n": s.n_answers,
            "mean_f1": None if s.mean_f1 is None else round(s.mean_f1, 4),
            "median_f1": None if s.median_f1 is None else round(s.median_f1, 4),
        }
        for s in summaries
    ]
    _print_rows(rows, args.json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from workbench import report  # plotly loads only for this command

    if len(set(args.run_ids)) < 2:
        raise BadInput("compare needs at least two different run ids")
    if not args.output.parent.is_dir():
        raise BadInput(f"folder {str(args.output.parent)!r} does not exist")
    if args.csv is not None and args.csv.exists() and not args.csv.is_dir():
        raise BadInput(f"--csv must be a folder; {str(args.csv)!r} is a file")
    with open_workspace() as store:
        path = report.write_report(store, args.run_ids, args.output, args.metric, args.baseline)
        csvs = report.export_tables_csv(store, args.run_ids, args.csv, args.metric, args.baseline) if args.csv else []
        summary = compare.summary_table(store, args.run_ids, metric=args.metric, baseline_run=args.baseline)
        notes = compare.selection_notes(store, args.run_ids)
    print(f"wrote {path}" + "".join(f"\nwrote {p}" for p in csvs))
    _print_rows(summary.round(4).to_dict("records"), False)
    for note in notes:  # the comparison stands, with a warning like import's
        print(f"warning: {note}", file=sys.stderr)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with Store() as store:
        rows = [
            {
                "id": j.id,
                "kind": j.kind,
                "state": j.state,
                "progress": f"{j.done}/{j.total}" if j.total else str(j.done),
                "message": j.message,
            }
            for j in jobs.list_jobs(store)
        ]
    _print_rows(rows, args.json)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with Store() as store:
        job = jobs.cancel(store, args.job_id)
    still = "; it stops after its current step" if job.state in jobs.ACTIVE else ""
    print(f"job {job.id}: {job.state}{' (cancel requested)' if still else ''}{still}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with Store() as store:
        job = jobs.resume(store, args.job_id)
        return follow_or_detach(store, job.id, args.background)


def cmd_run_job(args: argparse.Namespace) -> int:
    if not args.worker:
        return jobs.supervise(args.job_id)
    state = jobs.run(args.job_id)
    return 0 if state in ("done", "cancelled") else 1


def cmd_engine(args: argparse.Namespace) -> int:
    from core import engine, engine_process

    if args.info:
        print(engine.engine_report().summary())
        return 0
    return engine_process.serve()


def cmd_generate_qa(args: argparse.Namespace) -> int:
    config = qa_generation.QAGenerationConfig(
        dataset=args.dataset,
        topics=qa_generation.parse_topics(args.topics),
        n=args.n,
        backend=args.backend,
        model=args.model or "",
        question_prompt=args.question_prompt,
        answer_prompt=args.answer_prompt,
    )
    with open_workspace(args.dataset) as store:
        job_id = qa_generation.submit(store, config)
        return follow_or_detach(store, job_id, args.background)


def cmd_sweep(args: argparse.Namespace) -> int:
    from core import sweep

    config = sweep.SweepConfig(
        dataset=args.dataset,
        grid=sweep.parse_grid(args.grid),
        mode=args.mode,
        backend=args.backend,
        model=args.model or "",
        part=args.split,
        limit=args.limit,
        repeats=args.repeats,
        trials=args.trials,
        scorer_model=args.scorer or "",
        rescale=args.rescale,
        baseline=DecodingParams.from_dict(
            {k: getattr(args, k) for k in sweep.SWEEPABLE if getattr(args, k) is not None}
        ),
    )
    with open_workspace(args.dataset) as store:
        sweep_id, job_id = sweep.start_sweep(store, config)
        print(f"sweep {sweep_id}: job {job_id}")
        code = follow_or_detach(store, job_id, args.background)
        if code == 0 and not args.background:
            _print_rows(_sweep_rows(sweep.sweep_table(store, sweep_id)), False)
            choice = sweep.choose(store, sweep_id)
            print(choice.describe())
            if choice.part == "validation":
                print(f"run its best once on the test part with: python -m workbench confirm {sweep_id}")
        return code


def cmd_confirm(args: argparse.Namespace) -> int:
    from core import sweep

    with open_workspace() as store:
        made_before = sweep.confirmation(store, args.sweep_id) is not None
        run_id, job_id = sweep.confirm_best(store, args.sweep_id)
        run = runs.get_run(store, run_id)
        done = "already confirmed" if made_before else "confirming"
        print(f"{done} sweep {args.sweep_id} on test: run {run.id} ({run.selection['how']}), job {job_id}")
        code = follow_or_detach(store, job_id, args.background)
        if code == 0 and not args.background:
            _print_rows(_sweep_rows(sweep.sweep_table(store, run.sweep_id)), False)
        return code


def cmd_train(args: argparse.Namespace) -> int:
    from core import train_search, training
    from core.train_config import SEARCH_FIELDS

    flags = [f.name for f in fields(training.TrainConfig) if f.name not in SEARCH_FIELDS]
    config = training.TrainConfig.from_dict({name: getattr(args, name) for name in flags})
    with open_workspace(config.dataset) as store:
        if args.from_search is not None:
            config = train_search.final_config(store, args.from_search)
            print(
                f"best parameters of search job {args.from_search}: {train_search.best_params(store, args.from_search)}"
            )
        elif args.trials:
            search = train_search.SearchConfig(
                base=config.to_dict(),
                trials=args.trials,
                workers=args.workers,
                objective=args.objective,
                folds=args.folds,
                space=train_search.SearchSpace.parse(args.space),
            )
            search_id = train_search.start_search(store, search)
            print(f"hyperparameter search: job {search_id} ({args.trials} trials, {args.workers} worker(s))")
            code = follow_or_detach(store, search_id, args.background)
            if code != 0 or args.background:
                return code
            _print_rows(
                train_search.study_trials(store, search_id).drop(columns="output_dir").to_dict("records"), False
            )
            config = train_search.final_config(store, search_id)
            print(f"final training with the best parameters: {train_search.best_params(store, search_id)}")
        job_id = training.start_training(store, config)
        print(f"training: job {job_id}")
        code = follow_or_detach(store, job_id, args.background)
        if code == 0 and not args.background:
            _print_training(jobs.get(store, job_id).figures)
        return code


def _print_training(figures: dict) -> None:
    out = Path(figures["output_dir"])
    if "eval_note" in figures:
        print(f"no eval loss: {figures['eval_note']}")
    else:
        print(f"eval loss (validation) {figures.get('eval_loss_before')} -> {figures.get('eval_loss_after')}")
    if "eval_run_id" in figures:
        print(f"evaluation: run {figures['eval_run_id']}, mean F1 {figures.get('mean_f1', float('nan')):.4f}")
    print(f"artifacts in {out / 'export'}:")
    for path in sorted((out / "export").iterdir()):
        print(f"  {path.name}")
    create = out / "export" / "ollama-create.txt"
    if create.exists():
        print(f"into Ollama: {create.read_text().strip()}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core import evaluation

    with open_workspace() as store:
        if args.run is not None:
            run = runs.get_run(store, args.run)
            job_id = jobs.submit(store, "evaluate", {"run_id": run.id})
        else:
            config = evaluation.EvalConfig(
                train_dir=args.adapter,
                backend=args.backend,
                baseline_run=args.baseline_run,
                part=args.split,
                limit=args.limit,
                scorer_model=args.scorer or "",
            )
            run, job_id = evaluation.start_evaluation(store, config)
        print(f"evaluation: run {run.id}, job {job_id}")
        code = follow_or_detach(store, job_id, args.background)
        if code == 0 and not args.background:
            print(f"run {run.id}: mean F1 {evaluation.mean_f1(store, run):.4f}")
        return code


def _sweep_rows(frame) -> list[dict]:
    from core.sweep import SWEEPABLE

    rows = []
    for _, r in frame.iterrows():
        varied = " ".join(f"{k}={r[k]}" for k in SWEEPABLE if r[k] is not None and r[k] == r[k])
        rows.append(
            {
                "run": int(r["run"]),
                "params": varied,
                "n": int(r["n"]),
                "mean_f1": f"{r['mean_f1']:.4f}",
                **{c: f"{r[c]:.4f}" for c in ("validation_f1", "test_f1") if c in r},
                "95% CI": f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]",
                "median_f1": f"{r['median_f1']:.4f}",
                "rouge_l": f"{r['rouge_l']:.4f}",
                "best": "*" if r["best"] else "",
            }
        )
    return rows


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    names = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
    if args.name not in names:
        raise BadInput(f"no benchmark named {args.name!r}; known: {', '.join(names)}")
    result = importlib.import_module(f"tests.benchmarks.bench_{args.name}").main()
    return 0 if result["met"] else 1


def cmd_prepare_models(args: argparse.Namespace) -> int:
    from core.engine_process import describe_engine

    for state in models.prepare_all(progress=lambda msg: print(msg, flush=True)):
        print(f"{'ready' if state.ready else 'MISSING':8} {state.name:20} {state.role}: {state.path}")
    print(describe_engine())
    return 0


# ---- following a job in the foreground -------------------------------------------------------


def follow_or_detach(store: Store, job_id: int, background: bool) -> int:
    if background:
        print(f"job {job_id} started in the background; follow it with `python -m workbench jobs`")
        return 0
    return follow(store, job_id)


def follow(store: Store, job_id: int, out=sys.stderr) -> int:
    """Draw the job's progress until it ends; Ctrl-C cancels it cleanly."""
    try:
        while True:
            job = jobs.get(store, job_id)
            width = 30
            filled = int(job.fraction * width)
            rate = job.figures.get("tokens_per_s")
            extra = f" {rate:.1f} tok/s" if rate else ""
            left = f" ~{job.seconds_left:.0f}s left" if job.seconds_left else ""
            out.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {job.done}/{job.total or '?'}{extra}{left} "
                f"{job.message[:60]:<60}"
            )
            out.flush()
            if job.state not in jobs.ACTIVE:
                out.write("\n")
                print(f"job {job.id} {job.state}: {job.message}")
                return 0 if job.state == "done" else 1  # 2 stays reserved for bad input
            time.sleep(0.5)
    except KeyboardInterrupt:
        out.write("\ncancelling ...\n")
        try:
            job = jobs.cancel(store, job_id)
        except WorkbenchError:  # it ended on its own just before Ctrl-C
            job = jobs.get(store, job_id)

        print(f"job {job.id} {job.state}; resume with: python -m workbench resume {job.id}")
        return 130


def _print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    cols = list(rows[0])
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# ---- argument parsing -----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other refusal
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _share(text: str) -> float:
    """A share strictly between 0 and 1, checked before the workspace is opened."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def _fraction(text: str) -> float:
    """A share from 0 (none) to just under 1."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and under 1, got {value}")
    return value


def _add_config_args(parser: argparse.ArgumentParser, cls: type, options: dict[str, dict]) -> None:
    """Flags named after a config dataclass's fields, with the fields' own defaults and help texts."""
    defaults = {f.name: f.default for f in fields(cls)}
    for name, extra in options.items():
        default = defaults[name] if defaults[name] is not MISSING else None
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, default=default, help=field_help(cls, name), **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m workbench",
        description=(
            "QA Tuning Workbench: curate QA pairs, sweep decoding parameters, fine-tune, compare BERTScore. "
            "The workspace is $WORKBENCH_HOME (default ./workspace)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("import", cmd_import, "Import QA pairs from a CSV, JSON array or JSONL file.")
    p.add_argument("path", help="file to import (.csv, .json, .jsonl); needs question and answer columns/keys")
    p.add_argument("--dataset", help="dataset to add the pairs to (created if new; default: the file's name)")
    p.add_argument(
        "--status",
        choices=dataset.STATUSES,
        default="accepted",
        help="review status the imported pairs get (default: accepted)",
    )

    p = command("export", cmd_export, "Export a dataset's pairs as JSONL or CSV.")
    p.add_argument("--dataset", required=True, help="dataset to export")
    p.add_argument(
        "--split",
        choices=(*dataset.PARTS, "all"),
        default="all",
        help="which part of the latest split to export (default: all pairs)",
    )
    p.add_argument(
        "--status",
        choices=("accepted", "all"),
        default="accepted",
        help="export only accepted pairs (default) or every pair",
    )
    p.add_argument(
        "--format",
        choices=("jsonl", "csv"),
        default="jsonl",
        help="jsonl: one {question, answer, field} object per line; csv: question,answer,field",
    )
    p.add_argument("-o", "--output", required=True, help="file to write")

    p = command("split", cmd_split, "Draw a new frozen train/validation/test split version over the accepted pairs.")
    p.add_argument("--dataset", required=True, help="dataset to split")
    p.add_argument(
        "--test-size",
        type=_share,
        default=dataset.DEFAULT_TEST_SIZE,
        help=f"share of pairs in the test part, only reported on (default {dataset.DEFAULT_TEST_SIZE})",
    )
    p.add_argument(
        "--validation-size",
        type=_fraction,
        default=dataset.DEFAULT_VALIDATION_SIZE,
        help="share of pairs in the validation part, on which choices are made (0: none; default"
        f" {dataset.DEFAULT_VALIDATION_SIZE})",
    )
    p.add_argument(
        "--seed", type=int, default=dataset.DEFAULT_SPLIT_SEED, help=f"seed (default {dataset.DEFAULT_SPLIT_SEED})"
    )

    p = command("datasets", cmd_datasets, "List datasets with their pair counts per status and latest split.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("runs", cmd_runs, "List runs: id, kind, backend, model, adapter, params, n, mean/median F1.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("compare", cmd_compare, "Compare scored runs in one self-contained HTML report (opens offline).")
    p.add_argument("run_ids", type=int, nargs="+", metavar="RUN_ID", help="two or more runs (see `runs`)")
    p.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    p.add_argument("--metric", choices=list(compare.METRICS), default="f1", help="score to compare (default: f1)")
    p.add_argument("--baseline", type=int, metavar="RUN_ID", help="run the others are tested against")
    p.add_argument("--csv", type=Path, metavar="FOLDER", help="also write summary.csv and per_question.csv here")

    p = command("jobs", cmd_jobs, "List background jobs with their state and progress.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("cancel", cmd_cancel, "Cancel a queued or running job (it stops between items).")
    p.add_argument("job_id", type=int, help="id of the job (see `jobs`)")

    p = command("resume", cmd_resume, "Resume an interrupted, cancelled or failed job where it stopped.")
    p.add_argument("job_id", type=int, help="id of the job (see `jobs`)")
    p.add_argument("--background", action="store_true", help="return at once instead of following progress")

    p = command("run-job", cmd_run_job, "Run a job in this process (used by the job runner; not for everyday use).")
    p.add_argument("job_id", type=int, help="id of the job to run")
    p.add_argument("--worker", action="store_true", help="run the job's function here, without a supervisor")

    p = command("engine", cmd_engine, "Serve a generation engine over stdin/stdout (used by the Playground).")
    p.add_argument("--info", action="store_true", help="print the llama.cpp engine's CPU features and exit")

    p = command(
        "generate-qa",
        cmd_generate_qa,
        "Generate candidate QA pairs with an LLM; they arrive as pending, for review on the Dataset page.",
    )
    _add_config_args(
        p,
        qa_generation.QAGenerationConfig,
        {
            "dataset": {"required": True},
            "topics": {"required": True},
            "n": {"type": int},
            "backend": {"choices": (*USER_BACKENDS, "echo")},
            "model": {},
            "question_prompt": {},
            "answer_prompt": {},
        },
    )
    p.add_argument("--background", action="store_true", help="return at once with the job id")

    p = command(
        "sweep",
        cmd_sweep,
        "Sweep decoding parameters over a dataset split; every configuration "
        "becomes a scored run (BERTScore F1, ROUGE-L). The best is chosen on the validation questions; "
        "`confirm` then runs it on the test part.",
    )
    p.add_argument("--dataset", required=True, help=field_help(SweepConfig, "dataset"))
    p.add_argument(
        "--split", choices=(*dataset.PARTS, "all"), default="validation", help=field_help(SweepConfig, "part")
    )
    p.add_argument(
        "--backend", choices=(*USER_BACKENDS, "echo"), default="llamacpp", help=field_help(SweepConfig, "backend")
    )
    p.add_argument("--model", help=field_help(SweepConfig, "model"))
    p.add_argument("--grid", required=True, help=field_help(SweepConfig, "grid"))
    p.add_argument(
        "--mode",
        choices=MODES,
        default="product",
        help=field_help(SweepConfig, "mode"),
    )
    p.add_argument("--limit", type=int, help=field_help(SweepConfig, "limit"))
    p.add_argument("--repeats", type=int, default=1, help=field_help(SweepConfig, "repeats"))
    p.add_argument("--trials", type=int, default=10, help=field_help(SweepConfig, "trials"))
    p.add_argument("--scorer", help=field_help(SweepConfig, "scorer_model"))
    p.add_argument("--rescale", action="store_true", help=field_help(SweepConfig, "rescale"))
    for name in SWEEPABLE:
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=int if name in INT_PARAMS else float,
            help=f"baseline {name} (default {getattr(DecodingParams(), name)}): " + field_help(DecodingParams, name),
        )
    p.add_argument("--background", action="store_true", help="return at once with the job id")

    p = command(
        "confirm",
        cmd_confirm,
        "Run a sweep's best configuration (chosen on its validation questions) once on the test part of the same "
        "split, as a scored run to report and compare; a sweep already confirmed shows its confirmation.",
    )
    p.add_argument(
        "sweep_id", type=int, metavar="SWEEP_ID", help="the sweep whose best to confirm (`sweep` prints its id)"
    )
    p.add_argument("--background", action="store_true", help="return at once with the job id")

    p = command(
        "train",
        cmd_train,
        "Fine-tune LoRA/QLoRA adapters on a dataset's train part, export them (PEFT, GGUF, merged GGUF + "
        "Modelfile) and evaluate them on the test part as a scored run.",
    )
    from core.train_config import SEARCH_FIELDS, TrainConfig

    options: dict[str, dict] = {}
    for f in fields(TrainConfig):
        if f.name in SEARCH_FIELDS:
            continue
        kind = str(f.type)
        if kind == "bool":
            options[f.name] = {"action": argparse.BooleanOptionalAction}
        elif kind.startswith("int"):
            options[f.name] = {"type": int}
        elif kind.startswith("float"):
            options[f.name] = {"type": float}
        else:
            options[f.name] = {}
    options["dataset"] = {"required": True}
    _add_config_args(p, TrainConfig, options)
    from core.train_search import SearchConfig

    search = p.add_argument_group(
        "hyperparameter search (Optuna; then the final training with the best trial's settings)"
    )
    search.add_argument("--trials", type=int, default=0, help="search first: " + field_help(SearchConfig, "trials"))
    search.add_argument("--workers", type=int, default=1, help=field_help(SearchConfig, "workers"))
    search.add_argument(
        "--objective",
        choices=("eval_loss", "bertscore"),
        default="eval_loss",
        help=field_help(SearchConfig, "objective"),
    )
    search.add_argument("--folds", type=int, default=0, metavar="K", help=field_help(SearchConfig, "folds"))
    search.add_argument(
        "--space",
        default="",
        help="ranges to search, e.g. 'learning_rate=1e-5,1e-3 lora_r=4,8,16 lora_alpha=8,16,32 lora_dropout=0,0.1 "
        "epochs=1,3' (low,high for learning_rate, lora_dropout and epochs; choices for r and alpha); "
        "unnamed ones keep these defaults",
    )
    search.add_argument(
        "--from-search", type=int, metavar="JOB", help="skip the search: train with search job JOB's best parameters"
    )
    p.add_argument("--background", action="store_true", help="return at once with the job id")

    p = command(
        "evaluate",
        cmd_evaluate,
        "Answer the test part with base model + a trained adapter and score it as a run (or finish a run).",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--adapter", metavar="PATH", help="training output folder (or its adapter/ folder)")
    target.add_argument("--run", type=int, metavar="RUN_ID", help="generate and score what an existing run lacks")
    from core.evaluation import ENGINES, EvalConfig

    p.add_argument("--backend", choices=ENGINES, default="llamacpp", help=field_help(EvalConfig, "backend"))
    p.add_argument("--baseline-run", type=int, metavar="RUN_ID", help=field_help(EvalConfig, "baseline_run"))
    p.add_argument("--split", choices=(*dataset.PARTS, "all"), default="test", help=field_help(EvalConfig, "part"))
    p.add_argument("--limit", type=int, help=field_help(EvalConfig, "limit"))
    p.add_argument("--scorer", help=field_help(EvalConfig, "scorer_model"))
    p.add_argument("--background", action="store_true", help="return at once with the job id")

    p = command("bench", cmd_bench, "Run one benchmark from tests/benchmarks (`make bench` runs them all).")
    p.add_argument("name", help="benchmark name, e.g. dataset (tests/benchmarks/bench_dataset.py)")

    command(
        "prepare-models",
        cmd_prepare_models,
        "Prepare the embedded models (assemble the GGUF, convert it to a Hugging Face checkpoint).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. an output path that is a folder, a disk that is full
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}".replace(": :", ":"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
