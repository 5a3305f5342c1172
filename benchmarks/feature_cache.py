"""Benchmark: one 50-epoch freeze=fc trial with and without the frozen-feature cache.

    .venv/bin/python benchmarks/feature_cache.py                    # 300 subjects x 15 slices
    .venv/bin/python benchmarks/feature_cache.py --subjects 60 --uncached-epochs 1   # quick look

What runs is the trial minus Ray and MLflow: study.trainable.build_trial + study.engine.fit,
exactly what run_trial calls. The store is written directly here (not through DICOM ingest):
phantom thigh stacks (data_prep.phantom) through the real preprocessing recipe
(data_prep.preprocess.apply_recipe) into a Zarr `images` array with one chunk per slice (the
layout data_prep.store wrote before one shard per participant, still read by it), plus an
in-memory subjects table and a sha256 content hash.

Uncached epochs cost the same every epoch (one forward of every train + val slice through the
frozen network), so the uncached trial is measured over --uncached-epochs epochs and
extrapolated to --epochs; the cached trial runs all --epochs. Printed: per-trial wall times,
speed-ups (first trial on a node = cold cache, later trials = warm), prediction differences,
and the extrapolation to OAI size with its arithmetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OAI_SUBJECTS = 3515
OAI_SLICES = 15


@dataclass
class BenchStore:
    """The reader attributes the trial uses: images (Zarr, on disk), subjects, content_hash."""

    images: Any
    subjects: pd.DataFrame
    content_hash: str
    measures: dict


def write_store(path: Path, *, subjects: int, slices: int, matrix: tuple[int, int], seed: int) -> BenchStore:
    import zarr

    from data_prep.synthetic.phantom import ThighAnatomy, render_axial_stack
    from data_prep.preprocess import Recipe, apply_recipe

    rng = np.random.default_rng(seed)
    recipe = Recipe(n_slices=slices, size=matrix)
    root = zarr.open_group(str(path), mode="w")
    images = root.create_array("images", shape=(subjects * slices, *matrix), chunks=(1, *matrix),
                               dtype="uint16", fill_value=0)
    muscle = rng.uniform(70, 150, subjects)
    h = hashlib.sha256(json.dumps(recipe.to_dict()).encode())
    block = []
    for i in range(subjects):
        anat = ThighAnatomy(muscle_area_cm2=float(muscle[i]), imat_fraction=float(rng.uniform(0.03, 0.2)),
                            fat_area_cm2=float(rng.uniform(40, 140)))
        stack = render_axial_stack(anat, matrix=matrix, rng=rng, n_slices=slices)
        block.append(apply_recipe(stack.image, recipe)[0])
        if len(block) == 50 or i == subjects - 1:
            first = (i + 1 - len(block)) * slices
            arr = np.concatenate(block)
            images[first : first + arr.shape[0]] = arr
            h.update(arr.tobytes())
            block = []
    strength = 9.0 * muscle + rng.normal(0, 150, subjects)  # ~N per cm2 of muscle, r about 0.6
    table = pd.DataFrame({"subject_id": [f"{i:016x}" for i in range(subjects)], "cohort": "oai",
                          "sex": None, "leg_strength": strength,
                          "slice_start": np.arange(subjects) * slices, "slice_count": slices})
    h.update(table.to_csv().encode())
    return BenchStore(images=images, subjects=table, content_hash="sha256:" + h.hexdigest(),
                      measures={"leg_strength": {"direction": "higher"}})


def make_ctx(store: BenchStore, train, seed: int):
    from study import data
    from study.config import Cell
    from study.trainable import CellContext

    rows = data.stratum_rows(store.subjects, cohort="oai", measure="leg_strength")
    threshold = data.function_threshold(store.subjects, measure="leg_strength", rows=rows)
    labels = data.high_function_labels(store.subjects["leg_strength"].to_numpy()[rows],
                                       direction="higher", threshold=threshold)
    split = data.split_subjects(rows, labels, val=0.15, test=0.15, seed=seed)
    part_labels = {k: labels[np.searchsorted(rows, v)] for k, v in split.items()}
    return CellContext(cell=Cell(cohort="oai", measure="leg_strength"), store="(in memory)",
                       store_hash=store.content_hash, train=train, split=split, labels=part_labels,
                       threshold=threshold, threshold_rule="cohort", direction="higher",
                       tracking_uri="", experiment_id="", cell_run_id="", cpus_per_trial=1,
                       gpus_per_trial=0)


def run_trial_timed(store, ctx, train, *, epochs: int, cache_dir: Path) -> dict[str, Any]:
    """build_trial + fit as run_trial does them; wall times of the setup and of each epoch."""
    from study.engine import fit
    from study.model import seed_everything
    from study.trainable import build_trial

    seed_everything(train.seed)
    t0 = time.perf_counter()
    model, fit_model, loaders, info = build_trial(store, ctx, train, cache_dir=str(cache_dir))
    setup = time.perf_counter() - t0
    stamps = [time.perf_counter()]
    fit(fit_model, loaders["train"], loaders["val"], dataclasses.replace(train, epochs=epochs),
        on_epoch=lambda e, m, state: stamps.append(time.perf_counter()))
    epoch_s = np.diff(stamps)
    return {"model": model, "info": info, "setup_s": setup, "epoch_s": epoch_s,
            "total_s": setup + float(epoch_s.sum()),
            "n_slices": sum(len(loaders[p].dataset) for p in ("train", "val"))}


EVAL_PARTS = ("val", "test")  # unshuffled loaders; train slices would double the image passes


def full_model_probs(model, store, ctx, train) -> np.ndarray:
    """Class-1 probabilities of the full ThighResNet from images, val + test slices in order."""
    from study.engine import predict
    from study.trainable import make_loaders

    loaders = make_loaders(store, ctx, train, partitions=EVAL_PARTS)
    return np.concatenate([predict(model, loaders[p])[0] for p in EVAL_PARTS])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, default=300)
    p.add_argument("--slices", type=int, default=15)
    p.add_argument("--matrix", default="64x128", help="stored (and model input) rows x cols")
    p.add_argument("--epochs", type=int, default=50, help="the trial's epochs")
    p.add_argument("--uncached-epochs", type=int, default=2,
                   help="uncached epochs actually run (then extrapolated to --epochs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trial gets cpus_per_trial)")
    p.add_argument("--trials-per-cell", type=int, default=12, help="for the amortised per-trial time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    import torch

    from study.config import TrainConfig

    torch.set_num_threads(args.threads)
    matrix = tuple(int(v) for v in args.matrix.lower().split("x"))
    base = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, freeze="fc",
                       weights="none", seed=args.seed)  # ImageNet weights are not cached offline here
    with tempfile.TemporaryDirectory(prefix="fcbench") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        store = write_store(tmp / "store.zarr", subjects=args.subjects, slices=args.slices,
                            matrix=matrix, seed=args.seed)
        print(f"store: {args.subjects} subjects x {args.slices} slices at {matrix[0]}x{matrix[1]} "
              f"written in {time.perf_counter() - t0:.1f} s")
        uncached_train = dataclasses.replace(base, feature_cache=False)
        ctx = make_ctx(store, base, args.seed)
        cache = tmp / "cache"

        plain = run_trial_timed(store, ctx, uncached_train, epochs=args.uncached_epochs, cache_dir=cache)
        assert plain["info"]["feature_cache"].startswith("off")
        cold = run_trial_timed(store, ctx, base, epochs=args.epochs, cache_dir=cache)
        warm = run_trial_timed(store, ctx, base, epochs=args.epochs, cache_dir=cache)
        short = run_trial_timed(store, ctx, dataclasses.replace(base, epochs=args.uncached_epochs),
                                epochs=args.uncached_epochs, cache_dir=cache)
        assert cold["info"]["computed"] > 0 and warm["info"]["computed"] == 0
        # same seed, same epochs: cached vs uncached trained models, both from images
        diff_same_epochs = float(np.abs(full_model_probs(short["model"], store, ctx, base)
                                        - full_model_probs(plain["model"], store, ctx, base)).max())
        # the 50-epoch cached model: full model from images vs head on cached features
        from study import features

        feats, _ = features.cached_features(cold["model"], store, np.arange(store.images.shape[0]),
                                            cache_dir=cache)
        head = features.FeatureHead(cold["model"]).eval()
        with torch.no_grad():
            head_probs = torch.softmax(head(feats), 1)[:, 1].numpy()
        order = np.concatenate([features.slice_table(store, ctx.split[p], ctx.labels[p], None)[0]
                                for p in EVAL_PARTS])
        diff_head = float(np.abs(full_model_probs(cold["model"], store, ctx, base) - head_probs[order]).max())

    n = plain["n_slices"]
    epoch_plain = float(plain["epoch_s"].mean())
    uncached_trial = plain["setup_s"] + args.epochs * epoch_plain
    feature_pass = cold["setup_s"]
    head_epoch = float(np.concatenate([cold["epoch_s"], warm["epoch_s"]]).mean())
    t = args.trials_per_cell
    amortised = (cold["total_s"] + (t - 1) * warm["total_s"]) / t
    r = {
        "subjects": args.subjects, "slices_per_subject": args.slices, "matrix": list(matrix),
        "train_val_slices": n, "threads": args.threads, "epochs": args.epochs,
        "uncached_setup_s": plain["setup_s"], "uncached_epoch_s": epoch_plain,
        "uncached_epochs_run": args.uncached_epochs, "uncached_trial_s": uncached_trial,
        "cached_cold_setup_s": feature_pass, "cached_warm_setup_s": warm["setup_s"],
        "cached_head_epoch_s": head_epoch, "cached_cold_trial_s": cold["total_s"],
        "cached_warm_trial_s": warm["total_s"], "cached_amortised_trial_s": amortised,
        "speedup_cold": uncached_trial / cold["total_s"], "speedup_warm": uncached_trial / warm["total_s"],
        "speedup_amortised": uncached_trial / amortised,
        "max_abs_prob_diff_same_epochs": diff_same_epochs, "max_abs_prob_diff_head_vs_full": diff_head,
    }
    print(f"train+val slices per trial: {n}; torch threads: {args.threads}")
    print(f"uncached: setup (load + resize) {plain['setup_s']:.1f} s, epoch {epoch_plain:.2f} s "
          f"(mean of {args.uncached_epochs} run: {', '.join(f'{e:.2f}' for e in plain['epoch_s'])})")
    print(f"uncached {args.epochs}-epoch trial (extrapolated): {plain['setup_s']:.1f} + {args.epochs} x "
          f"{epoch_plain:.2f} = {uncached_trial:.1f} s")
    print(f"cached, cold cache (first trial on the node): setup incl. feature pass {feature_pass:.1f} s "
          f"+ {args.epochs} head epochs {cold['epoch_s'].sum():.2f} s = {cold['total_s']:.1f} s "
          f"-> {r['speedup_cold']:.1f}x")
    print(f"cached, warm cache (every later trial): setup {warm['setup_s']:.2f} s + {args.epochs} head "
          f"epochs {warm['epoch_s'].sum():.2f} s = {warm['total_s']:.2f} s -> {r['speedup_warm']:.0f}x")
    print(f"amortised over {t} trials of a cell: {amortised:.2f} s/trial -> {r['speedup_amortised']:.0f}x")
    print(f"predictions, cached vs uncached trial, {args.uncached_epochs} epochs, same seed: max |dp| = "
          f"{diff_same_epochs:.2e}")
    print(f"predictions, {args.epochs}-epoch cached model, full model from images vs head on cached "
          f"features: max |dp| = {diff_head:.2e}")

    oai = OAI_SUBJECTS * OAI_SLICES * n / (args.subjects * args.slices)  # same train+val share
    per_slice_epoch = epoch_plain / n
    per_slice_feat = feature_pass / n
    per_slice_head = head_epoch / n
    oai_plain = args.epochs * per_slice_epoch * oai
    oai_cold = (per_slice_feat + args.epochs * per_slice_head) * oai
    oai_warm = args.epochs * per_slice_head * oai
    r.update(oai_train_val_slices=oai, oai_uncached_trial_s=oai_plain, oai_cold_trial_s=oai_cold,
             oai_warm_trial_s=oai_warm)
    print(f"OAI size ({OAI_SUBJECTS} x {OAI_SLICES} slices, same {n / (args.subjects * args.slices):.0%} "
          f"in train+val = {oai:.0f} slices), at {matrix[0]}x{matrix[1]}, {args.threads} thread(s):")
    print(f"  uncached: {args.epochs} x {per_slice_epoch * 1e3:.2f} ms/slice x {oai:.0f} = {oai_plain / 3600:.2f} h")
    print(f"  cached cold: ({per_slice_feat * 1e3:.2f} + {args.epochs} x {per_slice_head * 1e6:.2f}e-3) ms/slice "
          f"x {oai:.0f} = {oai_cold / 60:.1f} min; warm: {args.epochs} x {per_slice_head * 1e6:.2f} us x "
          f"{oai:.0f} = {oai_warm:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
