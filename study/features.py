"""Frozen-feature cache: run the frozen part of the network once, train only the head.

With ``freeze="fc"`` every epoch of a trial pushes every slice through conv1..layer4 just to
train a 512 -> 2 Linear; the frozen prefix gives the same output every time (its BatchNorms
stay in eval mode and there is no random augmentation), so it is computed once and stored.

Usage::

    from study import features

    reason = features.ineligible_reason(train, store)       # None = the cache applies
    loaders, head, stats = features.feature_loaders(store, split, labels, train, model)
    fit(head, loaders["train"], loaders["val"], ...)       # trains model's own head modules

``head`` holds the *same* module objects as ``model.backbone`` (fc; or layer4 + fc; or
layer3 + layer4 + fc), so training it trains ``model`` in place: the checkpointed and logged
model is the full ThighResNet and prediction from images is unchanged.

Cache layout (``<root>`` = $THIGHMRI_FEATURE_CACHE, default ``<repo>/runs/feature_cache``)::

    <root>/<key digest>.zarr      one Zarr group per FeatureKey
        attrs: key (the FeatureKey as a dict), complete (set last, after the arrays exist)
        features  float32 (n_store_slices, *feature_shape), uncompressed
        written   bool (n_store_slices,): rows whose features are on disk (set after them)
    <root>/<key digest>.lock      flock: exclusive to compute/write, shared to read;
                                  its mtime is the entry's last use (for prune)

Rows are store slices, not a cell's subjects: every cell and every slices_per_subject choice
that touches a slice reuses it, and a cell computes only the slices no earlier cell did.
Any change of store content, frozen weights, block, input size or feature code changes the
key digest and so the entry; old entries are removed by ``prune``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from study import feature_memo
from study.data import central_slices, to_model_input

# Bump when frozen_forward or the stored layout changes: old entries then stop matching.
FEATURE_CODE_VERSION = 2  # 2: keys name the device type and float32 precision
CACHE_ENV = "THIGHMRI_FEATURE_CACHE"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / "runs" / "feature_cache"

# freeze mode -> the last frozen backbone child, whose output is cached
BLOCK_BY_FREEZE = {"fc": "avgpool", "layer4": "layer3", "layer3": "layer2"}
# torchvision resnet18's forward order (flatten happens between avgpool and fc)
_RESNET_ORDER = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                 "avgpool", "fc")
# slices per forward pass when filling the cache: large enough for efficient kernels, small
# enough for memory (64 x 128 x 256 float32 inputs = 8 MB)
COMPUTE_BATCH = 64
# slices computed between two flushes of the written mask (bounds the work lost to a crash)
FLUSH_SLICES = 4096
# target bytes per features chunk
CHUNK_BYTES = 4 << 20


def default_cache_dir() -> Path:
    """$THIGHMRI_FEATURE_CACHE, else ``<repo>/runs/feature_cache``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else DEFAULT_CACHE_DIR


def ineligible_reason(train: Any, store: Any) -> str | None:
    """Why a trial with these settings cannot train on cached features (None = it can).

    Args:
        train: the trial's TrainConfig (``freeze``; optional ``feature_cache`` switch and
            ``augment`` setting, read with getattr so older configs work).
        store: the opened slice store (its ``content_hash`` keys the cache).
    """
    if not getattr(train, "feature_cache", True):
        return "feature_cache is off in the training settings"
    if train.freeze not in BLOCK_BY_FREEZE:
        return (f"freeze={train.freeze!r} trains every layer; only "
                f"{', '.join(BLOCK_BY_FREEZE)} have a frozen prefix")
    if getattr(train, "augment", None):
        return "random augmentation changes the frozen prefix's input every epoch"
    if not getattr(store, "content_hash", ""):
        return "the store has no content_hash to key the cache by"
    return None


# ---------------------------------------------------------------- prefix / head split
def prefix_names(freeze: str) -> tuple[str, ...]:
    """Backbone children that run before the cached block's output (inclusive)."""
    if freeze not in BLOCK_BY_FREEZE:
        raise ValueError(f"Invalid freeze {freeze!r} for the feature cache. "
                         f"Only {', '.join(BLOCK_BY_FREEZE)} are supported.")
    return _RESNET_ORDER[: _RESNET_ORDER.index(BLOCK_BY_FREEZE[freeze]) + 1]


def head_names(freeze: str) -> tuple[str, ...]:
    """Backbone children that train on the cached block's output."""
    return _RESNET_ORDER[len(prefix_names(freeze)):]


