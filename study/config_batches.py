"""Several Optuna configurations in one Tune trial: when a cell's search may batch, and how.

A freeze="fc" trial on cached features trains in a second or two (study/head_trainer.py); a
Tune trial around it costs about as much again (scheduling, an MLflow run, a worker's reads).
`head_trainer.fit_heads` trains K configurations that share the data in one pass over it
(K = 10: ~0.4 s per configuration instead of ~1.6 s, benchmarks/README.md "Head trainer"), so
such a cell asks Optuna for K configurations per Tune trial:

- the searcher (study/search.py) asks Optuna K times for one Tune trial and tells each of
  the K Optuna trials its own score when the Tune trial ends: Optuna, its journal, its figures
  and the dashboard see every configuration as a trial of its own, as without batching;
- the Tune trial (study/batch_trial.py) trains the K configurations, logs each as an MLflow
  trial run of its own (params, every epoch, tags `config_index`, `optuna_trial`), and reports
  to Tune the scores of all K and the metrics and checkpoint of its best one, so the cell's
  selection (study/evaluation.py) picks the best configuration of the whole search;
- counting (progress, the cell's n_trials) is in configurations.

What a batch changes in the search: Optuna proposes the K configurations of a batch without
the scores of each other, as it does for K trials running at once. During TPE's random
start-up (`optuna_startup_trials`) configurations do not depend on scores at all, so "auto"
batches by that many: the start-up is the same draw as unbatched, and later batches are like
that many concurrent trials.
"""

from __future__ import annotations

import dataclasses

from study.grid_schema import GridConfig, TrainConfig

BATCH_KEY = "configs"  # a batched Tune trial's config: {"configs": [params, ...], "optuna_trials": [n, ...]}
NUMBERS_KEY = "optuna_trials"
CELL_KEY = "cell"  # a shared Tune run's trial config names its cell (study/shared_run.py); progress.py reads it too
# what may differ between the configurations of one batch: what fit_heads trains per configuration
# (the seed, weights, freeze, input size and slices decide the cached features, which a batch shares)
BATCHABLE = ("lr", "momentum", "weight_decay", "batch_size", "optimizer", "epochs")


def batch_reason(grid: GridConfig, train: TrainConfig) -> str | None:
    """None when a cell with training settings `train` may batch configurations, else why not."""
    searched = [p.name for p in grid.search]
    if grid.scheduler != "none":
        return f"scheduler {grid.scheduler} stops trials by epoch, one configuration at a time"
    if grid.protocol == "nested_cv":
        return "nested_cv trials fit k folds and a refit each"
    if train.freeze != "fc":
        return f"freeze {train.freeze}: only an fc head on cached features trains in a batch"
    if not (train.feature_cache and train.compiled_head):
        return "train.feature_cache and train.compiled_head must both be on"
    if grid.resources_per_trial.gpu:
        return "GPU trials: the compiled head runs on CPU"
    fixed = [name for name in searched if name not in BATCHABLE]
    if fixed:
        return f"searched {', '.join(fixed)}: only {', '.join(BATCHABLE)} may differ within a batch"
    return None


def configs_per_trial(grid: GridConfig, train: TrainConfig) -> int:
    """K for a cell: 1 when it cannot batch; "auto": optuna_startup_trials; at most trials_per_cell."""
    if batch_reason(grid, train) is not None:
        return 1
    k = max(1, grid.optuna_startup_trials) if grid.configs_per_trial == "auto" else int(grid.configs_per_trial)
    return max(1, min(k, grid.trials_per_cell))


def explicit_batch_problem(grid: GridConfig) -> str | None:
    """An explicit configs_per_trial > 1 that no cell of the grid can honour (refused before compute)."""
    if grid.configs_per_trial == "auto" or int(grid.configs_per_trial) <= 1:
        return None
    freezes = grid.grid.get("freeze", (grid.train.freeze,))
    reasons = {batch_reason(grid, dataclasses.replace(grid.train, freeze=f)) for f in freezes}
    if None in reasons:
        return None
    return (f"configs_per_trial: {grid.configs_per_trial} needs cells that can batch; "
            f"here: {'; '.join(sorted(r for r in reasons if r))} (use 'auto' or 1)")


def batch_sizes(trials: int, k: int) -> list[int]:
    """Configurations per Tune trial for a search of `trials` configurations, k at a time."""
    k = max(1, k)
    return [k] * (trials // k) + ([trials % k] if trials % k else [])


def shared_run_cells(grid: GridConfig, contexts: list) -> list:
    """The cells of `contexts` (CellContext or CellPlan) that share one Tune run (study/shared_run.py;
    [] for none). Decided from the grid and each cell's settings alone, so that a resumed launch
    shares among the same cells again."""
    if grid.shared_tune_run is False or grid.scheduler != "none" or grid.protocol == "nested_cv":
        return []
    if grid.shared_tune_run == "auto" and any(c.outer_folds or configs_per_trial(grid, c.train) <= 1 for c in contexts):
        return []
    return [c for c in contexts if not c.outer_folds]
