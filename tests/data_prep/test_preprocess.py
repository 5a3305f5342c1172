"""Preprocessing recipe: slice window, percentile scaling, resize, config round trip."""

from __future__ import annotations

import numpy as np
import pytest

from scipy import ndimage

from data_prep.preprocess import (Recipe, TooFewSlicesError, apply_recipe, percentiles,
                                 resize_slice, select_stack)


def test_select_stack_central():
    assert select_stack(15, 15) == slice(0, 15)
    assert select_stack(20, 15) == slice(2, 17)
    assert select_stack(5, 3) == slice(1, 4)
    with pytest.raises(ValueError, match="has 10 slices, the recipe needs 15"):
        select_stack(10, 15)


def test_recipe_round_trip_and_unknown_keys():
    r = Recipe(n_slices=5, size=(32, 64))
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict({"size": [32, 64], "n_slices": 5, "version": 2}) == r  # lists
    # a recipe stored before versions existed was made by version 1 (Gaussian + zoom resize)
    assert Recipe.from_dict({"size": [32, 64], "n_slices": 5}).version == 1
    with pytest.raises(ValueError, match=r"version 3 is not supported; supported: \[1, 2\]"):
        Recipe(version=3)
    with pytest.raises(ValueError, match=r"allowed keys: \['n_slices', 'size'"):
        Recipe.from_dict({"n_slice": 5})
    with pytest.raises(ValueError, match="p_low < p_high"):
        Recipe(p_low=60, p_high=40)


def test_apply_recipe_scales_clips_and_resizes():
    rng = np.random.default_rng(0)
    volume = rng.normal(100.0, 10.0, size=(9, 40, 80)).astype(np.float32)
    volume[4, 0, 0] = 1e6  # one outlier must not compress the contrast of the rest
    out, stats = apply_recipe(volume, Recipe(n_slices=5, size=(20, 40)))
    assert out.dtype == np.uint16 and out.shape == (5, 20, 40)
    assert stats["slice_start"] == 2 and stats["n_available"] == 9
    assert stats["intensity_high"] < 1000
    assert 20000 < out.mean() < 45000
    native, _ = apply_recipe(volume, Recipe(n_slices=5, size=(40, 80)))  # no resize blur
    assert native.max() == 65535 and native.min() == 0
    assert np.mean(native == 65535) == pytest.approx(0.005, abs=0.002)  # p_high clips 0.5%
    out2, _ = apply_recipe(volume, Recipe(n_slices=5, size=(20, 40)))
    assert np.array_equal(out, out2)  # deterministic


def test_apply_recipe_constant_volume_and_bad_input():
    out, _ = apply_recipe(np.ones((3, 8, 8), np.float32), Recipe(n_slices=3, size=(8, 8)))
    assert not out.any()
    with pytest.raises(ValueError, match="3-D"):
        apply_recipe(np.ones((8, 8), np.float32), Recipe())
    with pytest.raises(ValueError, match="NaN"):
        apply_recipe(np.full((3, 8, 8), np.nan, np.float32), Recipe(n_slices=3, size=(8, 8)))


def test_resize_is_antialiased():
    # A one-pixel checkerboard has no content a 2x coarser grid can hold: anti-aliasing
    # must average it to grey, plain subsampling would keep 0/1 (or alias to a pattern).
    checker = (np.indices((64, 128)).sum(axis=0) % 2).astype(float)
    small = resize_slice(checker, (32, 64))
    assert small.shape == (32, 64)
    assert np.abs(small - 0.5).max() < 0.1
    # field of view preserved: a left-half bright image stays left-half bright
    half = np.zeros((64, 128))
    half[:, :64] = 1
    small = resize_slice(half, (32, 64))
    assert small[:, :28].min() > 0.9 and small[:, 36:].max() < 0.1


def test_long_stack_keeps_central_slices_and_too_few_is_categorised():
    # 30 slices, slice k filled with k: the central 15 are 7..21 and stats say where.
    volume = np.broadcast_to(np.arange(30, dtype=np.float32)[:, None, None], (30, 8, 16))
    volume = volume + np.linspace(0, 0.5, 16, dtype=np.float32)  # some in-slice contrast
    out, stats = apply_recipe(volume, Recipe(n_slices=15, size=(8, 16), p_low=0, p_high=100))
    assert stats["slice_start"] == 7 and stats["n_available"] == 30
    means = out.reshape(15, -1).mean(axis=1)
    assert np.all(np.diff(means) > 0)  # order kept
    assert out[0].min() == 0 and out[-1].max() == 65535  # 7.0 -> 0, 21.5 -> 65535
    with pytest.raises(TooFewSlicesError, match="has 10 slices") as err:
        apply_recipe(volume[:10], Recipe(n_slices=15, size=(8, 16)))
    assert err.value.reason == "too_few_slices" and isinstance(err.value, ValueError)
    # the recipe is plain data: stored as a dict, rebuilt identically for prediction
    recipe = Recipe(n_slices=15, size=(8, 16), p_low=1.0, p_high=99.0)
    again, _ = apply_recipe(volume, Recipe.from_dict(recipe.to_dict()))
    assert np.array_equal(again, apply_recipe(volume, recipe)[0])


