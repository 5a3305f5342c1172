"""Ingest throughput and memory: build_store.py against the raw pydicom read+decode rate,
and against another version of the code (paired, alternating rounds).

    python benchmarks/ingest.py --subjects 100 500 --workers 2 --repeat 3 --out /tmp/bench_ingest
    git worktree add --detach /tmp/old 7c4ffc1      # the code to compare with
    python benchmarks/ingest.py --subjects 100 500 --repeat 5 --baseline /tmp/old

For each N it generates (or reuses) a synthetic cohort of N OAI participants at 256x512
(data_prep/synth.py, seed 0; OAI's release tree) under --out, then measures on the OAI cohort:
  raw   dcmread + pixel_array of every axial thigh slice file (1 process, then --workers
        processes): the floor any ingest must pay to touch the pixels;
  build data_prep/ingest's build (recipe 256x512, --workers) in a child process: slices/s
        and peak RSS of the builder and of its largest worker.
With --baseline REPO (a checkout of other code, e.g. a `git worktree` of an older commit),
REPO's own generator writes the same cohort in REPO's layout (same seed: same images and
tables) and each round also runs REPO's build on it (REPO's own benchmarks/ingest.py
--child-build), right after this code's: `ratio_vs_baseline_paired` is the median of the
rounds' own ratios; the two builds swap places every other round, and each is preceded by
an untimed read of its cohort's thigh files, so both find a warm page cache.
With --repeat K the rounds alternate K times and medians are reported (a shared machine is
noisy). Prints a table and writes <out>/results.json. Results and the command line go into
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SALT = "benchmark-salt-0123456789abcdef"  # synthetic data only
MATRIX = (256, 512)


def thigh_files(dicom_root: Path) -> list[list[Path]]:
    """Per participant (PatientID), the files of the AX_T1_THIGH series, in any layout
    (headers read with pydicom, not timed)."""
    import pydicom

    by_patient: dict[str, list[Path]] = {}
    for path in sorted(p for p in dicom_root.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SeriesDescription == "AX_T1_THIGH":
            by_patient.setdefault(str(ds.PatientID), []).append(path)
    return [by_patient[k] for k in sorted(by_patient)]


def read_decode(files: list[Path]) -> int:
    """dcmread + pixel_array of each file; returns the number of slices decoded."""
    import pydicom

    n = 0
    for f in files:
        pixels = pydicom.dcmread(f).pixel_array
        n += pixels.shape[0] > 0
    return n


def warm(groups: list[list[Path]]) -> None:
    """Read every file once (untimed), so the build that follows finds them in the page
    cache whatever ran before it."""
    for group in groups:
        for f in group:
            f.read_bytes()


def raw_rate(groups: list[list[Path]], workers: int) -> float:
    """Slices/s of read_decode over all groups; processes are started and warmed (imports,
    first decode) before the clock starts, so only the steady rate is timed."""
    if workers == 1:
        read_decode(groups[0])
        t0 = time.perf_counter()
        n = sum(read_decode(g) for g in groups)
        return n / (time.perf_counter() - t0)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(read_decode, groups[:2 * workers], chunksize=1))
        t0 = time.perf_counter()
        n = sum(pool.map(read_decode, groups, chunksize=4))
        return n / (time.perf_counter() - t0)


def child_build(cohort: Path, store: Path, workers: int) -> None:
    """Runs in a fresh process: one build, then its timings and peak RSS as JSON."""
    os.environ["THIGHMRI_SALT"] = SALT
    from data_prep.cohorts import load_spec
    from data_prep.ingest import build
    from data_prep.preprocess import Recipe

    t0 = time.perf_counter()
    summary = build(dicom=cohort / "oai" / "dicom", tables=cohort / "oai" / "tables",
                    spec=load_spec("oai"), out=store, recipe=Recipe(size=MATRIX),
                    salt=SALT.encode(), workers=workers, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "seconds": seconds, "slices": summary["store_slices"],
        "participants": summary["store_subjects"],
        # ru_maxrss is KiB on Linux; CHILDREN = the largest worker process
        "peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def generate(repo: Path, cohort: Path, n: int) -> None:
    """The cohort as `repo`'s own generator writes it (its layout), unless already there."""
    if (cohort / "manifest.json").is_file():
        return
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(repo / "data_prep" / "synth.py"), "--out", str(cohort),
                    "--subjects", str(n), "--seed", "0", "--matrix", "x".join(map(str, MATRIX))],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(repo)))
    print(f"[{n}] generated {cohort} in {time.perf_counter() - t0:.0f} s", flush=True)


