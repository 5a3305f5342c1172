"""Train the 512 -> 2 fc head on cached features near the hardware limit; same results as engine.fit.

Usage::

    from study import head_trainer as ht

    train, val = ht.partition_from_loader(loaders["train"]), ht.partition_from_loader(loaders["val"])
    fc = model.backbone.fc
    result = ht.fit_head(*train, *val, weight=fc.weight, bias=fc.bias, epochs=50, batch_size=8,
                         optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, seed=0)
    fc.load_state_dict(result.state_dict())          # the best epoch's weights, as engine.fit
    results = ht.fit_heads(train, val, [ht.HeadConfig(lr=lr) for lr in (1e-4, 1e-3, 1e-2)],
                           weight=fc.weight, bias=fc.bias, threads=2)   # one pass, 3 configs

What it reproduces (tests/study/test_head_trainer.py holds it to the torch loop): engine.fit on
features.FeatureHead with feature_loaders' DataLoader, i.e. the same per-epoch shuffle (what
DataLoader(shuffle=True, generator=Generator().manual_seed(seed)) draws: one int64 for the
iterator's base seed, then randperm(n)), the same batches including the last partial one,
mean cross-entropy per batch, torch.optim.SGD (buffer = grad on the first step, weight decay
added to the grad, dampening 0, no Nesterov) or torch.optim.AdamW (betas 0.9/0.999, eps 1e-8,
decoupled decay, bias corrections), validation after every epoch (subject probability = mean
of its slices' class-1 softmax probability, predicted 1 at >= 0.5) and the best epoch by a
selection rule (default engine.fit's: highest subject accuracy, ties -> lower loss, then the
earlier epoch). Float32 like the torch head; rounding differs by operation order only.

How (measured in benchmarks/head_trainer.py): numba-compiled epochs (study/head_kernels.py)
that train the logit difference only; several configurations that share the batch order (same
seed and batch size) run in one pass over the data, optionally on several threads.

Scope: freeze="fc" heads only (one Linear, two classes); layer4/layer3 heads stay on engine.fit.
The kernels compile on first use (10-17 s) and are cached next to this file in __pycache__
(or in $NUMBA_CACHE_DIR); later processes load them in under a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from study import head_kernels
from study.engine import OPTIMIZERS, SUBJECT_THRESHOLD
from study.head_eval import SELECT_RULES, Validator, selection_key


class Partition(NamedTuple):
    """One partition's slices: float32 features (n, n_feat), 0/1 labels (n,), subject rows (n,)."""

    feats: Any
    labels: Any
    rows: Any


@dataclass(frozen=True)
class HeadConfig:
    """One trial's optimisation settings (the TrainConfig fields the head loop reads)."""

    optimizer: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    batch_size: int = 8
    epochs: int = 50
    seed: int = 0  # the shuffle generator's seed (TrainConfig.seed)


@dataclass
class HeadResult:
    """What one configuration's training produced.

    Attributes:
        config: the configuration.
        history: per epoch run, {"epoch", "train_loss" (mean per-slice CE), "val_loss" (mean
            per-slice CE), "val_slice_acc", "val_subject_acc", "val_balanced_acc",
            "val_auroc"}; val_* are NaN without validation data.
        best_epoch: the selected epoch (1-based); the last one without validation data.
        best_weight, best_bias: float32 (2, n_feat), (2,) fc parameters after best_epoch.
        final_weight, final_bias: the same after the last epoch run.
        subject_rows, subject_labels: the validation subjects (sorted rows) and their labels.
        subject_probs: float64 (epochs run, n subjects), the subject probabilities per epoch.
        stopped: True when on_epoch asked to stop before config.epochs.
    """

    config: HeadConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_weight: np.ndarray | None = None
    best_bias: np.ndarray | None = None
    final_weight: np.ndarray | None = None
    final_bias: np.ndarray | None = None
    subject_rows: np.ndarray | None = None
    subject_labels: np.ndarray | None = None
    subject_probs: np.ndarray | None = None
    stopped: bool = False

    def state_dict(self, *, best: bool = True) -> dict[str, torch.Tensor]:
        """{"weight", "bias"} for ``model.backbone.fc.load_state_dict`` (best or final epoch)."""
        w, b = (self.best_weight, self.best_bias) if best else (self.final_weight, self.final_bias)
        return {"weight": torch.from_numpy(w.copy()), "bias": torch.from_numpy(b.copy())}


