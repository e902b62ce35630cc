"""The layout of a training run's folder: the one place that names what is in it.

    examples.json       the pairs the run trains and takes its eval loss on, pinned at its start
    checkpoint -> checkpoint-N/   the checkpoint it resumes from (generations: core.training.checkpoints)
    processes.log       what the processes of a distributed run printed
    adapter/            the trained LoRA adapter, PEFT format (adapter_config.json + weights)
    metrics.json        the figures of the finished run
    train_config.json   its settings as resolved (the split it was pinned to, the model path); written last
    export/             what core.packaging makes of it (adapter.gguf, merged GGUF, Modelfile, copies of the above)

Never imports torch: evaluation, export, the pages and the CLI read these folders without loading it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import NotFound, WorkbenchError

ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"  # in a PEFT adapter folder: what makes it one
TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.json"
EXAMPLES_FILE = "examples.json"
EXPORT = "export"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class TrainDir:
    """A training run's folder (see the module docstring for what it holds)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @classmethod
    def holding(cls, path: str | Path) -> TrainDir:
        """The run folder given either itself or its adapter folder."""
        path = Path(path)
        if (path / ADAPTER_CONFIG).exists() and (path.parent / TRAIN_CONFIG).exists():
            return cls(path.parent)
        return cls(path)

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def adapter_config(self) -> Path:
        return self.adapter / ADAPTER_CONFIG

    @property
    def train_config(self) -> Path:
        return self.root / TRAIN_CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def examples(self) -> Path:
        return self.root / EXAMPLES_FILE

    @property
    def processes_log(self) -> Path:
        return self.root / "processes.log"

    @property
    def export(self) -> Path:
        return self.root / EXPORT

    @property
    def gguf_adapter(self) -> Path:
        """The adapter as GGUF for llama.cpp (core.packaging writes it, evaluation on llamacpp applies it)."""
        return self.export / "adapter.gguf"

    @property
    def checkpoint(self) -> Path:
        """The symbolic link to the newest complete checkpoint generation."""
        return self.root / CHECKPOINT

    def generation(self, number: int) -> Path:
        return self.root / f"{CHECKPOINT}-{number}"

    def generations(self) -> list[Path]:
        """The checkpoint generations on disk, complete or not, in no order."""
        return [p for p in self.root.glob(f"{CHECKPOINT}-*") if p.name.removeprefix(f"{CHECKPOINT}-").isdigit()]

    def finished(self) -> bool:
        """Training has ended here: the adapter is saved and the settings (written last) are there."""
        return self.adapter_config.exists() and self.train_config.exists()

    def settings(self, error: type[WorkbenchError] = NotFound) -> dict[str, Any]:
        """The settings the run was made with (train_config.json); `error` when it has not finished."""
        if not self.finished():
            raise error(f"{self.root} is not a finished training run (no {ADAPTER}/ and {TRAIN_CONFIG})")
        return json.loads(self.train_config.read_text())
