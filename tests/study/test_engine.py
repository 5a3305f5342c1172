"""Tests for study.engine: optimiser factory, aggregation, evaluation, fit on a separable set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from fakes import FakeStore
from torch.utils.data import DataLoader

from study import engine
from study.config import TrainConfig
from study.data import SliceDataset
from study.model import build_model, seed_everything


def bright_dark_store(n_subjects: int, slices: int = 3, shape=(32, 64), seed: int = 0):
    """Odd subjects have bright slices (label 1), even ones dark (label 0), plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_subjects) % 2
    images = []
    for label in labels:
        level = 0.7 if label else 0.3
        x = rng.normal(level, 0.1, size=(slices, *shape)).clip(0, 1)
        images.append((x * 65535).astype(np.uint16))
    subjects = pd.DataFrame(
        {
            "subject_id": [f"s{i}" for i in range(n_subjects)],
            "cohort": "oai",
            "sex": None,
            "slice_start": np.arange(n_subjects) * slices,
            "slice_count": slices,
        }
    )
    return FakeStore(images=np.concatenate(images), subjects=subjects), labels.astype(np.int64)


def test_make_optimizer_kinds_and_error():
    model = build_model(freeze="fc")
    sgd = engine.make_optimizer("sgd", model.parameters(), lr=0.1, momentum=0.5, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    # only fc (weight + bias) is handed to the optimiser
    assert len(sgd.param_groups[0]["params"]) == 2
    adamw = engine.make_optimizer("AdamW", model.parameters(), lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    with pytest.raises(ValueError, match="Invalid optimizer rmsprop. Only sgd and adamw are supported."):
        engine.make_optimizer("rmsprop", model.parameters(), lr=0.1)


def test_aggregate_by_subject_means_slice_probabilities():
    probs = np.array([0.2, 0.9, 0.4, 0.6, 0.1])
    labels = np.array([1, 0, 1, 0, 1])
    rows = np.array([7, 3, 7, 3, 7])
    unique, p, y = engine.aggregate_by_subject(probs, labels, rows)
    assert unique.tolist() == [3, 7]
    assert np.allclose(p, [0.75, (0.2 + 0.4 + 0.1) / 3])
    assert y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="different labels"):
        engine.aggregate_by_subject(probs, np.array([1, 0, 0, 0, 1]), rows)


class ConstantModel(torch.nn.Module):
    """Logits from fixed per-row probabilities, to check evaluate's bookkeeping."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        p = x.mean(dim=(1, 2, 3))  # slice brightness used as probability of class 1
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


def test_evaluate_subject_accuracy_and_loss_hand_computed():
    # subject 0 (label 0): slices 0.2, 0.7 -> mean 0.45 -> predicted 0, correct
    # subject 1 (label 1): slices 0.4, 0.4 -> 0.4 -> predicted 0, wrong
    values = np.array([0.2, 0.7, 0.4, 0.4])
    x = torch.tensor(values, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    y = torch.tensor([0, 0, 1, 1])
    rows = torch.tensor([10, 10, 11, 11])
    loader = DataLoader(list(zip(x, y, rows)), batch_size=3)
    out = engine.evaluate(ConstantModel(), loader)
    assert out["subject_rows"].tolist() == [10, 11]
    assert np.allclose(out["subject_probs"], [0.45, 0.4])
    assert out["subject_acc"] == 0.5
    assert out["slice_acc"] == 0.25  # 0.2 correct, 0.7 wrong, both 0.4 wrong
    expected_loss = -np.mean(np.log([0.8, 0.3, 0.4, 0.4]))
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-5)
    probs, labels, slice_rows = engine.predict(ConstantModel(), loader)
    assert np.allclose(probs, values) and labels.tolist() == [0, 0, 1, 1] and slice_rows.tolist() == rows.tolist()


def test_fit_learns_bright_vs_dark():
    seed_everything(0)
    store, labels = bright_dark_store(16)
    train_rows, val_rows = np.arange(10), np.arange(10, 16)
    train = SliceDataset(store, train_rows, labels[train_rows])
    val = SliceDataset(store, val_rows, labels[val_rows])
    train_loader = DataLoader(train, batch_size=8, shuffle=True)
    val_loader = DataLoader(val, batch_size=16)
    model = build_model(freeze="none")
    seen = []
    result = engine.fit(
        model, train_loader, val_loader, TrainConfig(epochs=2, optimizer="adamw", lr=1e-3),
        on_epoch=lambda epoch, m, state: seen.append((epoch, m["val_subject_acc"], m["val_loss"])),
    )
    assert [e for e, _, _ in seen] == [1, 2] and len(result["history"]) == 2
    assert result["best_val_subject_acc"] == 1.0
    final = engine.evaluate(model, val_loader)
    assert final["subject_acc"] == 1.0
    assert final["loss"] == pytest.approx(result["best_val_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "scripted, best",
    [
        ([(0.5, 0.6), (1.0, 0.9), (0.5, 0.1)], 2),  # highest subject accuracy wins
        ([(0.8, 0.5), (0.8, 0.3), (0.8, 0.4)], 2),  # tie -> lower val loss
    ],
)
def test_fit_restores_best_epoch_weights(monkeypatch, scripted, best):
    seed_everything(0)
    store, labels = bright_dark_store(4, slices=2, shape=(16, 16))
    loader = DataLoader(SliceDataset(store, np.arange(4), labels), batch_size=4)
    model = build_model(freeze="fc")
    script = iter(scripted)

    def fake_evaluate(model, loader, *, device="cpu"):
        acc, loss = next(script)
        return {"subject_acc": acc, "loss": loss, "slice_acc": acc}

    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    weights = {}
    result = engine.fit(
        model, loader, loader, TrainConfig(epochs=3, optimizer="sgd", lr=0.5),
        on_epoch=lambda e, m, state: weights.__setitem__(e, model.backbone.fc.weight.detach().clone()),
    )
    assert result["best_epoch"] == best
    assert (result["best_val_subject_acc"], result["best_val_loss"]) == scripted[best - 1]
    assert torch.equal(model.backbone.fc.weight, weights[best])
    assert not torch.equal(weights[best], weights[3])


def test_fit_stops_when_on_epoch_returns_true_and_propagates_errors():
    seed_everything(0)
    store, labels = bright_dark_store(4, slices=2, shape=(16, 16))
    loader = DataLoader(SliceDataset(store, np.arange(4), labels), batch_size=4)
    model = build_model(freeze="fc")
    result = engine.fit(model, loader, loader, TrainConfig(epochs=5, optimizer="sgd", lr=0.01),
                        on_epoch=lambda e, m, state: True)
    assert len(result["history"]) == 1 and result["best_epoch"] == 1

    def stop(epoch, metrics, state):
        raise KeyboardInterrupt("tune says stop")

    with pytest.raises(KeyboardInterrupt):
        engine.fit(model, loader, loader, TrainConfig(epochs=2, optimizer="sgd", lr=0.01), on_epoch=stop)


def test_fit_resumed_from_a_checkpoint_follows_the_uninterrupted_run():
    """A trial killed after epoch 2 and resumed from its checkpoint (through torch.save and a
    weights_only load, as Tune restores it) ends bit-identical to one that never stopped."""
    import io

    store, labels = bright_dark_store(12, slices=2, shape=(16, 16))
    cfg = TrainConfig(epochs=4, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=5)

    def fresh():
        seed_everything(0)
        model = build_model(freeze="layer4")
        ds = SliceDataset(store, np.arange(12), labels)
        train = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
        return model, train, DataLoader(ds, batch_size=16)

    model, train_loader, val_loader = fresh()
    whole = engine.fit(model, train_loader, val_loader, cfg)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, train_loader, val_loader = fresh()
    buffer = io.BytesIO()

    def stop_after_two(epoch, metrics, state):
        if epoch == 2:
            torch.save({"module": model.state_dict(), "fit": state.to_dict()}, buffer)
            return True

    engine.fit(model, train_loader, val_loader, cfg, on_epoch=stop_after_two)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, train_loader, val_loader = fresh()  # a new process: fresh model, loaders, generator
    model.load_state_dict(saved["module"])
    resumed = engine.fit(model, train_loader, val_loader, cfg, state=engine.FitState.from_dict(saved["fit"]))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    untimed = lambda history: [{k: v for k, v in h.items() if k != "time_s"} for h in history]  # noqa: E731
    assert untimed(resumed["history"]) == untimed(whole["history"])
    assert resumed["best_epoch"] == whole["best_epoch"]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_fit_selects_with_a_custom_key():
    seed_everything(0)
    store, labels = bright_dark_store(4, slices=2, shape=(16, 16))
    loader = DataLoader(SliceDataset(store, np.arange(4), labels), batch_size=4)
    model = build_model(freeze="fc")
    result = engine.fit(model, loader, loader, TrainConfig(epochs=3, lr=0.01),
                        select_key=lambda m: (-m["epoch"],))  # earliest epoch wins
    assert result["best_epoch"] == 1
    assert {"val_subject_balanced_acc", "val_subject_auroc"} <= set(result["history"][0])
