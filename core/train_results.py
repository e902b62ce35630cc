"""What a training or search job is and what it left, as the Training page shows it: no torch, no Streamlit.

The page knows neither a job's params layout (a search keeps its training settings under "base") nor the
training folder's (core.train_dir): it asks here. Never writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.jobs import JobInfo
from core.train_dir import TrainDir

# An export's work in progress: written beside its target, then renamed into place (core.files).
_UNFINISHED = (".part", ".tmp")


def dataset_of(job: JobInfo) -> str | None:
    """The dataset a `train` or `train-search` job trains on."""
    params = job.params.get("base", {}) if job.kind == "train-search" else job.params
    return params.get("dataset")


def describe(job: JobInfo) -> str:
    """One line naming a training or search job by what it was asked to do."""
    p = job.params
    if job.kind == "train-search":
        folds = f", {p['folds']}-fold cross-validation" if p.get("folds") else ""
        return f"job {job.id} · {job.state} · {p.get('trials')} trials by {p.get('objective')}{folds}"
    line = f"job {job.id} · {job.state} · {p.get('method')} r={p.get('lora_r')} lr={p.get('learning_rate'):g}"
    if p.get("method") == "dpo":
        line += f" beta={p.get('beta'):g}"
    if p.get("from_adapter"):
        line += f" after {Path(p['from_adapter']).name}"
    return line


def continuable(train_jobs: list[JobInfo]) -> dict[str, str]:
    """The finished training runs whose adapter a new run can continue (from_adapter): folder -> description."""
    return {
        str(out): describe(job)
        for job in train_jobs
        if (out := job.figures.get("output_dir")) and TrainDir(out).finished()
    }


def objective(job: JobInfo) -> str:
    """What a search's trials are scored by."""
    return job.params.get("objective", "eval_loss")


def chosen_how(job: JobInfo) -> str | None:
    """How a training run's settings were chosen (by a search), if they were."""
    return job.params.get("selection", {}).get("how")


@dataclass(frozen=True)
class TrainOutput:
    """A training job's folder once its adapter is saved, and its export when there is one."""

    folder: Path
    eval_run_id: int | None
    export_dir: Path | None  # None until the export step has run
    files: list[dict]  # {"file", "size"} per finished export file
    ollama_command: str | None  # registers the merged GGUF (exported with export_merged)
    modelfile: str | None


def train_output(job: JobInfo) -> TrainOutput | None:
    """What a training job left, or None while it has no adapter yet."""
    out = job.figures.get("output_dir")
    if not out or not TrainDir(out).adapter_config.exists():
        return None
    folder, export_dir = Path(out), TrainDir(out).export
    if not export_dir.is_dir():
        return TrainOutput(folder, job.figures.get("eval_run_id"), None, [], None, None)
    files = [
        {"file": p.name, "size": _size(p)}
        for p in sorted(export_dir.iterdir())
        if not p.name.endswith(_UNFINISHED) and p.name != "merged-hf"  # the merge's intermediate checkpoint
    ]
    modelfile = export_dir / "Modelfile"
    command = export_dir / "ollama-create.txt"
    return TrainOutput(
        folder,
        job.figures.get("eval_run_id"),
        export_dir,
        files,
        command.read_text().strip() if modelfile.exists() and command.exists() else None,
        modelfile.read_text() if modelfile.exists() else None,
    )


def zipped(folder: Path) -> bytes:
    """The export of a training folder as one zip (built on demand: a merged GGUF is hundreds of MB)."""
    from core import packaging

    return packaging.zip_package(folder).read_bytes()


def _size(path: Path) -> int:
    """Bytes in a file or folder; 0 for what an export still running renames or removes meanwhile."""
    try:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    except FileNotFoundError:
        return 0
