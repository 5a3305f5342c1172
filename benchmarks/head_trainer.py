"""Benchmark: one fc-head trial on cached features at OAI size, torch loop vs study.head_trainer.

    .venv/bin/python benchmarks/head_trainer.py --repeat 3 --json /tmp/head_bench.json
    .venv/bin/python benchmarks/head_trainer.py --subjects 400 --repeat 1    # quick look

Features are synthetic (no images needed; the head sees only 512 floats per slice): 3,515
subjects x 15 slices x 512 float32, non-negative like ResNet avgpool outputs, with a planted
per-subject signal (label = a latent factor's sign; 16 of the 512 features carry it, plus a
per-subject random effect, so slices of one subject are correlated as in real data). Subject
split 70 / 15 / 15 as the demo grids: 36,900 train + 7,905 val slices (the issue's 44,816).
Settings as the seed: batch 8, 50 epochs, SGD momentum 0.9 + weight decay 1e-4 (lr 1e-3) and
AdamW (lr 1e-4, weight decay 1e-2).

Every measurement runs in its own child process (so its peak RSS is its own), which loads
the features into memory as features.cached_features returns them, then times only the
training call. What is timed:
- old: engine.fit on features.FeatureHead(build_model(freeze="fc")) with DataLoaders built
  as features.feature_loaders builds them; --old-epochs epochs, extrapolated to --epochs.
- torch analytic: the same update with hand-written gradients in torch, K configurations in
  one vectorised pass (the means the issue measured; kept here only to compare); one epoch,
  extrapolated.
- head_trainer: study.head_trainer.fit_heads, all --epochs epochs with per-epoch validation,
  K = 1 (one trial), 10 (a cell's trials) and 32; float32, and float64 for K = 1.
Rounds alternate all methods (paired); medians over rounds are reported. Also printed: the
machine's bandwidth (numpy copy, streaming read, shuffled-row read), single-thread GEMM
FLOP/s, the physical floor per trial, numba's compile time, and old vs new agreement at
OAI size after the old path's epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hardware_floor import floor, machine_limits  # noqa: E402  (beside this script)

N_FEAT = 512
SGD = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
ADAMW = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-2}
OPTS = {"sgd": SGD, "adamw": ADAMW}


# ---------------------------------------------------------------- data
def make_features(subjects: int, slices: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic cache: features (n, 512) float32, labels, subject rows, and the split."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=subjects)
    labels_s = (latent > 0).astype(np.int64)
    rows = np.repeat(np.arange(subjects), slices)
    base = rng.gamma(2.0, 0.4, size=(subjects, N_FEAT)).astype(np.float32)  # per-subject effect
    feats = base[rows] * rng.gamma(8.0, 1 / 8.0, size=(rows.size, N_FEAT)).astype(np.float32)
    feats[:, :16] += (0.25 * latent[rows])[:, None].astype(np.float32).clip(-0.5, None)
    np.maximum(feats, 0, out=feats)
    perm = rng.permutation(subjects)
    n_tr, n_va = int(round(0.70 * subjects)), int(round(0.15 * subjects))
    part = np.empty(subjects, np.int64)
    part[perm[:n_tr]], part[perm[n_tr:n_tr + n_va]], part[perm[n_tr + n_va:]] = 0, 1, 2
    return {"feats": feats, "labels": labels_s[rows], "rows": rows, "part": part[rows]}


def load_partitions(path: Path):
    data = np.load(path)
    out = {}
    for name, code in (("train", 0), ("val", 1)):
        m = data["part"] == code
        out[name] = (np.ascontiguousarray(data["feats"][m]), data["labels"][m], data["rows"][m])
    return out


def initial_fc(seed: int = 0):
    """The fc of a freshly built ThighResNet, as a trial starts (seed_everything then build)."""
    from study.model import build_model, seed_everything

    seed_everything(seed)
    model = build_model(weights="none", freeze="fc")
    return model


# ---------------------------------------------------------------- the methods (in a child)
def run_old(parts, opt: str, epochs: int, *, check: bool, seed: int = 0) -> dict[str, Any]:
    """engine.fit on FeatureHead with feature_loaders' DataLoaders (today's cached trial)."""
    import torch

    from study import engine, features
    from study.config import TrainConfig

    def make_loaders():
        loaders = {}
        for name in ("train", "val"):
            f, y, r = parts[name]
            ds = torch.utils.data.TensorDataset(torch.from_numpy(f), torch.from_numpy(y), torch.from_numpy(r))
            loaders[name] = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=(name == "train"),
                                                        generator=torch.Generator().manual_seed(seed))
        return loaders

    model = initial_fc(seed)
    head = features.FeatureHead(model)
    loaders = make_loaders()
    w0 = {k: v.clone() for k, v in model.backbone.fc.state_dict().items()}
    rss, t0 = (_rss_kib(), _peak_kib()), _clock()
    engine.fit(head, loaders["train"], loaders["val"], TrainConfig(epochs=epochs, **OPTS[opt]))
    out = {**_since(t0, epochs), "grew_kib": _grew(rss)}
    if not check:
        return out
    # agreement at OAI size: the new trainer over the same epochs from the same start
    from study import head_trainer as ht

    head.load_state_dict({"fc." + k: v for k, v in w0.items()})
    loaders = make_loaders()  # the shuffle generator starts again
    ref = []
    engine.fit(head, loaders["train"], loaders["val"], TrainConfig(epochs=epochs, **OPTS[opt]),
               on_epoch=lambda e, m, st: ref.append(engine.evaluate(head, loaders["val"])["subject_probs"]))
    new = ht.fit_head(*parts["train"], *parts["val"], weight=w0["weight"], bias=w0["bias"], epochs=epochs,
                      batch_size=8, seed=seed, **OPTS[opt])
    return {**out, "max_abs_dp": float(np.abs(new.subject_probs - np.array(ref)).max())}


def run_torch_analytic(parts, opt: str, k: int, epochs: int, seed: int = 0) -> dict[str, Any]:
    """SGD with hand-written gradients, K configurations per pass (the issue's alternative)."""
    import torch

    from study import head_trainer as ht

    assert opt == "sgd", "the torch-analytic comparison is measured for SGD only"
    f, y, _ = parts["train"]
    feats, labels = torch.from_numpy(f), torch.from_numpy(y)
    fc = initial_fc(seed).backbone.fc
    w = fc.weight.detach().clone().repeat(k, 1, 1)  # (K, 2, D)
    b = fc.bias.detach().clone().repeat(k, 1)
    lr = torch.logspace(-4, -2, k)[:, None, None]
    bw, bb = torch.zeros_like(w), torch.zeros_like(b)
    mom, wd = SGD["momentum"], SGD["weight_decay"]
    orders = ht.shuffle_orders(len(labels), seed)
    rss, t0 = (_rss_kib(), _peak_kib()), _clock()
    for _ in range(epochs):
        order = torch.from_numpy(next(orders))
        for s in range(0, len(order), 8):
            idx = order[s:s + 8]
            x, yb = feats.index_select(0, idx), labels.index_select(0, idx)
            z = torch.einsum("bd,kcd->kbc", x, w) + b[:, None, :]
            dz = torch.softmax(z, -1)
            dz[:, torch.arange(len(idx)), yb] -= 1
            dz /= len(idx)
            gw = torch.einsum("kbc,bd->kcd", dz, x) + wd * w
            gb = dz.sum(1) + wd * b
            bw.mul_(mom).add_(gw)
            bb.mul_(mom).add_(gb)
            w.sub_(lr * bw)
            b.sub_(lr[:, :, 0] * bb)
    return {**_since(t0, epochs), "grew_kib": _grew(rss)}


def run_head_trainer(parts, opt: str, k: int, epochs: int, threads: int, dtype: str,
                     seed: int = 0) -> dict[str, Any]:
    from study import head_trainer as ht

    fc = initial_fc(seed).backbone.fc
    base = OPTS[opt]
    lrs = np.geomspace(base["lr"] / 10, base["lr"] * 10, k) if k > 1 else [base["lr"]]
    configs = [ht.HeadConfig(**{**base, "lr": float(lr)}, epochs=epochs, batch_size=8, seed=seed)
               for lr in lrs]
    train, val = ht.Partition(*parts["train"]), ht.Partition(*parts["val"])
    t0 = time.perf_counter()  # load (or compile) the kernels on a few slices first
    tiny = ht.Partition(*(a[:64] for a in parts["train"]))
    ht.fit_heads(tiny, tiny, [configs[0].__class__(**{**configs[0].__dict__, "epochs": 1})],
                 weight=fc.weight, bias=fc.bias, dtype=dtype)
    first = time.perf_counter() - t0
    rss, t0 = (_rss_kib(), _peak_kib()), _clock()
    ht.fit_heads(train, val, configs, weight=fc.weight, bias=fc.bias, threads=threads, dtype=dtype)
    return {**_since(t0, epochs), "first_call_s": first, "grew_kib": _grew(rss)}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    parts = load_partitions(args.data)
    rss0 = _rss_kib()
    m = args.method
    if m == "old":
        out = run_old(parts, args.opt, args.epochs, check=args.check)
    elif m == "torch-analytic":
        out = run_torch_analytic(parts, args.opt, args.k, args.epochs)
    elif m == "compile":
        out = _compile_time(parts)
    else:
        out = run_head_trainer(parts, args.opt, args.k, args.epochs, args.threads, args.dtype)
    out.update(rss_after_load_mib=rss0 / 1024, peak_rss_mib=_peak_kib() / 1024)
    print("RESULT " + json.dumps(out))


def _compile_time(parts) -> dict[str, Any]:
    """First fit_head call in a fresh process: import + compile (or cache load) + 1 epoch."""
    t0 = time.perf_counter()
    from study import head_trainer as ht

    imported = time.perf_counter() - t0
    f, y, r = (a[:64] for a in parts["train"])
    t0 = time.perf_counter()
    for opt in ("sgd", "adamw"):
        ht.fit_head(f, y, r, f, y, r, weight=np.zeros((2, N_FEAT)), bias=np.zeros(2), epochs=1,
                    batch_size=8, **OPTS[opt])
    return {"import_s": imported, "first_calls_s": time.perf_counter() - t0}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float], epochs: int) -> dict[str, float]:
    """Wall and CPU seconds (all threads of the process) since t0, and per epoch."""
    wall, cpu = time.perf_counter() - t0[0], time.process_time() - t0[1]
    return {"epochs_run": epochs, "wall_s": wall, "cpu_s": cpu, "per_epoch_s": wall / epochs,
            "cpu_per_epoch_s": cpu / epochs}


