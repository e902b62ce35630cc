"""A run's checkpoint: adapter, optimizer, scheduler, position and random states, written so a kill never loses it.

The checkpoint is kept as generations, checkpoint-N/ (N counts the saves): each is written in full and
fsynced, then `checkpoint`, a symbolic link, is switched to it in one rename, and only then do the older
generations go. A kill at any moment leaves a complete checkpoint on disk, and the next save never removes
it before its successor is in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from core.errors import BadInput
from core.files import fsync, replacing
from core.train_config import TrainConfig
from core.train_dir import TrainDir

STATE_FILE = "state.pt"  # renamed into place last: a generation holding it is complete


def save_checkpoint(model, optimizer, scheduler, state: dict, out: TrainDir) -> None:
    """Adapter + optimizer/scheduler + position + RNG states as a new generation, then pointed at."""
    folder = out.generation(max(map(_generation_number, out.generations()), default=0) + 1)
    model.save_pretrained(folder)
    for written in folder.iterdir():
        fsync(written)
    state = {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **_rng_state()}
    with replacing(folder / STATE_FILE, durable=True) as part:
        torch.save(state, part)
    _point_checkpoint_at(out, folder)
    for stale in out.generations():
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)


def _point_checkpoint_at(out: TrainDir, folder: Path) -> None:
    """Switch `checkpoint` to a complete generation in one rename (a folder of a run from before generations is
    moved aside first: checkpoint_folder finds the newest generation meanwhile)."""
    link = out.checkpoint
    if link.is_dir() and not link.is_symlink():
        link.rename(out.generation(0))
    staged = link.with_name(link.name + ".link")
    staged.unlink(missing_ok=True)
    os.symlink(folder.name, staged)
    os.replace(staged, link)
    fsync(out.root)


def checkpoint_folder(out: TrainDir) -> Path | None:
    """The complete checkpoint a run in `out` resumes from: the one `checkpoint` points at, else the newest complete
    generation; None when there is none."""
    candidates = [out.checkpoint, *sorted(out.generations(), key=_generation_number, reverse=True)]
    return next((folder for folder in candidates if (folder / STATE_FILE).exists()), None)


def discard_checkpoint(out: str | Path) -> None:
    """Remove a run's checkpoint, every generation of it (e.g. a pruned trial's, which is never resumed)."""
    folder = TrainDir(out)
    if folder.checkpoint.is_symlink():
        folder.checkpoint.unlink()
    for generation in [folder.checkpoint, *folder.generations()]:
        shutil.rmtree(generation, ignore_errors=True)


def load_checkpoint(model, optimizer, scheduler, directory: Path, config: TrainConfig) -> dict:
    """Put a checkpoint's adapter, optimizer, scheduler and random states back; returns its position and figures."""
    import peft
    from safetensors.torch import load_file

    state = torch.load(directory / STATE_FILE, weights_only=True)  # plain tensors and numbers: no pickled code
    optimizer_state, scheduler_state = state.pop("optimizer"), state.pop("scheduler")
    rng = {key: state.pop(key) for key in ("rng", "cuda_rng") if key in state}
    # Read through TrainConfig: a checkpoint from before a setting existed has it at its default.
    if _resume_key(TrainConfig.from_dict(state["config"]).to_dict()) != _resume_key(config.to_dict()):
        raise BadInput(f"{directory} holds a checkpoint of different settings; choose another output folder")
    peft.set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    _restore_rng(rng)
    return state


def _resume_key(settings: dict) -> dict:
    """The settings a checkpoint must match to be resumed: what shapes training, not where it is written
    (a distributed run fills output_dir in), what happens after it or how its settings were chosen."""
    return {
        k: v
        for k, v in settings.items()
        if k not in ("output_dir", "evaluate_with", "eval_baseline_run", "export_merged", "selection")
    }


def _generation_number(folder: Path) -> int:
    return int(folder.name.rpartition("-")[2])


def _rng_state() -> dict[str, Any]:
    """The random generators' states: the CPU's, and every CUDA device's when there is one (dropout on a GPU)."""
    state: dict[str, Any] = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    """Put back what _rng_state saved (the CUDA states of the devices this machine has)."""
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"][: torch.cuda.device_count()])