def timed_build(repo: Path, cohort: Path, store: Path, workers: int) -> dict:
    """One build by `repo`'s code (its benchmarks/ingest.py --child-build), fresh process."""
    shutil.rmtree(store, ignore_errors=True)  # not inside the timed build
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "ingest.py"),
                           "--child-build", str(cohort), str(store), str(workers)],
                          check=True, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(repo)))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["content_hash"] = json.loads((store / "zarr.json").read_text())["attributes"][
        "content_hash"]
    return result


def run_one(n: int, workers: int, out: Path, repeat: int = 1,
            baseline: Path | None = None) -> dict:
    cohort = out / f"cohort_{n}"
    generate(REPO, cohort, n)
    base_cohort = out / f"baseline_cohort_{n}"
    if baseline is not None:
        generate(baseline, base_cohort, n)
    groups = thigh_files(cohort / "oai" / "dicom" / "00m")
    n_slices = sum(len(g) for g in groups)
    size_gb = sum(f.stat().st_size for g in groups for f in g) / 1e9
    base_groups = thigh_files(base_cohort / "oai" / "dicom" / "00m") if baseline else []
    store = out / f"store_{n}.zarr"
    raws_1, raws_w, builds, base = [], [], [], []
    for i in range(repeat):  # alternate, so a burst of load elsewhere hits every side
        raws_1.append(raw_rate(groups, 1))
        raws_w.append(raw_rate(groups, workers) if workers > 1 else raws_1[-1])
        sides = [(groups, lambda: builds.append(timed_build(REPO, cohort, store, workers)))]
        if baseline is not None:
            sides.append((base_groups, lambda: base.append(timed_build(
                baseline, base_cohort, out / f"baseline_{n}.zarr", workers))))
        for files, run in sides[::-1] if i % 2 else sides:  # each side first every other round
            warm(files)
            run()
    raw_1, raw_w = statistics.median(raws_1), statistics.median(raws_w)
    rates = [b["slices"] / b["seconds"] for b in builds]
    build_rate = statistics.median(rates)
    result = {
        "participants": n, "thigh_slices": n_slices, "thigh_gb": round(size_gb, 2),
        "workers": workers, "repeat": repeat,
        "raw_slices_per_s_1proc": round(raw_1, 1),
        "raw_slices_per_s_workers": round(raw_w, 1),
        "build_slices_per_s": round(build_rate, 1),
        "build_seconds": round(statistics.median(b["seconds"] for b in builds), 1),
        "ratio_build_to_raw_1proc": round(build_rate / raw_1, 3),
        "ratio_build_to_raw_workers": round(build_rate / raw_w, 3),
        # median of each repeat's own ratio: robust to load that changes between repeats
        "ratio_paired_raw_1proc": round(statistics.median(
            r / w for r, w in zip(rates, raws_1)), 3),
        "ratio_paired_raw_workers": round(statistics.median(
            r / w for r, w in zip(rates, raws_w)), 3),
        "peak_rss_main_mib": round(max(b["peak_rss_main_mib"] for b in builds), 1),
        "peak_rss_worker_mib": round(max(b["peak_rss_worker_mib"] for b in builds), 1),
        "all_raw_1proc": [round(r, 1) for r in raws_1],
        "all_raw_workers": [round(r, 1) for r in raws_w],
        "all_build": [round(r, 1) for r in rates],
        "content_hash": builds[-1]["content_hash"],
    }
    if base:
        base_rates = [b["slices"] / b["seconds"] for b in base]
        result.update(
            baseline=str(baseline), baseline_slices_per_s=round(statistics.median(base_rates), 1),
            ratio_vs_baseline_paired=round(statistics.median(
                r / b for r, b in zip(rates, base_rates)), 3),
            baseline_peak_rss_main_mib=round(max(b["peak_rss_main_mib"] for b in base), 1),
            baseline_peak_rss_worker_mib=round(max(b["peak_rss_worker_mib"] for b in base), 1),
            all_baseline=[round(r, 1) for r in base_rates],
            baseline_participants=base[-1]["participants"],
            same_content_hash=base[-1]["content_hash"] == builds[-1]["content_hash"])
    for path in (store, out / f"baseline_{n}.zarr"):
        shutil.rmtree(path, ignore_errors=True)
        Path(str(path) + ".ingest_report.csv").unlink(missing_ok=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, nargs="+", default=[100, 500],
                   help="cohort sizes to measure (OAI participants)")
    p.add_argument("--workers", type=int, default=2, help="build and raw-read processes")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_ingest"),
                   help="work folder: cohorts are generated here and reused")
    p.add_argument("--repeat", type=int, default=1,
                   help="alternate raw reads and builds this many times; report medians")
    p.add_argument("--baseline", type=Path, default=None, metavar="REPO",
                   help="a checkout of other code (e.g. a git worktree of an older commit) "
                        "to build alternately with this code, each on its own generator's "
                        "cohort (same seed)")
    p.add_argument("--cleanup", action="store_true", help="delete the cohorts afterwards")
    p.add_argument("--child-build", nargs=3, metavar=("COHORT", "STORE", "WORKERS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_build:
        cohort, store, workers = args.child_build
        child_build(Path(cohort), Path(store), int(workers))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.subjects:
        r = run_one(n, args.workers, args.out, args.repeat, args.baseline)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.cleanup:
            shutil.rmtree(args.out / f"cohort_{n}", ignore_errors=True)
            shutil.rmtree(args.out / f"baseline_cohort_{n}", ignore_errors=True)
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPUs, {platform.python_version()}",
            "command": "python benchmarks/ingest.py " + " ".join(sys.argv[1:])}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                      indent=2))
    print("\n| participants | slices | raw 1 proc (sl/s) | raw {w} proc (sl/s) | build (sl/s) "
          "| build / raw 1 proc | build / raw {w} proc | peak RSS main (MiB) "
          "| peak RSS worker (MiB) |".format(w=args.workers))
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['participants']} | {r['thigh_slices']} | {r['raw_slices_per_s_1proc']} | "
              f"{r['raw_slices_per_s_workers']} | {r['build_slices_per_s']} | "
              f"{r['ratio_build_to_raw_1proc']:.0%} | {r['ratio_build_to_raw_workers']:.0%} | "
              f"{r['peak_rss_main_mib']} | {r['peak_rss_worker_mib']} |")
    if args.baseline is not None:
        print(f"\n| participants | build (sl/s) | baseline build (sl/s) | this / baseline "
              f"(paired) | peak RSS main / worker (MiB) | baseline peak RSS main / worker "
              f"(MiB) | same content hash |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['participants']} | {r['build_slices_per_s']} | "
                  f"{r['baseline_slices_per_s']} | {r['ratio_vs_baseline_paired']:.0%} | "
                  f"{r['peak_rss_main_mib']} / {r['peak_rss_worker_mib']} | "
                  f"{r['baseline_peak_rss_main_mib']} / {r['baseline_peak_rss_worker_mib']} | "
                  f"{r['same_content_hash']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