def _grew(before: tuple[int, int]) -> int:
    """Peak RSS growth during a call: peak after - RSS before, if the peak was set in the call."""
    rss, peak = before
    now = _peak_kib()
    return max(0, now - rss) if now > peak else 0


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- driver
def spawn(data: Path, method: str, *, opt="sgd", k=1, epochs=50, threads=1, dtype="float32",
          env: dict | None = None, extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", method, "--data", str(data), "--opt", opt, "--k", str(k),
           "--epochs", str(epochs), "--threads", str(threads), "--dtype", dtype, *(extra or [])]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][7:]), "load_1min": load}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, default=3515)
    p.add_argument("--slices", type=int, default=15)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--old-epochs", type=int, default=2, help="epochs the torch loop runs (extrapolated)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2, help="rounds over all methods (medians reported)")
    p.add_argument("--only", nargs="+", help="run only methods whose label contains one of these")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    # child mode (internal)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--opt", default="sgd", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    return p


def plan(args) -> list[dict[str, Any]]:
    """The measurements of one round, per thread count, alternating old and new."""
    specs = []
    for t in args.threads:
        specs += [
            {"label": "old: engine.fit + torch.optim, SGD", "method": "old", "opt": "sgd", "epochs": args.old_epochs},
            {"label": "head_trainer K=1, SGD", "method": "ht", "opt": "sgd", "k": 1},
            {"label": "old: engine.fit + torch.optim, AdamW", "method": "old", "opt": "adamw", "epochs": args.old_epochs},
            {"label": "head_trainer K=1, AdamW", "method": "ht", "opt": "adamw", "k": 1},
            {"label": "head_trainer K=1, SGD, float64 state", "method": "ht", "opt": "sgd", "k": 1, "dtype": "float64"},
            {"label": "torch analytic K=1, SGD", "method": "torch-analytic", "opt": "sgd", "k": 1, "epochs": 1},
            {"label": "torch analytic K=32, SGD", "method": "torch-analytic", "opt": "sgd", "k": 32, "epochs": 1},
            {"label": "head_trainer K=10, SGD", "method": "ht", "opt": "sgd", "k": 10},
            {"label": "head_trainer K=10, AdamW", "method": "ht", "opt": "adamw", "k": 10},
            {"label": "head_trainer K=32, SGD", "method": "ht", "opt": "sgd", "k": 32},
            {"label": "head_trainer K=32, AdamW", "method": "ht", "opt": "adamw", "k": 32},
        ]
        for sp in specs[-11:]:
            sp["threads"] = t
            sp.setdefault("epochs", args.epochs)
    if args.only:
        specs = [sp for sp in specs if any(o in sp["label"] for o in args.only)]
    return specs


