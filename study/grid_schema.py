"""The grid's types and allowed values: what a checked grid is (study/config.py reads one).

    from study.grid_schema import GridConfig, TrainConfig, Cell, MEASURES

Every name here is also importable from study.config, the module the rest of the code uses.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

MEASURES = ("leg_strength", "gait_speed_short", "gait_400m", "chair_stand")
SEXES = ("all", "male", "female")
BMI_STRATA = ("all", "<25", "25-30", ">=30")
GRID_AXES = {"cohort": None, "measure": MEASURES, "sex": SEXES, "bmi": BMI_STRATA}
THRESHOLDS = ("cohort", "stratum")  # cohort: median of the whole cohort (the seed's rule)
THRESHOLD_FITS = ("train", "all")  # train: median over training subjects only; all: every subject (the seed)
FREEZE_MODES = ("fc", "layer4", "layer3", "none")
OPTIMIZERS = ("sgd", "adamw")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
SCHEDULERS = ("none", "asha")
# holdout: select on validation subjects, report on untouched test subjects (the default).
# seed_replication: the seed abstract's protocol (train/val only, validation accuracy reported);
# optimistic by construction, kept only to reproduce the published number.
# nested_cv: for small strata; every subject tested once over split.outer_folds outer folds, in
# each the hyperparameters and epochs chosen by split.folds-fold CV on its training subjects,
# refitted on all of them; the outer folds' test predictions are pooled (study/plan.py).
PROTOCOLS = ("holdout", "seed_replication", "nested_cv")
# what picks the epoch, the trial and ASHA's survivors on validation subjects (study/selection.py);
# a constant predictor scores 0.5 balanced accuracy and AUROC, so it cannot win those
SELECT_ON = ("balanced_acc", "auroc", "loss", "acc")
SMALL_CELLS = ("refuse", "nested_cv")  # a cell short of min_test_per_class: refused, or run under nested CV


class GridError(ValueError):
    """A grid file is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50  # the seed's setting; demo grids lower it
    batch_size: int = 8  # the seed's setting
    optimizer: str = "sgd"
    lr: float = 1e-4  # the seed's setting; usually searched
    momentum: float = 0.9
    weight_decay: float = 0.0
    freeze: str = "fc"  # the seed trained only the last layer
    weights: str = "imagenet"  # none | imagenet | path to a .pth state dict
    input_size: tuple[int, int] | None = None  # resize store slices for the network; None = as stored
    slices_per_subject: int | None = None  # central k slices per subject; None = all
    seed: int = 0
    num_workers: int = 0  # DataLoader workers inside a trial; data is preloaded, 0 is fastest here
    feature_cache: bool = True  # frozen-backbone features computed once per node and reused (study/features.py)
    # freeze=fc trials on cached features train in study/head_trainer.py's compiled loop (same
    # results as the torch loop to rounding, ~90x faster); false: always engine.fit
    compiled_head: bool = True


@dataclass(frozen=True)
class SplitConfig:
    val: float = 0.15  # subjects used for selection (trial and epoch choice)
    test: float = 0.15  # subjects never seen until the selected model is evaluated
    seed: int = 0
    stratify_sex: bool = True
    folds: int = 5  # inner folds of nested CV, inside each outer fold's training subjects
    outer_folds: int = 5  # nested_cv: every subject tested once; fold 0 = holdout's test set when test = 1/outer_folds
    stratify_bmi: bool = True  # deal each cohort's subjects by BMI group too (study/splits.py)
    stratify_measure: str | None = None  # also by this measure's provisional (cohort-median) label


@dataclass(frozen=True)
class ResourcesConfig:
    cpu: float = 1
    gpu: float = 0


@dataclass(frozen=True)
class SearchParam:
    name: str
    kind: str  # loguniform | uniform | int | choice | fixed
    values: tuple


@dataclass(frozen=True)
class Cell:
    """One stratum of the grid: its own Optuna study, split and MLflow run."""

    cohort: str
    measure: str
    sex: str = "all"
    bmi: str = "all"

    @property
    def axes(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @property
    def name(self) -> str:
        bmi = self.bmi.replace("<", "lt").replace(">=", "ge")
        return f"{self.cohort}__{self.measure}__sex-{self.sex}__bmi-{bmi}"


@dataclass(frozen=True)
class GridConfig:
    question: str
    name: str
    store: str
    grid: dict[str, tuple[str, ...]]
    search: tuple[SearchParam, ...]
    protocol: str = "holdout"
    threshold: str = "cohort"
    threshold_fit: str = "train"  # held-out subjects' measures never set the threshold
    trials_per_cell: int = 8
    max_concurrent_per_cell: int | None = None  # None: share the cluster's CPUs evenly among cells
    scheduler: str = "none"
    optuna_startup_trials: int = 3  # TPE's random start-up; Optuna's 10 is too many for small budgets
    min_subjects_per_cell: int = 20
    # a trial checkpoints (weights, optimizer, epoch) when this many seconds have passed since
    # its last checkpoint, and after its last epoch: a pre-empted trial loses at most this much
    checkpoint_interval_s: float = 30.0
    trial_retries: int = 1  # a trial whose worker dies restarts from its checkpoint this often
    # 9 per class = at least 18 test subjects: the 95% Clopper-Pearson CI of accuracy is then narrower than +-0.25
    min_test_per_class: int = 9
    small_cells: str = "refuse"  # or nested_cv: a cell short of min_test_per_class runs under nested CV
    select_on: str = "balanced_acc"
    multiplicity_family: tuple[str, ...] = ()  # axes splitting the launch into families; () = one family
    allow_threshold_fit_all: bool = False  # threshold_fit: all outside seed_replication labels test subjects with their own values
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    resources_per_trial: ResourcesConfig = field(default_factory=ResourcesConfig)
    source: str = ""

    def cells(self) -> list[Cell]:
        keys = list(GRID_AXES)
        values = [self.grid.get(k, ("all",)) for k in keys]
        return [Cell(**dict(zip(keys, combo))) for combo in itertools.product(*values)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["search"] = {p.name: {p.kind: list(p.values)} for p in self.search}
        d["grid"] = {k: list(v) for k, v in self.grid.items()}
        return d
