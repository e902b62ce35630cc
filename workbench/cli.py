"""`python -m workbench …`: the CLI over the same core functions the pages call.

Exit 0 on success; exit 2 with a one-line reason (no traceback) on anything a user can
cause, with nothing written. Bad input is checked before the workspace is opened.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import is_dataclass, replace
from pathlib import Path
from typing import Any

from core import compare, dataset, formats, intake, jobs, judge, models, preferences, qa_generation, runs
from core.config import FieldSpec, specs
from core.config import spec as field_spec
from core.errors import BadInput, WorkbenchError
from core.evaluation import EvalConfig
from core.judge import JudgeConfig
from core.prompting import DEFAULT_TEMPLATE
from core.quality import QualityConfig
from core.settings import WorkbenchSettings
from core.store import Store
from core.sweep import SweepConfig, parse_grid
from core.train_config import TrainConfig
from core.train_search import SearchConfig, SearchSpace, parse_trials


def open_workspace(dataset_name: str | None = None) -> Store:
    """The workspace's store; the starter dataset is imported on first use when the command may need it.

    A command about another named dataset does not import it, so a refused command writes nothing.
    """
    store = Store()
    if dataset_name in (None, dataset.STARTER_NAME):
        intake.ensure_starter(store)
    return store


# ---- commands --------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    parsed = formats.read_pairs(args.path)  # refuses a bad file before anything is opened or written
    with open_workspace() as store:
        summary = intake.import_parsed(store, parsed, args.dataset, args.status)
        counts = dataset.status_counts(store, summary.dataset)
    print(f"{intake.describe_import(summary)}; dataset now: {', '.join(f'{v} {k}' for k, v in counts.items())}")
    if warning := intake.describe_pending_flags(summary):  # the pairs are in: still a success
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with open_workspace(args.dataset) as store:
        n = dataset.export_pairs(store, args.dataset, args.output, args.format, args.split, args.status)
    print(f"wrote {n} pair(s) to {args.output}")
    return 0


def cmd_preferences(args: argparse.Namespace) -> int:
    with open_workspace(args.dataset) as store:
        data = preferences.preference_data(store, args.dataset)
        print(data.describe())
        if args.output:
            n = preferences.export_jsonl(data, args.output, args.prompt_template, args.part)
            print(f"wrote {n} {args.part} triple(s) to {args.output}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    with open_workspace(args.dataset) as store:
        info = dataset.make_split(store, args.dataset, args.test_size, args.seed, args.validation_size)
    kind = "stratified by field" if info.stratified else "not stratified (one field)"
    print(f"split {info.describe()} of {info.dataset!r} (seed {info.seed}, {kind})")
    if not info.validation:
        print("without a validation part, choices (best decoding, trials) are made on the questions they are scored on")
    return 0


def cmd_flag(args: argparse.Namespace) -> int:
    from core import quality

    with open_workspace(args.dataset) as store:
        config = QualityConfig.from_dict({**quality.load_config(store).to_dict(), **_given(args, QualityConfig)})
        quality.save_config(store, config)  # as the Quality tab's "Save and re-flag": the workspace's thresholds
        summary = quality.flag_dataset(store, args.dataset, config)
    flagged = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in summary.counts.items() if n) or "no flags"
    print(f"{summary.pairs} pair(s) of {summary.dataset!r} re-flagged: {flagged}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from core import settings

    with Store() as store:
        given = _given(args, WorkbenchSettings)
        current = settings.load(store)
        if given:
            current = settings.save(store, WorkbenchSettings.from_dict({**current.to_dict(), **given}))
            print(f"saved: {', '.join(sorted(given))}", file=sys.stderr)  # stdout stays the table (or JSON)
    _print_rows([{"setting": k, "value": v} for k, v in current.to_dict().items()], args.json)
    return 0


def _given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of `cls` given on the command line (their default None: leave the saved value as it is)."""
    return {name: value for name, value in flag_values(args, cls).items() if value is not None}


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
            "engine": runs.engine_mode(s.run) or "-",
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
    from core import judging
    from workbench import comparison  # plotly loads only for this command

    if len(set(args.run_ids)) < 2:
        raise BadInput("compare needs at least two different run ids")
    if not args.output.parent.is_dir():
        raise BadInput(f"folder {str(args.output.parent)!r} does not exist")
    if args.csv is not None and args.csv.exists() and not args.csv.is_dir():
        raise BadInput(f"--csv must be a folder; {str(args.csv)!r} is a file")
    with open_workspace() as store:
        path = comparison.write_report(store, args.run_ids, args.output, args.metric, args.baseline)
        csvs = (
            comparison.write_tables_csv(store, args.run_ids, args.csv, args.metric, args.baseline) if args.csv else []
        )
        summary = compare.summary_table(store, args.run_ids, metric=args.metric, baseline_run=args.baseline)
        notes = compare.selection_notes(store, args.run_ids)
        judged = judging.results_table(store, args.run_ids)
    print(f"wrote {path}" + "".join(f"\nwrote {p}" for p in csvs))
    _print_rows(summary.round(4).to_dict("records"), False)
    for _, row in judged.iterrows():
        print(f"runs {row['runs']}, {row['judge']}: {row['with the humans']}")
    for note in notes:  # the comparison stands, with a warning like import's
        print(f"warning: {note}", file=sys.stderr)
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from core import judging

    config = JudgeConfig.from_dict(flag_values(args, JudgeConfig))
    with open_workspace() as store:
        job_id = judging.start_judging(store, config, args.run_a, args.run_b)
        print(f"{judge.describe(config)} on runs {args.run_a} and {args.run_b}: job {job_id}")
        code = follow_or_detach(store, job_id, args.background)
        if code == 0 and not args.background:
            print(judging.judge_result(store, config, args.run_a, args.run_b).headline())
        return code


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
    config = qa_generation.QAGenerationConfig.from_dict(flag_values(args, qa_generation.QAGenerationConfig))
    with open_workspace(config.dataset) as store:
        job_id = qa_generation.submit(store, config)
        return follow_or_detach(store, job_id, args.background)