def per_trial(m: dict[str, Any], spec: dict[str, Any], epochs: int, what: str = "wall") -> float:
    """Wall (or CPU) seconds per trial of --epochs epochs, from the per-epoch time (exact for
    head_trainer, which ran them all; extrapolated for old and torch analytic)."""
    per_epoch = m["per_epoch_s"] if what == "wall" else m["cpu_per_epoch_s"]
    return per_epoch * epochs / spec.get("k", 1)


def summarize(specs, runs, epochs: int) -> list[dict[str, Any]]:
    """Medians over rounds, and speed-ups against the old path of the same optimiser, threads
    and round (paired)."""
    old_of = {(sp["opt"], sp["threads"]): i for i, sp in enumerate(specs) if sp["method"] == "old"}
    rows = []
    for sp, ms in zip(specs, runs):
        olds = runs[old_of[(sp["opt"], sp["threads"])]]
        ratio = {what: float(np.median([per_trial(o, sp | {"k": 1}, epochs, what) / per_trial(m, sp, epochs, what)
                                        for o, m in zip(olds, ms)])) for what in ("wall", "cpu")}
        rows.append({**sp, "wall_s": float(np.median([per_trial(m, sp, epochs) for m in ms])),
                     "cpu_s": float(np.median([per_trial(m, sp, epochs, "cpu") for m in ms])),
                     "speedup_wall": ratio["wall"], "speedup_cpu": ratio["cpu"],
                     "peak_rss_mib": max(m["peak_rss_mib"] for m in ms),
                     "peak_growth_mib": max(m["grew_kib"] / 1024 for m in ms),
                     "max_abs_dp": next((m["max_abs_dp"] for m in ms if "max_abs_dp" in m), None),
                     "rounds": ms})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.child:
        args.method, args.threads = args.child, args.threads[0]
        child(args)
        return {}
    uptime_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="headbench") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = make_features(args.subjects, args.slices)
        np.savez(tmp / "feats.npz", **data)
        n_train, n_val = int((data["part"] == 0).sum()), int((data["part"] == 1).sum())
        print(f"features: {args.subjects} subjects x {args.slices} slices x {N_FEAT} float32 "
              f"({data['feats'].nbytes / 2**20:.0f} MiB); train {n_train} + val {n_val} slices; "
              f"made in {time.perf_counter() - t0:.1f} s")
        limits = machine_limits(np.ascontiguousarray(data["feats"][data["part"] < 2]))
        del data
        phys = floor(n_train, n_val, args.epochs, limits)
        print("machine, 1 thread: numpy copy {copy_gbs:.1f} GB/s (read + write), streaming read "
              "{stream_read_gbs:.1f} GB/s, shuffled-row read {shuffled_row_read_gbs:.1f} GB/s, "
              "sgemm {gemm_gflops_1t:.0f} GFLOP/s".format(**limits))
        print("floor per trial ({e} epochs): {gflop_torch_form:.1f} GFLOP as torch computes it, "
              "{gflop_diff_form:.1f} GFLOP on the logit difference -> {flop_floor_s:.2f} s at sgemm speed; "
              "{gb_read:.1f} GB read -> {read_floor_stream_s:.2f} s streaming, "
              "{read_floor_shuffled_s:.2f} s in shuffled order".format(e=args.epochs, **phys))
        cache = tmp / "numba_cache"
        compile_cold = spawn(tmp / "feats.npz", "compile", env={"NUMBA_CACHE_DIR": str(cache)})
        compile_warm = spawn(tmp / "feats.npz", "compile", env={"NUMBA_CACHE_DIR": str(cache)})
        print(f"fresh process: import head_trainer {compile_warm['import_s']:.2f} s; first SGD + AdamW "
              f"calls {compile_cold['first_calls_s']:.1f} s with an empty numba cache (compiling), "
              f"{compile_warm['first_calls_s']:.2f} s with it filled")

        specs = plan(args)
        runs: list[list[dict[str, Any]]] = [[] for _ in specs]
        for r in range(args.repeat):
            for i, sp in enumerate(specs):
                extra = ["--check"] if (sp["method"] == "old" and r == 0) else []
                m = spawn(tmp / "feats.npz", sp["method"], opt=sp["opt"], k=sp.get("k", 1),
                          epochs=sp["epochs"], threads=sp["threads"], dtype=sp.get("dtype", "float32"),
                          extra=extra)
                runs[i].append(m)
                print(f"  round {r + 1}, {sp['threads']} thread(s), {sp['label']}: "
                      f"{per_trial(m, sp, args.epochs):.3f} s/trial wall, "
                      f"{per_trial(m, sp, args.epochs, 'cpu'):.3f} s CPU (load {m['load_1min']:.1f})", flush=True)

    rows = summarize(specs, runs, args.epochs)
    print(f"\nper trial of {args.epochs} epochs, median of {args.repeat} rounds (old: extrapolated from "
          f"{args.old_epochs} epochs, torch analytic from 1); speed-up = median of each round's own ratio")
    print("| method | threads | wall s / trial | CPU s / trial | speed-up wall | speed-up CPU | peak RSS MiB "
          "| RSS growth in the call MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['threads']} | {row['wall_s']:.3f} | {row['cpu_s']:.3f} | "
              f"{row['speedup_wall']:.0f}x | {row['speedup_cpu']:.0f}x | {row['peak_rss_mib']:.0f} | "
              f"{row['peak_growth_mib']:.0f} |")
    for row in rows:
        if row["max_abs_dp"] is not None:
            print(f"old vs head_trainer at this size, {row['opt']}, {row['threads']} thread(s), after "
                  f"{args.old_epochs} epochs: max |dp| per val subject = {row['max_abs_dp']:.1e}")
    uptime_after = os.getloadavg()
    print(f"load average (1/5/15 min) before {uptime_before}, after {uptime_after}")
    result = {"limits": limits, "floor": phys, "compile_cold": compile_cold, "compile_warm": compile_warm,
              "rows": rows, "load_before": uptime_before, "load_after": uptime_after,
              "n_train": n_train, "n_val": n_val}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