@torch.no_grad()
def frozen_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen prefix of ``model`` (a ThighResNet) on model input x (n, 1, H, W).

    Same operations as ThighResNet.forward up to the cached block, in eval mode (frozen
    BatchNorms always run on their running statistics). For freeze="fc" the result is the
    flattened 512-d avgpool output.
    """
    names = prefix_names(model.freeze)
    was_training = model.training
    model.eval()
    try:
        x = (x.expand(-1, 3, -1, -1) - model.mean) / model.std
        for name in names:
            x = getattr(model.backbone, name)(x)
        return torch.flatten(x, 1) if names[-1] == "avgpool" else x
    finally:
        model.train(was_training)


class FeatureHead(nn.Module):
    """The trainable tail of a ThighResNet, fed cached prefix outputs.

    Its children are the model's own modules (shared, not copied): training the head trains
    the model, and fit's best-epoch state_dict round trip covers exactly the trained weights.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.freeze = model.freeze
        for name in head_names(model.freeze):
            self.add_module(name, getattr(model.backbone, name))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        for name, module in self.named_children():
            if name == "fc":
                f = torch.flatten(f, 1)  # no-op on freeze="fc"'s already flat features
            f = module(f)
        return f


# ---------------------------------------------------------------- keys
def weights_digest(model: nn.Module) -> str:
    """sha256 of the frozen prefix's actual tensors (and the input normalisation).

    Hashes values, not the weights name: with weights="none" the prefix depends on the seed.
    """
    h = hashlib.sha256()
    tensors = {"mean": model.mean, "std": model.std}
    for name in prefix_names(model.freeze):
        for k, v in getattr(model.backbone, name).state_dict().items():
            tensors[f"{name}.{k}"] = v
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class FeatureKey:
    """Everything the cached features depend on; any change gives a new cache entry.

    slices_per_subject is not part of it: entries are indexed by store slice, so a different
    choice of slices reads other rows of the same entry.
    """

    store_hash: str
    weights_digest: str
    block: str
    input_size: tuple[int, int]
    device: str = "cpu"  # device type the prefix ran on: kernels differ in rounding across devices
    precision: str = "fp32"  # study.model.fp32_precision: "tf32" when CUDA may round to TF32
    code_version: int = FEATURE_CODE_VERSION

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = [int(v) for v in self.input_size]
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:32]


def feature_key(model: nn.Module, store: Any, input_size: tuple[int, int] | None,
                device: str | torch.device = "cpu") -> FeatureKey:
    """The cache key of ``model``'s frozen prefix on ``store`` at ``input_size``, run on ``device``
    with the float32 precision now in force there."""
    from study.model import fp32_precision

    size = tuple(int(v) for v in (input_size or store.images.shape[1:]))
    return FeatureKey(store_hash=str(store.content_hash), weights_digest=weights_digest(model),
                      block=BLOCK_BY_FREEZE[model.freeze], input_size=size, device=torch.device(device).type,
                      precision=fp32_precision(device))


# ---------------------------------------------------------------- the cache
@contextlib.contextmanager
def _locked(lock_path: Path, *, exclusive: bool) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            os.utime(lock_path)  # last use, for prune
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_valid(path: Path, key: FeatureKey, mode: str) -> zarr.Group | None:
    """The entry at path if it is complete and was made for key, else None."""
    if not path.exists():
        return None
    try:
        group = zarr.open_group(str(path), mode=mode)
        if group.attrs.get("complete") is not True or group.attrs.get("key") != key.as_dict():
            return None
        group["features"], group["written"]  # both arrays must exist
        return group
    except Exception:  # a torn or foreign directory is as good as missing: it gets rebuilt
        return None


