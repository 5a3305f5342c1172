"""Holm and Benjamini-Hochberg across the cells of a launch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from study.multiplicity import adjust, adjust_cells

# Benjamini & Hochberg (1995), section 4: 15 p-values of a clinical trial; at 0.05 BH rejects
# the four smallest, Holm three. Expected values computed by hand from the definitions.
BH95 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262,
        0.5719, 0.6528, 0.7590, 1.0]
HOLM = [0.0015, 0.0056, 0.0247, 0.114, 0.2211, 0.278, 0.278, 0.278, 0.3213] + [1.0] * 6
BH = [0.0015, 0.003, 0.0095, 0.035625, 0.0603, 0.0638571, 0.0638571, 0.0645, 0.0765, 0.486, 0.5811818,
      0.714875, 0.7532308, 0.8132143, 1.0]


def test_holm_and_bh_on_the_bh_1995_example():
    order = np.random.default_rng(0).permutation(15)  # input order must not matter
    p = np.array(BH95)[order]
    assert adjust(p, "holm") == pytest.approx(np.array(HOLM)[order], abs=1e-6)
    assert adjust(p, "bh") == pytest.approx(np.array(BH)[order], abs=1e-6)
    assert int(np.sum(adjust(p, "bh") < 0.05)) == 4 and int(np.sum(adjust(p, "holm") < 0.05)) == 3


def test_nan_cells_are_outside_the_family():
    out = adjust([0.01, math.nan, 0.04], "holm")
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="holm, bh"):
        adjust([0.1], "bonferroni")


def test_adjust_cells_by_family():
    cells = [{"cohort": c, "measure": "leg_strength", "sex": s, "bmi": "all", "test_vs_baseline_p": p}
             for c, s, p in [("oai", "all", 0.01), ("oai", "male", 0.02), ("somma", "all", 0.03),
                             ("somma", "male", math.nan)]]
    launch = adjust_cells(cells)
    assert [r["test_vs_baseline_p_holm"] for r in launch[:3]] == pytest.approx([0.03, 0.04, 0.04])
    assert {r["multiplicity_family"] for r in launch} == {"launch"} and launch[0]["multiplicity_family_size"] == 3
    assert math.isnan(launch[3]["test_vs_baseline_p_holm"])
    by_cohort = adjust_cells(cells, family_by=("cohort",))
    assert by_cohort[0]["test_vs_baseline_p_holm"] == pytest.approx(0.02)
    assert by_cohort[2]["test_vs_baseline_p_holm"] == pytest.approx(0.03)  # alone in its family
    assert by_cohort[2]["multiplicity_family"] == "cohort=somma" and by_cohort[2]["multiplicity_family_size"] == 1
    assert "test_vs_baseline_p_holm" not in cells[0]  # inputs untouched
