"""Tests for study.features: cached-head equivalence, keys, invalidation, reuse, locking."""

from __future__ import annotations

import dataclasses
import threading
import types

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from fakes import FakeStore

from study import features
from study.config import Cell, TrainConfig
from study.data import SliceDataset
from study.engine import fit, predict
from study.model import build_model, seed_everything
from study.trainable import CellContext, build_trial

SLICES = 3
SHAPE = (32, 32)




def make_store(n_subjects: int = 10, seed: int = 0, content_hash: str = "sha256:fake") -> FakeStore:
    """Odd subjects bright (label 1), even ones dark, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = []
    for s in range(n_subjects):
        level = 0.65 if s % 2 else 0.35
        images.append((rng.normal(level, 0.15, size=(SLICES, *SHAPE)).clip(0, 1) * 65535).astype(np.uint16))
    subjects = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n_subjects)], "cohort": "oai",
                             "sex": None, "slice_start": np.arange(n_subjects) * SLICES,
                             "slice_count": SLICES})
    return FakeStore(images=np.concatenate(images), subjects=subjects, content_hash=content_hash)


def make_ctx(store: FakeStore, train) -> CellContext:
    rows = np.arange(len(store.subjects))
    labels = rows % 2
    split = {"train": rows[:6], "val": rows[6:9], "test": rows[9:]}
    return CellContext(cell=Cell(cohort="oai", measure="leg_strength"), store="unused",
                       store_hash=store.content_hash, train=train, split=split,
                       labels={k: labels[v] for k, v in split.items()}, threshold=0.0,
                       threshold_rule="cohort", direction="higher", tracking_uri="", experiment_id="",
                       cell_run_id="", cpus_per_trial=1, gpus_per_trial=0)


def with_switch(train: TrainConfig, on: bool):
    """The trial reads the switch with getattr, so it works whether or not TrainConfig has it."""
    return types.SimpleNamespace(**{**dataclasses.asdict(train), "feature_cache": on})


def all_slices(store):
    return np.arange(store.images.shape[0])


@pytest.mark.parametrize("freeze", ["fc", "layer4", "layer3"])
def test_head_on_cached_features_equals_full_model(freeze, tmp_path):
    store = make_store()
    seed_everything(0)
    model = build_model(weights="none", freeze=freeze)
    with torch.no_grad():  # a head that is not at its initial values
        for p in features.FeatureHead(model).parameters():
            p.add_(torch.randn_like(p) * 0.05)
    feats, stats = features.cached_features(model, store, all_slices(store), cache_dir=tmp_path)
    assert stats["computed"] == store.images.shape[0]
    x = SliceDataset(store, np.arange(len(store.subjects)), np.zeros(len(store.subjects))).images
    head = features.FeatureHead(model)
    model.eval()
    head.eval()
    with torch.no_grad():
        full = torch.softmax(model(x), 1)
        cached = torch.softmax(head(feats), 1)
    assert (full - cached).abs().max().item() < 1e-5
    # the head is the model's own modules, not copies
    assert head.fc is model.backbone.fc


@pytest.mark.parametrize("freeze", ["fc", "layer4"])
def test_cached_trial_equals_uncached_trial(freeze, tmp_path):
    store = make_store()
    base = TrainConfig(epochs=2, batch_size=4, lr=0.05, freeze=freeze, weights="none", seed=3)
    results = {}
    for on in (True, False):
        train = with_switch(base, on)
        ctx = make_ctx(store, train)
        seed_everything(train.seed)
        model, fit_model, loaders, info = build_trial(store, ctx, train, cache_dir=tmp_path)
        assert (fit_model is not model) == on, info
        assert info["feature_cache"] == "used" if on else info["feature_cache"].startswith("off")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = fit(fit_model, loaders["train"], loaders["val"], train)
        image_loader = torch.utils.data.DataLoader(
            SliceDataset(store, np.arange(len(store.subjects)), np.zeros(len(store.subjects))), batch_size=16)
        probs, _, _ = predict(model, image_loader)  # the full model, from images
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        results[on] = (probs, out["history"], changed)
    (p_cached, h_cached, changed_cached), (p_plain, h_plain, changed_plain) = results[True], results[False]
    assert changed_cached == changed_plain and changed_cached  # same parameters trained
    assert all(k.startswith(("backbone.fc", "backbone.layer4")) for k in changed_cached)
    assert np.abs(p_cached - p_plain).max() < 1e-5
    for a, b in zip(h_cached, h_plain):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_subject_acc"] == b["val_subject_acc"]


def test_key_changes_give_different_entries(tmp_path):
    store = make_store()
    seed_everything(0)
    model = build_model(weights="none", freeze="fc")
    seed_everything(1)
    other_weights = build_model(weights="none", freeze="fc")
    seed_everything(0)
    layer4 = build_model(weights="none", freeze="layer4")
    idx = np.arange(6)
    calls = {
        "base": (model, store, None),
        "store hash": (model, make_store(content_hash="sha256:other"), None),
        "weights": (other_weights, store, None),
        "block": (layer4, store, None),
        "input size": (model, store, (16, 16)),
    }
    entries = {}
    for what, (m, s, size) in calls.items():
        _, stats = features.cached_features(m, s, idx, input_size=size, cache_dir=tmp_path)
        assert stats["computed"] == idx.size, what
        entries[what] = stats["entry"]
    assert len(set(entries.values())) == len(entries), entries
    # the same weights under another name (no copy) and a trained fc give the same key:
    # only the frozen prefix's values count
    seed_everything(0)
    again = build_model(weights="none", freeze="fc")
    with torch.no_grad():
        again.backbone.fc.weight.add_(1.0)
    assert features.feature_key(again, store, None) == features.feature_key(model, store, None)
    key = features.feature_key(model, store, None)
    bumped = dataclasses.replace(key, code_version=key.code_version + 1)
    assert bumped.digest() != key.digest()


def test_second_call_reads_cache_and_overlap_computes_only_new(tmp_path, monkeypatch):
    store = make_store()
    seed_everything(0)
    model = build_model(weights="none", freeze="fc")
    counted = {"slices": 0}
    real = features.frozen_forward

    def counting(m, x):
        counted["slices"] += x.shape[0]
        return real(m, x)

    monkeypatch.setattr(features, "frozen_forward", counting)
    first, stats1 = features.cached_features(model, store, np.arange(0, 12), cache_dir=tmp_path)
    n_after_first = counted["slices"]
    second, stats2 = features.cached_features(model, store, np.arange(0, 12)[::-1], cache_dir=tmp_path)
    assert stats2["computed"] == 0 and counted["slices"] == n_after_first  # no forward at all
    assert torch.equal(second, first.flip(0))  # aligned with the requested order
    # another cell sharing slices 6..11 computes only 12..17
    _, stats3 = features.cached_features(model, store, np.arange(6, 18), cache_dir=tmp_path)
    assert (stats3["computed"], stats3["cached"]) == (6, 6)
    assert counted["slices"] == n_after_first + 6


def test_incomplete_or_partly_written_entry_is_recomputed(tmp_path):
    store = make_store()
    seed_everything(0)
    model = build_model(weights="none", freeze="fc")
    idx = all_slices(store)
    good, stats = features.cached_features(model, store, idx, cache_dir=tmp_path)
    group = zarr.open_group(stats["entry"], mode="r+")
    # a writer killed after writing features but before marking them: rows read as unwritten
    written = group["written"][:]
    written[4:9] = False
    group["written"][:] = written
    group["features"][4:9] = 0.0
    again, stats = features.cached_features(model, store, idx, cache_dir=tmp_path)
    assert (stats["computed"], stats["cached"]) == (5, idx.size - 5)
    assert torch.equal(again, good)
    # an entry whose creation never finished is rebuilt from scratch
    group.attrs["complete"] = False
    again, stats = features.cached_features(model, store, idx, cache_dir=tmp_path)
    assert stats["computed"] == idx.size
    assert torch.equal(again, good)


def test_concurrent_callers_compute_once(tmp_path):
    store = make_store()
    seed_everything(0)
    model = build_model(weights="none", freeze="fc")
    idx = all_slices(store)
    out = []
    barrier = threading.Barrier(2)

    def worker():
        barrier.wait()
        out.append(features.cached_features(model, store, idx, cache_dir=tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s["computed"] for _, s in out) == [0, idx.size]
    assert torch.equal(out[0][0], out[1][0])


def test_ineligible_reasons():
    store = make_store()
    base = TrainConfig(freeze="fc")
    assert features.ineligible_reason(base, store) is None
    assert "freeze='none'" in features.ineligible_reason(dataclasses.replace(base, freeze="none"), store)
    assert "off" in features.ineligible_reason(with_switch(base, False), store)
    augmented = types.SimpleNamespace(**{**dataclasses.asdict(base), "augment": True})
    assert "augmentation" in features.ineligible_reason(augmented, store)
    assert "content_hash" in features.ineligible_reason(base, make_store(content_hash=""))


def test_prune_removes_least_recently_used(tmp_path):
    store = make_store()
    entries = []
    for seed in (0, 1):
        seed_everything(seed)
        model = build_model(weights="none", freeze="fc")
        entries.append(features.cached_features(model, store, np.arange(3), cache_dir=tmp_path)[1]["entry"])
    removed = features.prune(tmp_path, max_bytes=1)
    assert [str(p) for p in removed] == entries  # oldest first, all over the limit
    assert features.prune(tmp_path, max_bytes=0) == []


def test_a_process_rereading_the_same_rows_gets_them_from_memory(tmp_path, monkeypatch):
    """A worker's next trial of the cell: the entry is checked on disk, the rows not read again."""
    from study import feature_memo

    feature_memo.clear()
    store = make_store()
    seed_everything(0)
    model = build_model(weights="none", freeze="fc")
    idx = np.arange(3, 15)[::-1]
    first, stats1 = features.cached_features(model, store, idx, cache_dir=tmp_path)
    first_again, stats_hit = features.cached_features(model, store, idx, cache_dir=tmp_path)
    assert "memo" not in stats1 and stats_hit["memo"] is True and stats_hit["computed"] == 0
    assert torch.equal(first_again, first)
    other, stats_other = features.cached_features(model, store, idx[::-1], cache_dir=tmp_path)  # other order: read
    assert "memo" not in stats_other and torch.equal(other, first.flip(0))
    reads, real = [], zarr.Array.get_orthogonal_selection

    def counting(self, *a, **k):
        reads.append(self.path)
        return real(self, *a, **k)

    monkeypatch.setattr(zarr.Array, "get_orthogonal_selection", counting)
    features.cached_features(model, store, idx, cache_dir=tmp_path)
    assert "features" not in reads and "written" in reads  # the entry is checked, its rows not read
    monkeypatch.undo()
    # a torn entry on disk is noticed although the rows are held: they are computed again
    group = zarr.open_group(stats1["entry"], mode="r+")
    written = group["written"][:]
    written[5:7] = False
    group["written"][:] = written
    again, stats = features.cached_features(model, store, idx, cache_dir=tmp_path)
    assert stats["computed"] == 2 and "memo" not in stats and torch.equal(again, first)


