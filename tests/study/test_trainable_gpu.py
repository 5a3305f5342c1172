"""GPU code paths, forced on a CPU-only machine: fractional GPUs per trial, the device a trial
picks, and feature-cache keys that name the device and float32 precision (TF32 off)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_features import make_ctx, make_store

from study import features
from study.config import TrainConfig, parse_grid
from study.model import build_model, fp32_precision, seed_everything, use_tf32
from study.preflight import resource_problems
from study.search import concurrency_per_cell
from study.trainable import _device


@pytest.fixture(autouse=True)
def _tf32_back_off():
    yield
    use_tf32(False)


def test_keys_name_the_device_and_its_float32_precision():
    store = make_store()
    seed_everything(0)
    model = build_model(weights="none", freeze="fc")
    cpu, cuda = features.feature_key(model, store, None, "cpu"), features.feature_key(model, store, None, "cuda")
    assert (cpu.device, cpu.precision) == ("cpu", "fp32")
    assert (cuda.device, cuda.precision) == ("cuda", "fp32")  # seed_everything turned TF32 off
    assert cpu.digest() != cuda.digest()
    use_tf32(True)  # someone allowed TF32 after seeding: the features are other numbers, so another entry
    tf32 = features.feature_key(model, store, None, torch.device("cuda:0"))
    assert tf32.precision == "tf32" and tf32.digest() not in (cpu.digest(), cuda.digest())
    assert features.feature_key(model, store, None, "cpu") == cpu  # no TF32 on the CPU


def test_seeding_turns_tf32_off_on_cuda():
    use_tf32(True)
    assert fp32_precision("cuda") == "tf32"
    seed_everything(0)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert fp32_precision("cuda") == "fp32" and fp32_precision("cpu") == "fp32"


def test_a_trial_with_a_gpu_share_runs_on_cuda_when_there_is_one(monkeypatch):
    ctx = make_ctx(make_store(), TrainConfig())
    ctx.gpus_per_trial = 0.25
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(ctx) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device(ctx) == "cuda"
    ctx.gpus_per_trial = 0
    assert _device(ctx) == "cpu"


def test_fractional_gpus_pack_several_trials_per_gpu():
    grid = parse_grid({"question": "q", "name": "g", "store": "s", "grid": {"cohort": ["oai"], "measure": ["leg_strength"]},
                       "search": {"lr": {"loguniform": [1e-4, 1e-2]}},
                       "resources_per_trial": {"cpu": 1, "gpu": 0.25}})
    assert grid.resources_per_trial.gpu == 0.25
    assert concurrency_per_cell(grid, 1, cluster_cpus=16, cluster_gpus=1) == 4  # 4 trials share the GPU
    assert concurrency_per_cell(grid, 2, cluster_cpus=16, cluster_gpus=2) == 4
    assert concurrency_per_cell(grid, 1, cluster_cpus=2, cluster_gpus=1) == 2  # the CPUs bound it
    node = {"NodeManagerAddress": "n1", "Resources": {"CPU": 4, "GPU": 1}}
    assert resource_problems(1, 0.25, [node]) == []
    assert "no GPU" in resource_problems(1, 0.25, [{"Resources": {"CPU": 4}}])[0]


def test_cached_features_reach_the_trial_on_its_device(tmp_path, monkeypatch):
    """feature_loaders moves the features once (to the trial's device), keyed by that device."""
    seen = {}
    real = features.cached_features

    def spy(model, store, idx, **kw):
        seen["device"] = kw["device"]
        return real(model, store, idx, **{**kw, "device": "cpu"})

    monkeypatch.setattr(features, "cached_features", spy)
    store = make_store()
    train = TrainConfig(freeze="fc", weights="none", batch_size=4)
    ctx = make_ctx(store, train)
    seed_everything(0)
    model = build_model(weights="none", freeze="fc")
    moved = []  # no CUDA here: Tensor.to records where the features would go
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(a) or self)
    loaders, _, _ = features.feature_loaders(store, ctx.split, ctx.labels, train, model, cache_dir=tmp_path,
                                             device="cuda")
    assert seen["device"] == "cuda" and moved.count(("cuda",)) == 1 and moved[-1] == ("cuda",)  # once, at the end
    feats = loaders["train"].dataset.tensors[0]
    assert feats.shape == (6 * 3, 512) and np.isfinite(feats.numpy()).all()