def cmd_sweep(args: argparse.Namespace) -> int:
    from core import sweep

    config = SweepConfig.from_dict(flag_values(args, SweepConfig))
    with open_workspace(config.dataset) as store:
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

    config = TrainConfig.from_dict(flag_values(args, TrainConfig))
    with open_workspace(config.dataset) as store:
        if args.from_search is not None:
            config = train_search.final_config(store, args.from_search)
            print(
                f"best parameters of search job {args.from_search}: {train_search.best_params(store, args.from_search)}"
            )
        elif args.trials:
            search = SearchConfig.from_dict({**flag_values(args, SearchConfig), "base": config.to_dict()})
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
        if config.method == "dpo":
            print(f"preference data: {preferences.preference_data(store, config.dataset).describe()}")
        job_id = training.start_training(store, config)
        print(f"training: job {job_id}")
        code = follow_or_detach(store, job_id, args.background)
        if code == 0 and not args.background:
            _print_training(jobs.get(store, job_id).figures)
        return code


def cmd_search_worker(args: argparse.Namespace) -> int:
    """One worker of a hyperparameter search, started by the search job (or by hand on another machine)."""
    from core import train_search

    url = args.storage or os.environ.get(train_search.STORAGE_ENV, "")
    if not url:
        with Store() as store:
            url = train_search.storage_url(store)
    ran = _job_process(lambda: train_search.work(args.study, url, args.index, args.parent))
    if ran is None:
        return 1
    print(f"worker {os.getpid()}: {ran} trial(s) run", flush=True)
    return 0


def cmd_train_rank(args: argparse.Namespace) -> int:
    """One process of a distributed training run, started by `accelerate launch`."""
    from core import training

    code = _job_process(lambda: training.rank_main(args.job_id, args.output_dir))
    return 1 if code is None else code