def test_a_worker_builds_the_initial_model_once_per_seed():
    """_initial_model: the same weights and torch RNG state after it as build_model itself."""
    from study import trainable

    train = TrainConfig(freeze="fc", weights="none")
    trainable._INITIAL.clear()
    states = []
    for _ in range(2):  # the second call copies the model the first one built
        seed_everything(3)
        model = trainable._initial_model(train)
        states.append(({k: v.clone() for k, v in model.state_dict().items()}, torch.rand(4)))
    seed_everything(3)
    fresh = build_model(weights="none", freeze="fc")
    after = torch.rand(4)
    for got, rng_after in states:
        assert got.keys() == fresh.state_dict().keys()
        assert all(torch.equal(got[k], v) for k, v in fresh.state_dict().items())
        assert torch.equal(rng_after, after)
    seed_everything(4)  # another seed: built anew, other weights
    other = trainable._initial_model(train)
    assert not torch.equal(other.backbone.fc.weight, fresh.backbone.fc.weight)
    with torch.no_grad():  # what a trial does to its model never reaches the next trial's
        other.backbone.fc.weight.add_(1.0)
    seed_everything(4)
    assert not torch.equal(trainable._initial_model(train).backbone.fc.weight, other.backbone.fc.weight)


def test_the_test_subjects_are_evaluated_on_the_cached_features_the_trial_used(tmp_path, monkeypatch):
    """eval_inputs: a head checkpoint is scored on cached features, as the images would score it."""
    from study.engine import evaluate
    from study.trainable import eval_inputs

    monkeypatch.setenv(features.CACHE_ENV, str(tmp_path))
    store = make_store()
    train = TrainConfig(freeze="fc", weights="none", epochs=1, batch_size=4)
    ctx = make_ctx(store, train)
    seed_everything(0)
    model = build_model(weights="none", freeze="fc")
    with torch.no_grad():
        model.backbone.fc.weight.add_(torch.randn_like(model.backbone.fc.weight) * 0.1)
    module, loader, how = eval_inputs(store, ctx, train, model, cached=True)
    assert how == "cached features" and isinstance(module, features.FeatureHead)
    module_i, loader_i, images_how = eval_inputs(store, ctx, train, model, cached=False)
    assert module_i is model and images_how.startswith("images")
    a, b = evaluate(module, loader), evaluate(module_i, loader_i)
    assert np.array_equal(a["subject_rows"], b["subject_rows"]) and np.array_equal(a["subject_rows"], ctx.split["test"])
    assert np.abs(a["subject_probs"] - b["subject_probs"]).max() <= 1e-5
    assert a["slice_acc"] == b["slice_acc"]
