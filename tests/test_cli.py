"""The CLI as a user runs it: `python -m workbench …` in a subprocess on a real workspace."""

import json

import pytest

from tests.conftest import run_cli

MALFORMED = {
    "missing question column": ("x.csv", b"prompt,answer\nq?,a\n"),
    "empty file": ("x.csv", b""),
    "header only": ("x.csv", b"question,answer\n"),
    "binary": ("x.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    "broken quoting": ("x.csv", b'question,answer\n"what?,an answer\nq2?,a2\n'),
    "truncated json": ("x.json", b'[{"question": "q?", "answer": "a"}, {"question": '),
    "json not an array": ("x.json", b'{"question": "q?", "answer": "a"}'),
    "bad jsonl line": ("x.jsonl", b'{"question": "q?", "answer": "a"}\nnot json\n'),
    "wrong value type": ("x.jsonl", b'{"question": 42, "answer": "a"}\n'),
    "unknown extension": ("x.txt", b"question,answer\nq?,a\n"),
    "all rows blank": ("x.csv", b"question,answer\n ,a\nq?, \n"),
}


def export_all(tmp_path):
    out = tmp_path / "snapshot.jsonl"
    assert (
        run_cli("export", "--dataset", "starter", "--status", "all", "--format", "jsonl", "-o", str(out)).returncode
        == 0
    )
    datasets = run_cli("datasets", "--json")
    return out.read_text(), json.loads(datasets.stdout)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_file_exits_2_with_one_line_and_changes_nothing(case, tmp_path):
    before = export_all(tmp_path)
    name, content = MALFORMED[case]
    path = tmp_path / name
    path.write_bytes(content)
    result = run_cli("import", str(path), "--dataset", "starter")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in result.stderr
    assert export_all(tmp_path) == before


def test_import_reports_added_and_skipped_rows(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes(b'\xef\xbb\xbfQuestion,ANSWER,field,source\r\nq1?,"two\r\nlines",ml,paper\r\n,blank\r\n')
    result = run_cli("import", str(path), "--status", "pending")
    assert result.returncode == 0, result.stderr
    assert "imported 1 pair(s) into 'mine' as pending, skipped 1 row(s)" in result.stdout


def test_split_then_export_each_part(tmp_path):
    result = run_cli("split", "--dataset", "starter", "--test-size", "0.2", "--seed", "3")
    assert result.returncode == 0 and "split v2" in result.stdout  # v1 came with the starter dataset
    sizes = {}
    for part in ("train", "validation", "test"):
        out = tmp_path / f"{part}.jsonl"
        assert (
            run_cli("export", "--dataset", "starter", "--split", part, "--format", "jsonl", "-o", str(out)).returncode
            == 0
        )
        sizes[part] = len(out.read_text().splitlines())
    assert f"{sizes['train']} train / {sizes['validation']} validation / {sizes['test']} test" in result.stdout


def test_bad_flags_exit_2_without_traceback():
    for args in (
        ["split", "--dataset", "nope"],
        ["split", "--dataset", "starter", "--test-size", "1.5"],
        ["export", "--dataset", "nope", "--split", "test", "-o", "/tmp/x.jsonl"],
        ["train", "--dataset", "starter", "--learning-rate", "0"],
        ["train", "--dataset", "starter", "--lora-r", "0"],
        ["evaluate", "--adapter", "/nowhere"],
        ["import"],
        ["resume", "999"],
        ["confirm", "999"],
        ["sweep", "--dataset", "starter", "--grid", "temperature=0", "--split", "everything"],
    ):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) >= 1


def test_runs_lists_nothing_on_a_fresh_workspace():
    result = run_cli("runs", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_every_subcommand_documents_every_option():
    from workbench.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"import", "export", "split", "runs", "jobs", "cancel", "resume"} <= set(sub.choices)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.dest} has no help"
    assert run_cli("--help").returncode == 0
    assert "--test-size" in run_cli("split", "--help").stdout


# ---- flags built from the configuration dataclasses (tests/test_form_parity.py holds them to the fields) -------


def _subparser(command: str):
    from workbench.cli import build_parser

    parser = build_parser()
    return parser, next(a for a in parser._actions if a.dest == "command").choices[command]


def test_renamed_flags_keep_their_names():
    _, sweep = _subparser("sweep")
    flags = {a.dest: a.option_strings[0] for a in sweep._actions if a.option_strings}
    assert (flags["part"], flags["scorer_model"], flags["baseline.temperature"]) == (
        "--split",
        "--scorer",
        "--temperature",
    )
    _, evaluate = _subparser("evaluate")
    flags = {a.dest: a.option_strings[0] for a in evaluate._actions if a.option_strings}
    assert (flags["train_dir"], flags["part"], flags["base_gguf"]) == ("--adapter", "--split", "--base-gguf")