def _reference_recipe(volume: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The recipe written the slow, obvious way (np.percentile on float64, element-wise
    scaling, Gaussian + zoom resize): version 1 must match it bit for bit."""
    w = select_stack(volume.shape[0], recipe.n_slices)
    stack = volume[w].astype(np.float64)
    lo, hi = np.percentile(stack, [recipe.p_low, recipe.p_high])
    scaled = (np.clip(stack, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(stack)
    out = []
    for image in scaled:
        if image.shape != recipe.size:
            f = [image.shape[i] / recipe.size[i] for i in range(2)]
            image = ndimage.gaussian_filter(image, [max(0.0, (x - 1) / 2) for x in f],
                                            mode="nearest")
            image = ndimage.zoom(image, [recipe.size[i] / image.shape[i] for i in range(2)],
                                 order=1, mode="nearest", grid_mode=True)
        out.append(np.rint(np.clip(image, 0.0, 1.0) * 65535).astype(np.uint16))
    return np.stack(out)


@pytest.mark.parametrize("kind", ["integer", "integer_offset", "float", "few_levels",
                                  "int16_wide", "float64_integers"])
def test_fast_paths_are_identical_to_the_reference(kind):
    # integer-valued stacks take the histogram + lookup-table path, others the partition
    # path; both must give exactly what np.percentile + element-wise float64 arithmetic give
    rng = np.random.default_rng(3)
    volume = {
        "integer": rng.integers(0, 4000, (17, 32, 64)).astype(np.float32),
        "integer_offset": rng.integers(-1024, 3000, (17, 32, 64)).astype(np.float32),
        "float": rng.normal(300, 80, (17, 32, 64)).astype(np.float32),
        "few_levels": rng.integers(0, 3, (17, 32, 64)).astype(np.float32),
        # an integer volume whose range overflows its own dtype (32000 - -30000)
        "int16_wide": rng.integers(-30000, 32000, (17, 32, 64)).astype(np.int16),
        "float64_integers": rng.integers(0, 4000, (17, 32, 64)).astype(np.float64),
    }[kind]
    for size in [(32, 64), (16, 32), (12, 24)]:
        recipe = Recipe(n_slices=15, size=size, p_low=0.5, p_high=99.5, version=1)
        out, stats = apply_recipe(volume, recipe)
        assert np.array_equal(out, _reference_recipe(volume, recipe)), size
        stack = volume[1:16].astype(np.float64)
        assert (stats["intensity_low"], stats["intensity_high"]) == tuple(
            np.percentile(stack, [0.5, 99.5]))


def test_percentiles_match_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    for trial in range(400):
        n = int(rng.integers(1, 300))
        values = [rng.integers(-50, 3000, n).astype(np.float32),
                  (rng.normal(size=n) * 100).astype(np.float32),
                  rng.integers(0, 4, n).astype(np.uint16)][trial % 3]
        qs = [float(rng.choice([0.0, 0.5, 50.0, 99.5, 100.0, rng.uniform(0, 100)]))
              for _ in range(2)]
        assert percentiles(values, qs) == tuple(np.percentile(values.astype(np.float64), qs))


def test_version_2_resizes_whole_factors_by_block_mean():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(64, 128))
    blocks = image.reshape(32, 2, 64, 2).mean(axis=(1, 3))
    assert np.array_equal(resize_slice(image, (32, 64)), blocks)
    assert not np.allclose(resize_slice(image, (32, 64), version=1), blocks)
    # a non-whole factor keeps the Gaussian + zoom path in both versions
    assert np.array_equal(resize_slice(image, (48, 96)), resize_slice(image, (48, 96), 1))
    checker = (np.indices((64, 128)).sum(axis=0) % 2).astype(float)
    assert np.abs(resize_slice(checker, (32, 64)) - 0.5).max() < 1e-12  # anti-aliased


def test_percentiles_follow_numpys_rounding_at_half_way():
    # at gamma == 0.5 numpy takes b - (b - a) * 0.5, which can differ from a + (b - a) * 0.5
    # in the last bit: find such a pair and check that the same formula is used
    rng = np.random.default_rng(5)
    for _ in range(10000):
        a, b = np.sort(rng.normal(0, 1000, 2))  # float64: b - a may round
        if a + (b - a) * 0.5 != b - (b - a) * 0.5:
            break
    else:
        pytest.fail("no pair found where the two lerp formulas differ")
    values = np.array([a, b, b + 1])  # n = 3: the 25th percentile is half-way from a to b
    assert percentiles(values, [25.0]) == tuple(np.percentile(values, [25.0]))


@pytest.mark.parametrize("size,version", [((32, 64), 2), ((32, 64), 1), ((24, 40), 2),
                                          ((64, 128), 2)])
def test_stored_integers_and_floats_give_identical_output(size, version):
    """load_volume(stored_values=True) hands uint16 / int16 stacks to apply_recipe: same output
    as the float32 volume of the same values, bit for bit."""
    rng = np.random.default_rng(3)
    stored = rng.integers(100, 3900, (9, 64, 128)).astype(np.uint16)
    stored[2] = 0  # empty levels and a dark slice
    recipe = Recipe(n_slices=7, size=size, version=version)
    reference, ref_stats = apply_recipe(stored.astype(np.float32), recipe)
    for ints in (stored, stored.astype(np.int16) - np.int16(500)):
        floats = ints.astype(np.float32)
        expected, expected_stats = apply_recipe(floats, recipe)
        out, stats = apply_recipe(ints, recipe)
        assert out.dtype == np.uint16 and np.array_equal(out, expected)
        assert stats == expected_stats
    assert np.array_equal(apply_recipe(stored, recipe)[0], reference)
    # stored values + the series rescale == the float32 volume load_volume would build
    for slope, intercept in ((2.0, -5.0), (1.37, 12.25), (-0.5, 3000.0), (1.0, -1024.0)):
        floats = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        expected, expected_stats = apply_recipe(floats, recipe)
        out, stats = apply_recipe(stored, recipe, rescale=(slope, intercept))
        assert np.array_equal(out, expected) and stats == expected_stats, (slope, intercept)
    with pytest.raises(ValueError, match="stored integer"):
        apply_recipe(stored.astype(np.float32), recipe, rescale=(2.0, 0.0))
