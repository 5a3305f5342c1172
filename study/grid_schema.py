"""The grid's types and allowed values: what a checked grid is (study/config.py reads one).

    from study.grid_schema import GridConfig, TrainConfig, Cell, MEASURES

Every name here is also importable from study.config, the module the rest of the code uses.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

FREEZE_MODES = ("fc", "layer4", "layer3", "none")
THRESHOLDS = ("cohort", "stratum")  # cohort: median of the whole cohort (the seed's rule)
MEASURES = ("leg_strength", "gait_speed_short", "gait_400m", "chair_stand")
SEXES = ("all", "male", "female")
BMI_STRATA = ("all", "<25", "25-30", ">=30")
FROM_TRAIN = "train"  # freeze / input_size axis default: the value of `train:` (or `search:`)
SAME_COHORT = "same"  # eval_cohort default: test on the training cohort's own test subjects
LABELS = ("raw", "adjusted")  # adjusted: the measure's residual after `adjust_for` (study/labels.py)
# covariates a label can be adjusted for: subjects-table columns and study/body_size.py's thigh areas
ADJUST_FOR = ("sex", "age", "bmi", "muscle_area", "fat_area", "total_area")
# None: values checked elsewhere (cohort / eval_cohort: against the store; input_size: "RxC")
GRID_AXES = {"cohort": None, "measure": MEASURES, "sex": SEXES, "bmi": BMI_STRATA,
             "eval_cohort": None, "freeze": (FROM_TRAIN, *FREEZE_MODES), "input_size": None, "label": LABELS,
             "threshold_scope": ("grid", *THRESHOLDS)}
# the axes every cell reports; the others only where a cell's value differs from AXIS_DEFAULTS
CORE_AXES = ("cohort", "measure", "sex", "bmi")
AXIS_DEFAULTS = {"sex": "all", "bmi": "all", "eval_cohort": SAME_COHORT, "freeze": FROM_TRAIN,
                 "input_size": FROM_TRAIN, "label": "raw", "threshold_scope": "grid"}
THRESHOLD_FITS = ("train", "all")  # train: median over training subjects only; all: every subject (the seed)
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

    cohort: str  # the training cohort (and the tested one unless eval_cohort names another)
    measure: str
    sex: str = "all"
    bmi: str = "all"
    eval_cohort: str = SAME_COHORT  # another cohort: its test subjects, by its own threshold
    freeze: str = FROM_TRAIN  # a FREEZE_MODES value fixes the cell's freeze (not searched)
    input_size: str = FROM_TRAIN  # "RxC" (e.g. "64x128") or "stored": the cell's network input size
    label: str = "raw"  # adjusted: high/low of the measure's residual after the grid's adjust_for
    threshold_scope: str = "grid"  # cohort | stratum: this cell's threshold rule; "grid": the top-level threshold

    @property
    def axes(self) -> dict[str, str]:
        """cohort, measure, sex, bmi, and each other axis whose value is not its default."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k in CORE_AXES or v != AXIS_DEFAULTS[k]}

    @property
    def is_transfer(self) -> bool:
        return self.eval_cohort not in (SAME_COHORT, self.cohort)

    @property
    def name(self) -> str:
        bmi = self.bmi.replace("<", "lt").replace(">=", "ge")
        extra = "".join(f"__{_SHORT[k]}-{v}" for k, v in self.axes.items() if k not in CORE_AXES)
        return f"{self.cohort}__{self.measure}__sex-{self.sex}__bmi-{bmi}{extra}"


_SHORT = {"eval_cohort": "eval", "freeze": "freeze", "input_size": "size", "label": "label", "threshold_scope": "threshold"}


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
    # Optuna configurations trained together in one Tune trial (study/config_batches.py): "auto"
    # batches fc-head searches on cached features by optuna_startup_trials; 1 = one per trial
    configs_per_trial: int | str = "auto"
    # cells that share one Tune run, so that a trial worker serves cell after cell (study/shared_run.py):
    # "auto" shares when every cell batches configurations (seconds-long trials); True / False
    shared_tune_run: bool | str = "auto"
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
    allow_threshold_fit_all: bool = False
    # label axis "adjusted": covariates (ADJUST_FOR) regressed out of the measure on training subjects
    adjust_for: tuple[str, ...] = ()
    # eval_cohort: largest relative difference of the two cohorts' median stored pixel spacing
    transfer_spacing_tolerance: float = 0.05  # threshold_fit: all outside seed_replication labels test subjects with their own values
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    resources_per_trial: ResourcesConfig = field(default_factory=ResourcesConfig)
    source: str = ""

    def cells(self) -> list[Cell]:
        """The cartesian product of the axes; an eval_cohort equal to the cell's cohort is the
        cell's own ("same"), listed once; with adjust_for and no label axis every cell is adjusted."""
        keys = list(GRID_AXES)
        default = {**AXIS_DEFAULTS, "label": "adjusted" if self.adjust_for else "raw"}
        values = [self.grid.get(k, (default.get(k, "all"),)) for k in keys]
        out: list[Cell] = []
        for combo in itertools.product(*values):
            axes = dict(zip(keys, combo))
            if axes["eval_cohort"] == axes["cohort"]:
                axes["eval_cohort"] = SAME_COHORT
            cell = Cell(**axes)
            if cell not in out:
                out.append(cell)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["search"] = {p.name: {p.kind: list(p.values)} for p in self.search}
        d["grid"] = {k: list(v) for k, v in self.grid.items()}
        return d