def test_the_generate_page_s_decoding_settings_are_flags_of_generate_qa():
    from core.qa_generation import QAGenerationConfig
    from workbench.cli import build_parser, flag_values

    args = build_parser().parse_args(
        ["generate-qa", "--dataset", "d", "--topics", "nlp; hci", "--answer-temperature", "0.2"]
        + ["--question-max-tokens", "30"]
    )
    values = flag_values(args, QAGenerationConfig)
    assert values["topics"] == ["nlp", "hci"]
    assert values["answer_params"]["temperature"] == 0.2 and values["question_params"]["max_tokens"] == 30


def test_train_has_the_search_s_pruning_flags():
    from workbench.cli import build_parser

    args = build_parser().parse_args(["train", "--dataset", "d", "--trials", "4", "--prune-startup-trials", "3"])
    assert (args.trials, args.prune_startup_trials, args.prune_warmup_epochs) == (4, 3, 0)


def test_train_takes_a_search_s_first_trials():
    from workbench.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--dataset", "d", "--trials", "4", "--first-trials", "learning_rate=2e-4 lora_r=8; lora_r=16"]
    )
    assert args.first_trials == [{"learning_rate": 2e-4, "lora_r": 8}, {"lora_r": 16}]


def test_settings_shows_and_saves_what_the_settings_page_does():
    shown = json.loads(run_cli("settings", "--json").stdout)
    assert {"setting": "ollama_parallel", "value": 1} in shown
    saved = run_cli("settings", "--ollama-parallel", "4", "--ollama-host", "http://127.0.0.1:9")
    assert saved.returncode == 0 and "saved: ollama_host, ollama_parallel" in saved.stderr
    again = run_cli("settings", "--optuna-storage", "sqlite:////tmp/s.db", "--json")
    values = {row["setting"]: row["value"] for row in json.loads(again.stdout)}
    # a setting not given keeps its saved value
    assert (values["ollama_parallel"], values["ollama_host"], values["optuna_storage"]) == (
        4,
        "http://127.0.0.1:9",
        "sqlite:////tmp/s.db",
    )
    refused = run_cli("settings", "--generator-gguf", "/no/such.gguf")
    assert refused.returncode == 2 and refused.stderr.strip() == "error: no GGUF file at /no/such.gguf"


def test_flag_re_flags_a_dataset_with_the_thresholds_given_and_keeps_them():
    from core import quality
    from core.store import Store

    result = run_cli("flag", "--dataset", "starter", "--min-answer-words", "80")
    assert result.returncode == 0 and "117 pair(s) of 'starter' re-flagged" in result.stdout
    assert "short answer" in result.stdout  # the starter's answers are shorter than 80 words
    run_cli("flag", "--dataset", "starter", "--max-answer-words", "300")
    with Store() as store:
        kept = quality.load_config(store)
    assert (kept.min_answer_words, kept.max_answer_words) == (80, 300)
    bad = run_cli("flag", "--dataset", "starter", "--min-answer-words", "400")  # above max_answer_words
    assert bad.returncode == 2 and "min_answer_words (400) must be below max_answer_words (300)" in bad.stderr


@pytest.mark.parametrize(
    "command",
    ["import", "export", "split", "datasets", "runs", "compare", "jobs", "cancel", "resume", "run-job", "engine"]
    + ["generate-qa", "sweep", "confirm", "train", "evaluate", "prepare-models", "search-worker", "train-rank"],
)
def test_every_command_s_help_works(command, capsys):
    from workbench.cli import build_parser

    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([command, "--help"])
    assert exit.value.code == 0 and "usage: python -m workbench " + command in capsys.readouterr().out


def test_hidden_commands_are_not_listed_but_parse():
    from workbench.cli import build_parser, cmd_search_worker, cmd_train_rank

    listing = run_cli("--help").stdout
    assert "search-worker" not in listing and "train-rank" not in listing and "SUPPRESS" not in listing
    parser = build_parser()
    worker = parser.parse_args(["search-worker", "--study", "train-search-7", "--index", "2"])
    assert (worker.func, worker.study, worker.storage, worker.index, worker.parent) == (
        cmd_search_worker,
        "train-search-7",
        "",
        2,
        None,
    )
    rank = parser.parse_args(["train-rank", "12", "/tmp/out"])
    assert (rank.func, rank.job_id, rank.output_dir) == (cmd_train_rank, 12, "/tmp/out")


def test_the_product_cli_has_no_bench_command():
    assert run_cli("bench", "dataset").returncode == 2


@pytest.mark.empty_workspace
@pytest.mark.parametrize(
    "args",
    [
        ["sweep", "--dataset", "starter", "--grid", "temperature=0", "--temperature", "5"],
        ["sweep", "--dataset", "starter", "--grid", "temperature=0", "--repeats", "0"],
        ["generate-qa", "--dataset", "d", "--topics", "nlp", "--answer-max-tokens", "lots"],
        ["sweep", "--dataset", "starter", "--grid", "temperature=hot"],
    ],
    ids=["above max", "below min", "not a number", "bad grid"],
)
def test_a_bad_value_exits_2_with_one_line_before_the_workspace_opens(args, workbench_home):
    result = run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (workbench_home / "workbench.sqlite").exists()
