"""study.head_fit: a trial's fc head on the compiled trainer looks to the trial like engine.fit.

Same loaders, seed and settings as the torch loop: the epoch metrics each on_epoch call sees,
the selected epoch, the best weights a checkpoint would hold, and a stop from on_epoch.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_head_trainer import loaders_and_model

from study import engine
from study.config import TrainConfig
from study.head_fit import fit_head_like_engine, head_trainer_reason
from study.selection import epoch_key

METRICS = ("train_loss", "val_loss", "val_slice_acc", "val_subject_acc", "val_subject_balanced_acc",
           "val_subject_auroc")


@pytest.fixture(autouse=True)
def one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def record(calls):
    def on_epoch(epoch, metrics, st):
        calls.append((epoch, dict(metrics), st.best_epoch, copy.deepcopy(st.best_state), st.epoch))
    return on_epoch


@pytest.mark.parametrize("select_on", ["balanced_acc", "loss"])
def test_reports_like_engine_fit(select_on, tmp_path):
    train = TrainConfig(epochs=30, batch_size=8, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=1e-3,
                        freeze="fc", weights="none")
    loaders, head, _ = loaders_and_model(tmp_path)
    start = copy.deepcopy(head.state_dict())
    ref_calls, new_calls = [], []
    ref = engine.fit(head, loaders["train"], loaders["val"], train, on_epoch=record(ref_calls),
                     select_key=epoch_key(select_on))
    head.load_state_dict(start)
    new = fit_head_like_engine(head, loaders, train, select_key=epoch_key(select_on), on_epoch=record(new_calls))

    assert [c[0] for c in new_calls] == list(range(1, 31)) == [c[0] for c in ref_calls]
    for (_, m_ref, best_ref, _, _), (_, m_new, best_new, _, ep) in zip(ref_calls, new_calls):
        for k in METRICS:
            assert m_new[k] == pytest.approx(m_ref[k], abs=1e-5, nan_ok=True), k
        assert best_new == best_ref  # the best-so-far at every epoch, as Tune and the checkpoint see it
        assert set(m_new) == set(m_ref)
    assert new["best_epoch"] == ref["best_epoch"]
    # the state at the last epoch carries the best weights (what the trial checkpoint stores)
    best_state = new_calls[-1][3]
    for k, v in ref["state"].best_state.items():
        assert torch.allclose(best_state[k], v, atol=1e-5), k
    # like engine.fit, the module ends at the best epoch's weights
    for k, v in head.state_dict().items():
        assert torch.allclose(v, ref["state"].best_state[k], atol=1e-5), k


def test_a_stop_from_on_epoch_ends_the_replay(tmp_path):
    train = TrainConfig(epochs=10, batch_size=8, optimizer="adamw", lr=3e-3, freeze="fc", weights="none")
    loaders, head, _ = loaders_and_model(tmp_path)
    seen = []

    def on_epoch(epoch, metrics, st):
        seen.append(epoch)
        return epoch == 4  # as a scheduler's stop

    out = fit_head_like_engine(head, loaders, train, select_key=epoch_key("acc"), on_epoch=on_epoch)
    assert seen == [1, 2, 3, 4] and len(out["history"]) == 4 and out["state"].epoch == 4
    assert out["state"].best_state is None  # mid-run states hold no weights: no checkpoint from them

    def raising(epoch, metrics, st):
        if epoch == 2:
            raise RuntimeError("Tune stopped the trial")

    with pytest.raises(RuntimeError, match="Tune stopped"):
        fit_head_like_engine(head, loaders, train, select_key=epoch_key("acc"), on_epoch=raising)


def test_when_the_compiled_trainer_applies(tmp_path):
    loaders, head, model = loaders_and_model(tmp_path)
    train = TrainConfig(freeze="fc", weights="none")
    used = {"feature_cache": "used"}
    assert head_trainer_reason(train, used, head, saved=None, device="cpu") is None
    assert "compiled_head" in head_trainer_reason(dataclasses.replace(train, compiled_head=False), used, head,
                                                  saved=None, device="cpu")
    assert "cached" in head_trainer_reason(train, {"feature_cache": "off: freeze none"}, model, saved=None,
                                           device="cpu")
    assert "checkpoint" in head_trainer_reason(train, used, head, saved={"epoch": 3}, device="cpu")
    assert "cuda" in head_trainer_reason(train, used, head, saved=None, device="cuda")
    layer4 = dataclasses.replace(train, freeze="layer4")
    assert "freeze layer4" in head_trainer_reason(layer4, used, head, saved=None, device="cpu")