def _job_process(work: Callable[[], Any]) -> Any:
    """Run the work of a process a job started; None when it failed. Its reason goes to stderr, which the job
    logs, and the exit code is 1: a job's failure, where 2 means a command the user gave was refused."""
    try:
        return work()
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _print_training(figures: dict) -> None:
    from core.train_dir import TrainDir

    export = TrainDir(figures["output_dir"]).export
    if "eval_note" in figures:
        print(f"no eval loss: {figures['eval_note']}")
    else:
        print(f"eval loss (validation) {figures.get('eval_loss_before')} -> {figures.get('eval_loss_after')}")
    if "eval_run_id" in figures:
        print(f"evaluation: run {figures['eval_run_id']}, mean F1 {figures.get('mean_f1', float('nan')):.4f}")
    print(f"artifacts in {export}:")
    for path in sorted(export.iterdir()):
        print(f"  {path.name}")
    create = export / "ollama-create.txt"
    if create.exists():
        print(f"into Ollama: {create.read_text().strip()}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core import evaluation

    with open_workspace() as store:
        if args.run is not None:
            run = runs.get_run(store, args.run)
            job_id = jobs.submit(store, "evaluate", {"run_id": run.id})
        else:
            config = EvalConfig.from_dict(flag_values(args, EvalConfig))
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


def _field_number(spec: FieldSpec) -> Callable[[str], float | None]:
    """The argparse type of a number field: its kind and range, so that a bad value exits 2 before anything opens."""

    def parse(text: str) -> float | None:
        if text == "" and spec.optional:
            return None
        try:
            value = spec.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {'whole ' if spec.kind is int else ''}number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        lo, hi = spec.min, spec.max
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _parsed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A core text parser as an argparse type: its BadInput exits 2 with one line, before the workspace opens."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except BadInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _flag_options(spec: FieldSpec, extra: dict[str, Any]) -> dict[str, Any]:
    """add_argument's options for one field: its kind, choices, range, default and help; `extra` has the last word."""
    options: dict[str, Any] = {"required": spec.required, "default": None if spec.required else spec.default}
    if spec.choices is not None:
        options["choices"] = spec.choices
    if spec.kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif spec.kind in (int, float):
        options["type"] = _field_number(spec)
    elif spec.kind is tuple:  # as text, so that --help shows it as it is typed; argparse converts a text default
        options |= {"type": _comma_list, "default": ",".join(map(str, spec.default))}
    elif spec.kind is not str and "type" not in extra:
        raise TypeError(f"{spec.name}: a {spec.kind.__name__} field needs a `type` in overrides, or skip it")
    options |= extra
    help_text = options.get("help", spec.help).replace("%", "%%")  # argparse %-formats help texts
    default = options["default"]
    if default not in (None, "") and (spec.kind is not str or spec.choices is not None):
        help_text += " (default: %(default)s)"
    return {**options, "help": help_text}


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
) -> None:
    """One flag per field of the configuration dataclass `cls` (core.config.specs): its flag name, default, help,
    choices and range; fields with cli=False have none. `overrides` maps a field to add_argument options that win.

    A text, number, bool or tuple field is one flag (a bool is --x/--no-x, a tuple comma-separated text); a dict
    or list field needs a `type` in overrides to parse its text. A nested configuration (a DecodingParams) is one
    flag per field of its own, prefixed by the field's name less `_params` (answer_params.temperature is
    --answer-temperature) or by overrides' `prefix`; with a `type` in overrides it is one flag instead.
    `flag_values(args, cls)` gathers what they were given for `cls.from_dict`.
    """
    overrides = overrides or {}
    for spec in specs(cls):
        if not spec.cli or spec.name in skip or (only is not None and spec.name not in only):
            continue
        extra = dict(overrides.get(spec.name, {}))
        if is_dataclass(spec.kind) and "type" not in extra:
            prefix = extra.get("prefix", spec.name.removesuffix("_params").replace("_", "-") + "-")
            _add_nested_flags(parser, spec, prefix)
        else:
            parser.add_argument(spec.flag, dest=spec.name, **_flag_options(spec, extra))


def _add_nested_flags(parser, outer: FieldSpec, prefix: str) -> None:
    """The nested configuration's flags, in a --help section of their own titled by the field's help."""
    group = parser.add_argument_group(outer.help or outer.name.replace("_", " "))
    for inner in specs(outer.kind):
        if inner.cli:
            inner = replace(inner, default=getattr(outer.default, inner.name))  # e.g. the answers' temperature
            metavar = {} if inner.kind is bool or inner.choices else {"metavar": inner.name.upper()}
            flag = "--" + prefix + inner.flag.removeprefix("--")
            group.add_argument(flag, dest=f"{outer.name}.{inner.name}", **_flag_options(inner, metavar))


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """What the flags of `cls` (see add_config_flags) were given, as the mapping `cls.from_dict` takes."""
    given = vars(args)
    values: dict[str, Any] = {}
    for spec in specs(cls):
        if spec.name in given:
            values[spec.name] = given[spec.name]
        elif nested := {k.partition(".")[2]: v for k, v in given.items() if k.startswith(spec.name + ".")}:
            values[spec.name] = nested
    return values