def shuffle_orders(n: int, seed: int) -> Iterator[np.ndarray]:
    """Each epoch's slice order as DataLoader(shuffle=True, generator=manual_seed(seed)) draws it.

    Creating the DataLoader iterator draws one int64 from the generator (its workers' base
    seed, drawn even without workers); then torch's own RandomSampler on that generator gives
    the order (it draws randperm(n), and one more for a remainder it then discards).
    test_head_trainer.py checks this against a real DataLoader.
    """
    gen = torch.Generator().manual_seed(int(seed))
    sampler = torch.utils.data.RandomSampler(range(n), generator=gen)
    while True:
        torch.empty((), dtype=torch.int64).random_(generator=gen)
        yield np.fromiter(sampler, np.int64)  # to the end, as the batch sampler runs it


def partition_from_loader(loader: torch.utils.data.DataLoader) -> Partition:
    """The (features, labels, rows) tensors behind a features.feature_loaders loader (no copy)."""
    ds = loader.dataset
    if not isinstance(ds, torch.utils.data.TensorDataset) or len(ds.tensors) != 3:
        raise TypeError(f"expected a TensorDataset of (features, labels, rows), got {type(ds).__name__}")
    return Partition(*ds.tensors)


def fit_head(
    train_feats, train_labels, train_rows, val_feats=None, val_labels=None, val_rows=None, *,
    weight, bias, epochs: int, batch_size: int, optimizer: str, lr: float, momentum: float = 0.9,
    weight_decay: float = 0.0, seed: int = 0,
    select: str | Callable[[dict[str, float]], tuple] = "acc",
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
    threads: int = 1, dtype: str = "float32",
) -> HeadResult:
    """Train one fc head like engine.fit(FeatureHead, feature loaders) and keep its best epoch.

    Args:
        train_feats, train_labels, train_rows: training slices (arrays or tensors): float32
            features (n, n_feat), 0/1 labels, subject rows (checked: one label per subject).
        val_feats, val_labels, val_rows: validation slices, or all None (last epoch kept).
        weight, bias: the head's initial parameters, (2, n_feat) and (2,) (e.g. fc.weight).
        epochs, batch_size, optimizer ("sgd" | "adamw"), lr, momentum, weight_decay, seed:
            as TrainConfig; seed seeds the shuffle generator like feature_loaders does.
        select: a name in SELECT_RULES or a key function of an epoch's metrics (higher is
            better; ties keep the earlier epoch).
        on_epoch: called as on_epoch(epoch, metrics) after each epoch (epoch from 1); may
            raise to abort, or return True to stop (the best epoch is still selected).
        threads: threads for the compiled loop (one configuration uses one).
        dtype: "float32" (torch's head) or "float64" parameter and optimizer state.
    """
    config = HeadConfig(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                        batch_size=batch_size, epochs=epochs, seed=seed)
    val = None if val_feats is None else Partition(val_feats, val_labels, val_rows)
    hook = None if on_epoch is None else (lambda _i, e, m: on_epoch(e, m))
    return fit_heads(Partition(train_feats, train_labels, train_rows), val, [config], weight=weight,
                     bias=bias, select=select, on_epoch=hook, threads=threads, dtype=dtype)[0]


def fit_heads(
    train: Partition, val: Partition | None, configs: Sequence[HeadConfig], *, weight, bias,
    select: str | Callable[[dict[str, float]], tuple] = "acc",
    on_epoch: Callable[[int, int, dict[str, float]], bool | None] | None = None,
    threads: int = 1, dtype: str = "float32",
) -> list[HeadResult]:
    """Train several head configurations on the same features; each as fit_head would alone.

    Configurations with the same (seed, batch_size, optimizer) see the same batches and run
    in one pass over the data (one group); groups run one after another.

    Args:
        train, val: Partitions (val None: no validation, each keeps its last epoch).
        configs: the configurations; results come back in this order.
        weight, bias: initial parameters shared by all, (2, n_feat) and (2,), or one per
            configuration, (K, 2, n_feat) and (K, 2) (e.g. when seeds differ).
        select, threads, dtype: as fit_head.
        on_epoch: called as on_epoch(config index, epoch, metrics); True stops that one.

    Raises:
        ValueError: bad shapes, labels, settings or non-finite values, before any training.
    """
    configs = list(configs)
    key = selection_key(select)
    tr, va = _check_partition(train, "train"), None if val is None else _check_partition(val, "val")
    n_feat = tr.feats.shape[1]
    if va is not None and va.feats.shape[1] != n_feat:
        raise ValueError(f"val features have {va.feats.shape[1]} columns, train {n_feat}")
    if not configs:
        raise ValueError("fit_heads needs at least one configuration")
    for i, c in enumerate(configs):
        _check_config(c, i)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"Invalid dtype {dtype!r}. Only float32 and float64 are supported.")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    w0, b0 = _initial(weight, bias, len(configs), n_feat)
    results = [HeadResult(config=c) for c in configs]
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault((c.seed, c.batch_size, c.optimizer.lower()), []).append(i)
    with ThreadPoolExecutor(threads) if threads > 1 else _NoPool() as pool:
        for (seed, batch, opt), members in groups.items():
            _run_group(tr, va, [configs[i] for i in members], [results[i] for i in members],
                       w0[members], b0[members], seed=seed, batch=batch, optimizer=opt, key=key,
                       on_epoch=None if on_epoch is None else _bind(on_epoch, members),
                       pool=pool, threads=threads, dtype=np.dtype(dtype))
    return results


