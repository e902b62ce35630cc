"""What a hyperparameter search is asked to do: SearchConfig, its checks, and a trial's training settings.

Construction refuses what needs no store to refuse (ranges, counts, first trials); `validate(store)` the
rest (the base training settings, the validation part to score on, the Optuna storage). Never trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from core import dataset, studies
from core.config import Config, option
from core.errors import BadInput
from core.store import Store
from core.train_config import TrainConfig
from core.train_search.space import SEARCHED, SearchSpace

Direction = Literal["minimize", "maximize"]  # optuna's study directions
OBJECTIVES: dict[str, Direction] = {"eval_loss": "minimize", "bertscore": "maximize"}
OBJECTIVE_NAMES = {"eval_loss": "eval loss", "bertscore": "BERTScore F1"}


@dataclass(frozen=True)
class SearchConfig(Config):
    """A search's settings: the fixed training settings (base), the space the searched ones come from, the trials."""

    what = "search setting"

    base: dict[str, Any] = option(
        help="the fixed training settings (a TrainConfig); the searched ones are drawn per trial"
    )
    # trials and workers have no min: _check's messages say it as people do ("at least one trial").
    trials: int = option(10, help="trials that must finish (completed or pruned)")
    workers: int = option(1, help="worker processes on this machine, each training one trial at a time")
    objective: str = option(
        "eval_loss",
        help="eval_loss: lowest loss on the validation part after training; bertscore: highest mean F1 of the"
        " answers to the validation questions",
        choices=tuple(OBJECTIVES),
    )
    folds: int = option(
        0,
        help="0: score trials on the split's validation part; K >= 2: K-fold cross-validation over the train part"
        " instead (each trial trains K times, scored by the mean eval loss on the held-out folds), for a dataset"
        " too small for a useful validation part",
        min=0,
    )
    space: SearchSpace = option(SearchSpace(), help="the ranges the searched settings are drawn from")
    prune_startup_trials: int = option(
        2, help="completed trials before the median pruner starts stopping weak trials", min=0
    )
    prune_warmup_epochs: int = option(
        0, help="epochs (folds, with cross-validation) a trial always trains before it can be pruned", min=0
    )
    first_trials: list[dict[str, Any]] = option(
        [], help="parameter sets tried before the sampler draws its own (e.g. your current settings)"
    )
    storage: str = option(
        "", help="Optuna storage URL; empty: the Settings' Optuna storage when given, else the workbench's SQLite file"
    )

    def _check(self) -> None:
        checks = [
            (self.trials >= 1, f"a search needs at least one trial, got {self.trials}"),
            (self.workers >= 1, f"a search needs at least one worker, got {self.workers}"),
            (len(self.first_trials) <= self.trials, f"more first trials ({len(self.first_trials)}) than trials"),
            (
                self.folds == 0 or self.folds >= 2,
                f"folds must be 0 (the validation part) or at least 2, got {self.folds}",
            ),
            (
                self.folds == 0 or self.objective == "eval_loss",
                "cross-validation scores trials by eval_loss (bertscore answers the questions of a split part)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        self.space.check_ranges()
        for params in self.first_trials:
            for name, value in params.items():
                if name not in SEARCHED:
                    raise BadInput(f"first trial sets {name!r}, which is not searched")
                if not self.space.contains(name, value):
                    raise BadInput(f"first trial's {name}={value} lies outside the search space")

    @property
    def direction(self) -> Direction:
        return OBJECTIVES[self.objective]

    def train_config(self, params: dict[str, Any], output_dir: str = "", fold: int = 0) -> TrainConfig:
        """A trial's settings (or, for cross-validation, those of its fold 1..folds; 0: the whole train part)."""
        folds = {"cv_folds": self.folds if fold else 0, "cv_fold": fold}
        return TrainConfig.from_dict({**self.base, **params, "output_dir": output_dir, **folds})

    def validate(self, store: Store) -> TrainConfig:
        """Refuse a search the store cannot run (BadInput, one line) before anything starts; returns the base config."""
        # With cross-validation, a fold's settings: their check also counts the train pairs there are to deal.
        base = self.train_config(self.space.fixed(), fold=1 if self.folds else 0)
        if base.method == "dpo" or base.from_adapter:
            raise BadInput("a hyperparameter search tunes fresh qlora or lora adapters; train DPO as a single run")
        base.validate(store)
        if not self.folds and not dataset.select_pairs(
            store, base.dataset, "validation", "accepted", split_id=base.split_id
        ):
            raise BadInput(
                f"{_no_validation_reason(store, base)}; or cross-validate over the train part instead"
                " (`train --trials N --folds 5`, or Folds on the search form)"
            )
        studies.open_storage(studies.storage_url(store, self.storage))
        return base


def _no_validation_reason(store: Store, base: TrainConfig) -> str:
    """Why a search cannot score its trials on base's validation part (one line)."""
    split = (
        dataset.split_info(store, base.split_id)
        if base.split_id is not None
        else dataset.latest_split(store, base.dataset)
    )
    if split is not None and not split.validation:
        return dataset.no_validation_message(split)
    return f"dataset {base.dataset!r} has no accepted validation pairs to score trials on"