def _create(path: Path, key: FeatureKey, n_slices: int, feature_shape: tuple[int, ...]) -> zarr.Group:
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w")
    group.attrs.update({"key": key.as_dict(), "complete": False})
    per_slice = 4 * int(np.prod(feature_shape))
    chunk = max(1, min(n_slices, CHUNK_BYTES // per_slice))
    group.create_array("features", shape=(n_slices, *feature_shape), chunks=(chunk, *feature_shape),
                       dtype="float32", fill_value=0.0, compressors=None)  # floats barely compress
    group.create_array("written", shape=(n_slices,), chunks=(max(1, n_slices),), dtype="bool",
                       fill_value=False)
    group.attrs["complete"] = True  # last: the arrays above exist
    return group


def _store_images(store: Any, idx: np.ndarray, input_size: tuple[int, int] | None) -> torch.Tensor:
    """Model input for sorted store slice indices, read in contiguous runs."""
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    parts = []
    for run in np.split(idx, breaks):
        block = np.asarray(store.images[int(run[0]) : int(run[-1]) + 1])
        parts.append(to_model_input(block, input_size))
    return torch.cat(parts)


def cached_features(
    model: nn.Module,
    store: Any,
    slice_idx: np.ndarray,
    *,
    input_size: tuple[int, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    on_progress: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Frozen-prefix outputs of store slices ``slice_idx``, from the cache or computed into it.

    Readers take a shared lock; a process that must compute takes the exclusive lock, so of
    several trials needing the same key one computes and the others wait, then read.

    Args:
        model: a ThighResNet whose freeze mode is one of BLOCK_BY_FREEZE.
        store: opened slice store (``images``, ``content_hash``).
        slice_idx: store slice indices (any order; duplicates allowed).
        input_size: the trial's input_size (None = as stored).
        cache_dir: cache root (default: default_cache_dir()).
        device: where the prefix runs (its type and float32 precision are part of the key);
            features come back on the CPU.
        on_progress: called as on_progress(done, total, entry=..., block=...) while slices
            are computed (about every COMPUTE_BATCH slices; not called on a cache hit).

    Returns:
        (float32 features aligned with slice_idx, stats) with stats = {"entry": path,
        "computed": slices computed now, "cached": slices that were already on disk, and
        "memo": True when this process held the rows from an earlier call (not read again)}.
        The tensor may be shared with other callers in this process: read it, never write it.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = feature_key(model, store, input_size, device)
    path, lock = root / f"{key.digest()}.zarr", root / f"{key.digest()}.lock"
    slice_idx = np.asarray(slice_idx, dtype=np.int64)
    wanted = np.unique(slice_idx)
    n_store = int(store.images.shape[0])
    if not wanted.size:
        raise ValueError("cached_features needs at least one slice index")
    if (wanted[0] < 0 or wanted[-1] >= n_store):
        raise IndexError(f"slice indices must be in 0..{n_store - 1}, got {wanted[0]}..{wanted[-1]}")
    stats: dict[str, Any] = {"entry": str(path), "computed": 0, "cached": int(wanted.size)}

    memo_key = feature_memo.rows_key(str(path), slice_idx)
    with _locked(lock, exclusive=False):
        group = _open_valid(path, key, "r")
        if group is not None and group["written"][:][wanted].all():
            held = feature_memo.get(memo_key)  # this process read these rows before (study/feature_memo.py)
            if held is not None:
                return held, {**stats, "memo": True}
            feats = _align(group["features"].get_orthogonal_selection((wanted,)), wanted, slice_idx)
            feature_memo.put(memo_key, feats)
            return feats, stats

    with _locked(lock, exclusive=True):
        group = _open_valid(path, key, "r+")
        if group is None:
            probe = frozen_forward(model, _store_images(store, wanted[:1], input_size).to(device))
            group = _create(path, key, n_store, tuple(probe.shape[1:]))
        written = group["written"][:]
        missing = wanted[~written[wanted]]
        tell = (lambda done: on_progress(done, int(missing.size), entry=key.digest()[:12], block=key.block)
                ) if on_progress is not None else (lambda done: None)
        for start in range(0, missing.size, FLUSH_SLICES):
            part = missing[start : start + FLUSH_SLICES]
            out = np.empty((part.size, *group["features"].shape[1:]), np.float32)
            for b in range(0, part.size, COMPUTE_BATCH):
                x = _store_images(store, part[b : b + COMPUTE_BATCH], input_size).to(device)
                out[b : b + COMPUTE_BATCH] = frozen_forward(model, x).float().cpu().numpy()
                tell(start + min(b + COMPUTE_BATCH, part.size))
            group["features"].set_orthogonal_selection((part,), out)
            written[part] = True
            group["written"][:] = written  # after the features: a crash leaves them unmarked
        stats.update(computed=int(missing.size), cached=int(wanted.size - missing.size))
        feats = _align(group["features"].get_orthogonal_selection((wanted,)), wanted, slice_idx)
    feature_memo.put(memo_key, feats)
    return feats, stats


def prefill(model: nn.Module, store: Any, feats: np.ndarray, *, input_size: tuple[int, int] | None = None,
            cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Path:
    """Write ``feats`` as the complete cache entry of ``model``'s frozen prefix on ``store``.

    For benchmarks that need a warm cache at a size whose feature pass would take hours
    (benchmarks/launch_overhead.py at OAI size): the values are trusted as given, not
    computed, and every later trial with this key reads them. Replaces an entry of the key.

    Args:
        model, store, input_size, cache_dir, device: as cached_features (device: the key's).
        feats: float32 (n_store_slices, *feature_shape), one row per store slice.

    Returns:
        The entry's path.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = feature_key(model, store, input_size, device)
    path = root / f"{key.digest()}.zarr"
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if feats.shape[0] != int(store.images.shape[0]):
        raise ValueError(f"prefill needs one row per store slice ({store.images.shape[0]}), got {feats.shape[0]}")
    with _locked(root / f"{key.digest()}.lock", exclusive=True):
        group = _create(path, key, feats.shape[0], tuple(feats.shape[1:]))
        group["features"][:] = feats
        group["written"][:] = np.ones(feats.shape[0], bool)
    return path


def _align(feats: np.ndarray, wanted: np.ndarray, slice_idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(feats[np.searchsorted(wanted, slice_idx)]))


def prune(cache_dir: str | os.PathLike | None = None, *, max_bytes: int) -> list[Path]:
    """Delete least recently used entries until the cache holds at most max_bytes.

    An entry in use (its lock held) is skipped. Returns the removed entry paths.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not root.is_dir():
        return []
    entries = []
    for path in root.glob("*.zarr"):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        lock = path.with_suffix(".lock")
        used = lock.stat().st_mtime if lock.exists() else path.stat().st_mtime
        entries.append((used, size, path, lock))
    total = sum(e[1] for e in entries)
    removed = []
    for used, size, path, lock in sorted(entries):
        if total <= max_bytes:
            break
        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(path, ignore_errors=True)
            fcntl.flock(fh, fcntl.LOCK_UN)
        total -= size
        removed.append(path)
    return removed


# ---------------------------------------------------------------- loaders for a trial
def slice_table(store: Any, rows: np.ndarray, labels: np.ndarray,
                slices_per_subject: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(store slice index, label, subject row) per slice, in study.data.SliceDataset's order."""
    starts = store.subjects["slice_start"].to_numpy(dtype=np.int64)
    counts = store.subjects["slice_count"].to_numpy(dtype=np.int64)
    idx, ys, rs = [], [], []
    for row, label in zip(np.asarray(rows, np.int64), np.asarray(labels, np.int64)):
        positions = central_slices(int(counts[row]), slices_per_subject)
        idx.append(starts[row] + positions)
        ys.append(np.full(positions.size, label, np.int64))
        rs.append(np.full(positions.size, row, np.int64))
    cat = lambda parts: np.concatenate(parts) if parts else np.empty(0, np.int64)  # noqa: E731
    return cat(idx), cat(ys), cat(rs)


def feature_loaders(
    store: Any,
    split: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    train: Any,
    model: nn.Module,
    *,
    partitions: tuple[str, ...] = ("train", "val"),
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    on_progress: Callable[..., None] | None = None,
) -> tuple[dict[str, torch.utils.data.DataLoader], FeatureHead, dict[str, Any]]:
    """Loaders of (cached features, label, row) batches and the head that trains on them.

    Same batch size, shuffling and shuffle generator seed as study.trainable.make_loaders, so
    the head sees the same batches in the same order as the full model would. The features
    are moved to ``device`` once (labels and rows stay on the CPU, where evaluation reads them).

    Returns:
        ({partition: DataLoader}, FeatureHead(model), stats of cached_features).
    """
    tables = {p: slice_table(store, split[p], labels[p], train.slices_per_subject) for p in partitions}
    every = np.concatenate([tables[p][0] for p in partitions])
    feats, stats = cached_features(model, store, every, input_size=train.input_size,
                                   cache_dir=cache_dir, device=device, on_progress=on_progress)
    feats = feats.to(device)  # once per trial: batches are then slices of a device tensor
    loaders, offset = {}, 0
    for part in partitions:
        idx, ys, rs = tables[part]
        ds = torch.utils.data.TensorDataset(feats[offset : offset + idx.size],
                                            torch.from_numpy(ys), torch.from_numpy(rs))
        offset += idx.size
        gen = torch.Generator().manual_seed(train.seed)
        loaders[part] = torch.utils.data.DataLoader(ds, batch_size=train.batch_size,
                                                    shuffle=(part == "train"), generator=gen)
    return loaders, FeatureHead(model), stats