# ---------------------------------------------------------------- one group of configurations
def _run_group(tr, va, configs, results, w0, b0, *, seed, batch, optimizer, key, on_epoch, pool,
               threads, dtype) -> None:
    """Train configurations that share the batch order, epoch by epoch, in one pass each."""
    k_all, n = len(configs), tr.labels.size
    dw = (w0[:, 1] - w0[:, 0]).astype(dtype)  # the logit difference (see head_kernels)
    db = (b0[:, 1] - b0[:, 0]).astype(dtype)
    s_w, s_b = w0[:, 1] + w0[:, 0], b0[:, 1] + b0[:, 0]  # the sum: scale[k] x its start value
    state = [np.zeros_like(dw), np.zeros_like(db)]
    if optimizer == "adamw":
        state += [np.zeros_like(dw), np.zeros_like(db)]
        hyper = np.array([[c.lr, c.weight_decay] for c in configs], np.float64)
    else:
        hyper = np.array([[c.lr, c.momentum, c.weight_decay] for c in configs], np.float64)
    steps_per_epoch = -(-n // batch)
    scale, scale_buf = np.ones(k_all), np.zeros(k_all)  # S = scale * S0; SGD's buffer of S
    losses = np.zeros(k_all)
    best = {}
    active = list(range(k_all))
    orders = shuffle_orders(n, seed)
    validate = Validator(*va) if va is not None else None
    steps = 0
    for epoch in range(1, max(c.epochs for c in configs) + 1):
        order = next(orders)
        chunks = [c for c in np.array_split(np.array(active, np.int64), min(threads, len(active))) if c.size]

        def run(cfgs, order=order, steps=steps):
            if optimizer == "adamw":
                return head_kernels.adamw_epoch(tr.feats, tr.labels, order, batch, cfgs, dw, db,
                                                *state, hyper, steps, losses)
            return head_kernels.sgd_epoch(tr.feats, tr.labels, order, batch, cfgs, dw, db, *state,
                                          hyper, losses)

        for future in [pool.submit(run, c) for c in chunks]:
            future.result()
        steps += steps_per_epoch
        for k in active:
            scale[k], scale_buf[k] = _sum_scale(configs[k], optimizer, scale[k], scale_buf[k],
                                                steps_per_epoch)
        ev = validate(dw[active], db[active]) if validate is not None else None
        still = []
        for pos, k in enumerate(active):
            res, cfg = results[k], configs[k]
            metrics = {"epoch": epoch, "train_loss": float(losses[k] / n)}
            metrics.update(ev.metrics(pos) if ev is not None else _NO_VAL)
            res.history.append(metrics)
            if ev is not None:
                res.subject_probs = _append_row(res.subject_probs, ev.subject_probs[:, pos])
                res.subject_rows, res.subject_labels = ev.subject_rows, ev.subject_labels
            mkey = key(metrics) if ev is not None else (float(epoch),)
            if k not in best or mkey > best[k][0]:
                best[k] = (mkey, epoch, dw[k].copy(), db[k].copy(), scale[k])
            stop = on_epoch(k, epoch, dict(metrics)) if on_epoch is not None else None
            if stop is True and epoch < cfg.epochs:
                res.stopped = True
            elif epoch < cfg.epochs:
                still.append(k)
        for k in active:
            res = results[k]
            _, res.best_epoch, bdw, bdb, bscale = best[k]
            res.best_weight, res.best_bias = _weights(bdw, bdb, bscale, s_w[k], s_b[k])
            res.final_weight, res.final_bias = _weights(dw[k], db[k], scale[k], s_w[k], s_b[k])
        active = still
        if not active:
            break


def _sum_scale(cfg: HeadConfig, optimizer: str, scale: float, buf: float, steps: int):
    """Advance the sum part S = scale * S0 by ``steps`` updates (it sees weight decay only).

    SGD: buf <- momentum * buf + wd * scale; scale <- scale - lr * buf (a 2x2 linear map).
    AdamW: scale <- scale * (1 - lr * wd) (the two rows' Adam steps cancel in the sum).
    """
    if optimizer == "adamw":
        return scale * (1.0 - cfg.lr * cfg.weight_decay) ** steps, 0.0
    lr, m, wd = cfg.lr, cfg.momentum, cfg.weight_decay
    step = np.array([[1.0 - lr * wd, -lr * m], [wd, m]])
    scale, buf = np.linalg.matrix_power(step, steps) @ np.array([scale, buf])
    return float(scale), float(buf)


def _weights(dw, db, scale, s_w, s_b):
    """fc weight (2, n_feat) and bias (2,) from the difference and the scaled sum, float32."""
    dw, db = dw.astype(np.float64), float(db)
    w = np.stack([(scale * s_w - dw) / 2, (scale * s_w + dw) / 2]).astype(np.float32)
    b = np.array([(scale * s_b - db) / 2, (scale * s_b + db) / 2], np.float32)
    return w, b


# ---------------------------------------------------------------- checks and small helpers
_NO_VAL = {name: math.nan for name in ("val_loss", "val_slice_acc", "val_subject_acc",
                                       "val_balanced_acc", "val_auroc")}


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _check_partition(part: Partition, name: str) -> Partition:
    feats = _as_numpy(part.feats, np.float32)
    labels, rows = _as_numpy(part.labels, np.float64), _as_numpy(part.rows, np.int64)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"{name} features must be a non-empty (n, n_feat) array, got shape {feats.shape}")
    if labels.shape != (feats.shape[0],) or rows.shape != (feats.shape[0],):
        raise ValueError(f"{name}: {feats.shape[0]} feature rows but labels {labels.shape}, rows {rows.shape}")
    bad = ~np.isin(labels, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"{name} labels must be 0 or 1; slice {int(np.argmax(bad))} has {labels[bad][0]}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} features hold non-finite values (first at slice "
                         f"{int(np.argmax(~np.isfinite(feats).all(1)))})")
    order = np.argsort(rows, kind="stable")
    same_row = rows[order][1:] == rows[order][:-1]
    if (same_row & (labels[order][1:] != labels[order][:-1])).any():
        raise ValueError(f"{name}: slices of one subject have different labels; labels are per subject")
    return Partition(feats, labels, rows)