def _keep_saved(cls: type) -> dict[str, dict[str, Any]]:
    """Flags of a saved configuration default to None, "keep what is saved"; the help names the field's default."""
    return {
        s.name: {
            "default": None,
            "help": f"{s.help} (default: the saved value, else {s.default!r})".replace("''", "empty"),
        }
        for s in specs(cls)
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m workbench",
        description=(
            "QA Tuning Workbench: curate QA pairs, sweep decoding parameters, fine-tune, compare BERTScore. "
            "The workspace is $WORKBENCH_HOME (default ./workspace)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, func: Callable, help: str, *, hidden: bool = False) -> argparse.ArgumentParser:
        # A hidden command gets no `help=`: listed with none, argparse 3.11 would print it as ==SUPPRESS==.
        p = sub.add_parser(name, description=help) if hidden else sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    _add_data_commands(command)
    _add_saved_config_commands(command)
    _add_job_commands(command)
    _add_generation_commands(command)
    _add_training_commands(command)
    command(
        "prepare-models",
        cmd_prepare_models,
        "Prepare the embedded models (assemble the GGUF, convert it to a Hugging Face checkpoint).",
    )
    return parser


def _add_data_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
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
        choices=dataset.PART_CHOICES,
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

    p = command(
        "preferences",
        cmd_preferences,
        "Count the preference triples (question, chosen, rejected) the blind ratings and consistent judges give for"
        " a dataset's train and validation questions (what `train --method dpo` trains on); export them as JSONL in"
        " TRL's prompt/chosen/rejected layout.",
    )
    p.add_argument("--dataset", required=True, help="dataset whose rated runs give the triples")
    p.add_argument("-o", "--output", help="JSONL file to write (default: only count)")
    p.add_argument(
        "--part",
        choices=("train", "validation"),
        default="train",
        help="which part's triples to write (default: train)",
    )
    p.add_argument("--prompt-template", default=DEFAULT_TEMPLATE, help="the prompt each question is written in")

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

    for name, func, help in (
        ("datasets", cmd_datasets, "List datasets with their pair counts per status and latest split."),
        ("runs", cmd_runs, "List runs: id, kind, backend, engine, model, adapter, params, n, mean/median F1."),
    ):
        command(name, func, help).add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("compare", cmd_compare, "Compare scored runs in one self-contained HTML report (opens offline).")
    p.add_argument("run_ids", type=int, nargs="+", metavar="RUN_ID", help="two or more runs (see `runs`)")
    p.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    p.add_argument("--metric", choices=list(compare.METRICS), default="f1", help="score to compare (default: f1)")
    p.add_argument("--baseline", type=int, metavar="RUN_ID", help="run the others are tested against")
    p.add_argument("--csv", type=Path, metavar="FOLDER", help="also write summary.csv and per_question.csv here")

    p = command(
        "judge",
        cmd_judge,
        "Ask an LLM judge which of two runs' answers is better (pairwise, in both orders) or to score each (rubric); "
        "prints its win rates and its agreement with the blind human ratings of the same pairs.",
    )
    p.add_argument("run_a", type=int, metavar="RUN_A", help="a run (see `runs`)")
    p.add_argument("run_b", type=int, metavar="RUN_B", help="another run that answered the same questions")
    add_config_flags(p, JudgeConfig)
    _add_background(p)


def _add_saved_config_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Commands over configurations the workspace keeps (the Quality tab's thresholds, the Settings page)."""
    p = command(
        "flag",
        cmd_flag,
        "Recompute the quality flags of a dataset's pairs; thresholds given are saved as the workspace's (as the "
        "Dataset page's Quality tab does), the others keep their saved values.",
    )
    p.add_argument("--dataset", required=True, help="dataset whose pairs are flagged")
    add_config_flags(p, QualityConfig, overrides=_keep_saved(QualityConfig))

    p = command(
        "settings",
        cmd_settings,
        "Show the workspace's settings (as on the Settings page); settings given are validated and saved.",
    )
    add_config_flags(p, WorkbenchSettings, overrides=_keep_saved(WorkbenchSettings))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_job_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("jobs", cmd_jobs, "List background jobs with their state and progress.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("cancel", cmd_cancel, "Cancel a queued or running job (it stops between items).")
    p.add_argument("job_id", type=int, help="id of the job (see `jobs`)")

    p = command("resume", cmd_resume, "Resume an interrupted, cancelled or failed job where it stopped.")
    p.add_argument("job_id", type=int, help="id of the job (see `jobs`)")
    _add_background(p)

    p = command("run-job", cmd_run_job, "Run a job in this process (used by the job runner; not for everyday use).")
    p.add_argument("job_id", type=int, help="id of the job to run")
    p.add_argument("--worker", action="store_true", help="run the job's function here, without a supervisor")

    p = command("engine", cmd_engine, "Serve a generation engine over stdin/stdout (used by the Playground).")
    p.add_argument("--info", action="store_true", help="print the llama.cpp engine's CPU features and exit")

    # Started by the workbench's own jobs, so kept out of the command list.
    p = command("search-worker", cmd_search_worker, "Take trials of a search study until it has enough.", hidden=True)
    p.add_argument("--study", required=True, help="study name, train-search-JOB")
    p.add_argument(
        "--storage", default="", help="storage URL; default $WORKBENCH_OPTUNA_STORAGE, else the store's file"
    )
    p.add_argument("--index", type=int, default=0, help="this worker's number (it seeds the sampler)")
    p.add_argument("--parent", type=int, default=None, help="stop when this process (the search job) ends")

    p = command("train-rank", cmd_train_rank, "One process of a distributed training run.", hidden=True)
    p.add_argument("job_id", type=int, help="the training job")
    p.add_argument("output_dir", help="the job's output folder")


def _add_background(p: argparse.ArgumentParser) -> None:
    p.add_argument("--background", action="store_true", help="return at once with the job id")


def _add_generation_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(
        "generate-qa",
        cmd_generate_qa,
        "Generate candidate QA pairs with an LLM; they arrive as pending, for review on the Dataset page.",
    )
    add_config_flags(p, qa_generation.QAGenerationConfig, overrides={"topics": {"type": qa_generation.parse_topics}})
    _add_background(p)

    p = command(
        "sweep",
        cmd_sweep,
        "Sweep decoding parameters over a dataset split; every configuration "
        "becomes a scored run (BERTScore F1, ROUGE-L). The best is chosen on the validation questions; "
        "`confirm` then runs it on the test part.",
    )
    # The baseline's flags are the parameters' own names (--temperature), as in the grid.
    add_config_flags(p, SweepConfig, overrides={"grid": {"type": _parsed(parse_grid)}, "baseline": {"prefix": ""}})
    _add_background(p)

    p = command(
        "confirm",
        cmd_confirm,
        "Run a sweep's best configuration (chosen on its validation questions) once on the test part of the same "
        "split, as a scored run to report and compare; a sweep already confirmed shows its confirmation.",
    )
    p.add_argument(
        "sweep_id", type=int, metavar="SWEEP_ID", help="the sweep whose best to confirm (`sweep` prints its id)"
    )
    _add_background(p)


def _add_training_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command(
        "train",
        cmd_train,
        "Fine-tune LoRA/QLoRA adapters on a dataset's train part, export them (PEFT, GGUF, merged GGUF + "
        "Modelfile) and evaluate them on the test part as a scored run.",
    )
    add_config_flags(p, TrainConfig)
    search = p.add_argument_group(
        "hyperparameter search (Optuna; then the final training with the best trial's settings)"
    )
    space_help = (
        f"{field_spec(SearchConfig, 'space').help}, e.g. 'learning_rate=1e-5,1e-3 lora_r=4,8,16 lora_alpha=8,16,32 "
        "lora_dropout=0,0.1 epochs=1,3' (low,high for learning_rate, lora_dropout and epochs; choices for r and "
        "alpha); unnamed ones keep these defaults"
    )
    add_config_flags(
        search,
        SearchConfig,
        skip=("base",),  # the training flags above
        overrides={
            # empty: no search; a search's own default number of trials is the Search tab's
            "trials": {"default": None, "help": f"search first: {field_spec(SearchConfig, 'trials').help}"},
            "folds": {"metavar": "K"},
            "space": {"type": _parsed(SearchSpace.parse), "default": "", "help": space_help},
            "first_trials": {
                "type": _parsed(parse_trials),
                "metavar": "TRIALS",
                "help": f"{field_spec(SearchConfig, 'first_trials').help}, e.g. 'learning_rate=2e-4 lora_r=8; "
                "learning_rate=1e-4' (trials separated by ';')",
            },
        },
    )
    search.add_argument(
        "--from-search", type=int, metavar="JOB", help="skip the search: train with search job JOB's best parameters"
    )
    _add_background(p)

    p = command(
        "evaluate",
        cmd_evaluate,
        "Answer the test part with base model + a trained adapter and score it as a run (or finish a run).",
    )
    target = p.add_mutually_exclusive_group(required=True)
    adapter = {"required": False, "metavar": "PATH"}  # the group is required: --adapter or --run
    add_config_flags(target, EvalConfig, only=("train_dir",), overrides={"train_dir": adapter})
    target.add_argument("--run", type=int, metavar="RUN_ID", help="generate and score what an existing run lacks")
    add_config_flags(p, EvalConfig, skip=("train_dir",), overrides={"baseline_run": {"metavar": "RUN_ID"}})
    _add_background(p)


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
