"""LoRA / QLoRA fine-tuning of a causal LM on a dataset's accepted train pairs, one concept per module:

    data.py         the pairs a run is pinned to, as token ids and labels, in length-grouped batches
    model.py        the base model (4-bit for qlora) with fresh LoRA adapters
    loss.py         the loss on answer tokens only, without the logits of the whole vocabulary at once
    checkpoints.py  checkpoint generations a kill never loses
    devices.py      this process's device and rank, the sums the processes of a run share
    metrics.py      the figures a job records in the store
    loop.py         train(): the loop itself
    distributed.py  a run in several processes (accelerate launch)
    job.py          the `train` job: train, then core.packaging, then core.evaluation on the split's test part

The folder a run writes is laid out by core.train_dir. Never merges, quantizes for export or converts
to GGUF (core.packaging), never searches hyperparameters (core.train_search), never reads a test pair
(only the evaluation after training does), and never touches the base model's weights.
"""

from core.train_config import ALL_LINEAR, METHODS, TrainConfig
from core.train_dir import EXAMPLES_FILE, TrainDir
from core.training.checkpoints import checkpoint_folder, discard_checkpoint
from core.training.data import (
    IGNORE,
    PinnedPairs,
    build_examples,
    collate,
    cv_folds,
    length_grouped_batches,
    pinned_pairs,
)
from core.training.distributed import PROCESSES_ENV, rank_main, train_distributed, training_processes
from core.training.job import run_train_job, start_training
from core.training.loop import TrainResult, train
from core.training.loss import answer_loss, eval_loss
from core.training.metrics import metrics_frame
from core.training.model import load_model, lora_config

__all__ = [
    "ALL_LINEAR",
    "EXAMPLES_FILE",
    "IGNORE",
    "METHODS",
    "PROCESSES_ENV",
    "PinnedPairs",
    "TrainConfig",
    "TrainDir",
    "TrainResult",
    "answer_loss",
    "build_examples",
    "checkpoint_folder",
    "collate",
    "cv_folds",
    "discard_checkpoint",
    "eval_loss",
    "length_grouped_batches",
    "load_model",
    "lora_config",
    "metrics_frame",
    "pinned_pairs",
    "rank_main",
    "run_train_job",
    "start_training",
    "train",
    "train_distributed",
    "training_processes",
]