def _check_config(c: HeadConfig, i: int) -> None:
    if c.optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"config {i}: Invalid optimizer {c.optimizer}. Only sgd and adamw are supported.")
    if c.epochs < 1 or c.batch_size < 1:
        raise ValueError(f"config {i}: epochs and batch_size must be >= 1, got {c.epochs}, {c.batch_size}")
    for name in ("lr", "momentum", "weight_decay"):
        v = getattr(c, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"config {i}: {name} must be a finite number >= 0, got {v}")


def _initial(weight, bias, k: int, n_feat: int) -> tuple[np.ndarray, np.ndarray]:
    w, b = _as_numpy(weight, np.float64), _as_numpy(bias, np.float64)
    if w.shape == (2, n_feat) and b.shape == (2,):
        return np.repeat(w[None], k, 0), np.repeat(b[None], k, 0)
    if w.shape == (k, 2, n_feat) and b.shape == (k, 2):
        return w, b
    raise ValueError(f"weight/bias must be (2, {n_feat})/(2,) or ({k}, 2, {n_feat})/({k}, 2) "
                     f"for a two-class head on {n_feat} features; got {w.shape}/{b.shape}")


def _append_row(table: np.ndarray | None, row: np.ndarray) -> np.ndarray:
    return row[None].copy() if table is None else np.vstack([table, row[None]])


def _bind(on_epoch, members):
    return lambda pos, epoch, metrics: on_epoch(members[pos], epoch, metrics)


class _NoPool:
    """Runs submitted work at once (one thread: no pool, no hand-off)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        class Done:
            def __init__(self, value):
                self.value = value

            def result(self):
                return self.value

        return Done(fn(*args))


__all__ = ["HeadConfig", "HeadResult", "Partition", "SELECT_RULES", "SUBJECT_THRESHOLD", "fit_head",
           "fit_heads", "partition_from_loader", "shuffle_orders"]
