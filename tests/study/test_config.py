"""Grid files: every shipped ablation parses; bad keys and values are refused with their names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from study.config import GridError, load_grid, parse_grid, parse_override

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {
    "question": "q?",
    "store": "x.zarr",
    "grid": {"cohort": ["oai"], "measure": ["leg_strength"]},
    "search": {"lr": {"loguniform": [1e-4, 1e-2]}},
}


@pytest.mark.parametrize("path", sorted((REPO / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_ablations_parse(path):
    grid = load_grid(path)
    assert grid.question and grid.cells()
    assert all(c.measure in grid.grid["measure"] for c in grid.cells())


def test_bmi_grid_expands_cartesian_product():
    grid = load_grid(REPO / "ablations" / "bmi.yaml")
    assert len(grid.cells()) == 2 * 1 * 3 * 4
    names = {c.name for c in grid.cells()}
    assert "oai__leg_strength__sex-female__bmi-lt25" in names
    assert "somma__leg_strength__sex-all__bmi-ge30" in names


def test_misspelled_key_is_named_with_allowed_keys():
    raw = {**MINIMAL, "trails_per_cell": 4, "train": {"epochz": 3}}
    with pytest.raises(GridError) as exc:
        parse_grid(raw)
    msg = str(exc.value)
    assert "'trails_per_cell'" in msg and "trials_per_cell" in msg.split("'trails_per_cell'")[1]
    assert "train: unknown key 'epochz'" in msg and "epochs" in msg
    assert "2 problem(s)" in msg  # both reported at once


def test_unknown_stratum_values_are_named():
    raw = {**MINIMAL, "grid": {"cohort": ["oai"], "measure": ["leg_strenght"], "sex": ["males"], "bmi": ["<=25"]}}
    with pytest.raises(GridError) as exc:
        parse_grid(raw)
    msg = str(exc.value)
    for bad in ("'leg_strenght'", "'males'", "'<=25'"):
        assert bad in msg
    assert "allowed: all, <25, 25-30, >=30" in msg


def test_bad_search_space_and_train_values():
    raw = {**MINIMAL, "search": {"lr": {"loguniform": [0, 1]}, "freeze": {"choice": ["fc", "layer5"]},
                                 "dropout": {"uniform": [0, 1]}},
           "train": {"optimizer": "rmsprop", "weights": "missing.pth"}, "split": {"val": 0.5, "test": 0.4}}
    with pytest.raises(GridError) as exc:
        parse_grid(raw)
    msg = str(exc.value)
    assert "search.lr.loguniform" in msg and "layer5" in msg and "search.dropout: cannot be searched" in msg
    assert "train.optimizer: expected one of sgd, adamw, got 'rmsprop'" in msg and "'missing.pth'" in msg and "leaves under 20%" in msg


def test_overrides_apply_dotted_keys(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    grid = load_grid(path, dict([parse_override("train.epochs=2"), parse_override("trials_per_cell=5")]))
    assert grid.train.epochs == 2 and grid.trials_per_cell == 5
    assert grid.name == "g"  # experiment named after the file


def test_launch_refuses_bad_grid_before_ray_starts(tmp_path, capsys):
    import ray

    from study.launch import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "grid": {"cohort": ["oai"], "measure": ["leg_strength"], "sex": ["man"]},
                                    "epochs": 3}))
    assert main(["--grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'man'" in err and "unknown key 'epochs'" in err
    assert not ray.is_initialized()


def test_exponent_numbers_are_numbers_in_files_and_set(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("question: q?\nstore: x.zarr\ngrid: {cohort: [oai], measure: [leg_strength]}\n"
                    "search:\n  lr: {loguniform: [1e-5, 1e-2]}\ntrain: {weight_decay: 5e-4}\n")
    grid = load_grid(path, dict([parse_override("train.lr=1e-3")]))
    assert grid.train.lr == 1e-3 and isinstance(grid.train.lr, float)
    assert grid.train.weight_decay == 5e-4 and grid.search[0].values == (1e-5, 1e-2)
    assert parse_override("name=1e3x") == ("name", "1e3x")  # not a number: stays a string


def test_set_on_an_empty_grid_file_lists_the_required_keys(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(GridError) as exc:
        load_grid(path, dict([parse_override("train.epochs=2")]))
    assert "required key 'question'" in str(exc.value) and "required key 'store'" in str(exc.value)
    with pytest.raises(GridError, match="train is 3, not a section"):
        load_grid(REPO / "ablations" / "demo.yaml", {"train": 3, "train.epochs": 2})


def test_choice_values_of_the_wrong_type_or_range_are_refused_together():
    raw = {**MINIMAL, "search": {"lr": {"choice": ["fast", 0.01]}, "batch_size": {"choice": [8, 0]},
                                 "momentum": {"uniform": [0.5, 1.5]}, "epochs": {"loguniform": [1, 10]}},
           "train": {"weight_decay": -1}}
    with pytest.raises(GridError) as exc:
        parse_grid(raw)
    msg = str(exc.value)
    assert "5 problem(s)" in msg
    assert "search.lr.choice: lr must be a number > 0; got 'fast'" in msg
    assert "search.batch_size.choice: batch_size must be an integer >= 1; got 0" in msg
    assert "search.momentum.uniform: momentum must be a number in [0, 1); got 1.5" in msg
    assert "search.epochs: epochs cannot be searched with loguniform; allowed: choice, int" in msg
    assert "train.weight_decay: expected a number >= 0, got -1" in msg


def test_checkpoint_interval_and_retries_are_checked():
    grid = parse_grid({**MINIMAL, "checkpoint_interval_s": 0, "trial_retries": 2})
    assert grid.checkpoint_interval_s == 0 and grid.trial_retries == 2
    with pytest.raises(GridError) as exc:
        parse_grid({**MINIMAL, "checkpoint_interval_s": -1, "trial_retries": "x"})
    assert "checkpoint_interval_s" in str(exc.value) and "trial_retries" in str(exc.value)


def test_statistics_settings_default_and_checked():
    grid = parse_grid(MINIMAL)
    assert grid.select_on == "balanced_acc" and grid.min_test_per_class == 9 and grid.small_cells == "refuse"
    assert grid.multiplicity_family == () and grid.split.outer_folds == 5 and grid.split.stratify_bmi
    ok = parse_grid({**MINIMAL, "select_on": "loss", "multiplicity_family": ["cohort", "measure"],
                     "small_cells": "nested_cv", "split": {"stratify_measure": "leg_strength"}})
    assert ok.select_on == "loss" and ok.multiplicity_family == ("cohort", "measure")
    assert ok.split.stratify_measure == "leg_strength"
    raw = {**MINIMAL, "select_on": "f1", "small_cells": "drop", "multiplicity_family": ["site"],
           "min_test_per_class": 0, "threshold_fit": "all", "split": {"stratify_measure": "grip", "outer_folds": 1},
           "protocol": "nested_cv"}
    with pytest.raises(GridError) as exc:
        parse_grid(raw)
    msg = str(exc.value)
    for piece in ("select_on: unknown value 'f1'", "small_cells: unknown value 'drop'", "multiplicity_family",
                  "min_test_per_class: expected an integer >= 1", "threshold_fit: all labels test subjects",
                  "split.stratify_measure: unknown measure 'grip'", "split.outer_folds"):
        assert piece in msg, piece
    allowed = parse_grid({**MINIMAL, "threshold_fit": "all", "allow_threshold_fit_all": True})
    assert allowed.threshold_fit == "all"
