"""An Optuna study kept as a journal file: open it, close the trials a killed driver left
running, log it on a cell's MLflow run. Used by the search (study/search.py, which decides
where the journal lives) and by the figures drawn from it (study/figures.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

JOURNAL_ARTIFACT_DIR = "optuna"  # on the cell run: optuna/<study name>.journal.log


def journal_storage(path: Path):
    """Optuna's JournalStorage on a journal file (created with its folder if absent)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def close_journal(path: Path, study_name: str) -> int:
    """After a search that ran to its end: fail the trials the journal still has as running
    (asked by a driver that was killed before Tune saved them; Tune asked again on resume).
    Returns how many; each gets the user attribute `closed_because`."""
    import optuna
    from optuna.trial import TrialState

    storage = journal_storage(path)
    study = optuna.load_study(study_name=study_name, storage=storage)
    lost = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for t in lost:
        storage.set_trial_user_attr(t._trial_id, "closed_because",
                                    "asked before the launch driver was killed; never run (asked again on resume)")
        study.tell(t.number, state=TrialState.FAIL)
    return len(lost)


def log_journals(client, run_id: str, journals: list[tuple[str, Path]]) -> None:
    """Each search's journal on the cell run as optuna/<study name>.journal.log."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        for name, path in journals:
            target = Path(tmp) / f"{name}.journal.log"
            shutil.copyfile(path, target)
            client.log_artifact(run_id, str(target), JOURNAL_ARTIFACT_DIR)
