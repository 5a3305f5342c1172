"""Synthetic thigh-MRI cohorts: real DICOM series plus clinical tables in each cohort's conventions.

    python data_prep/synth.py --out data/synth --subjects 100 --seed 0 [--null]
        [--matrix 256x512] [--r-strength 0.65] [--overwrite]

Writes the layout of ARCHITECTURE.md "Synthetic cohort layout": OAI gets N imaged participants
(+ TABLE_ONLY_OAI table-only rows), SOMMA (N+1)//2, volunteers 8. Same seed -> byte-identical
files. truth.csv holds the generator's ground truth (tests only); manifest.json the settings and
the planted and realised correlations. This file is the command line; the generator is the
package data_prep/synthetic/ (subjects.py: subject model, tables.py, phantom.py: images,
dicom_writer.py, cohort.py: generate_cohort).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: data_prep from this checkout, not data_prep/
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import sys
import time
from pathlib import Path

from data_prep.synthetic.cohort import generate_cohort

__all__ = ["generate_cohort", "get_args_parser", "main"]


def _matrix(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid matrix {text!r}: use ROWSxCOLS, e.g. 256x512.")
    return rows, cols


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--subjects", type=int, default=100, help="imaged OAI participants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--null", action="store_true", help="measures independent of the images")
    p.add_argument("--matrix", type=_matrix, default=(256, 512), help="ROWSxCOLS (256x512)")
    p.add_argument("--r-strength", type=float, default=0.65,
                   help="planted r of leg strength with muscle area (published 0.60-0.76)")
    p.add_argument("--overwrite", action="store_true", help="replace a cohort already in --out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = generate_cohort(args.out, subjects=args.subjects, seed=args.seed,
                                   null=args.null, matrix=args.matrix,
                                   r_strength=args.r_strength, overwrite=args.overwrite,
                                   verbose=True)
    except (ValueError, FileExistsError) as e:
        sys.exit(f"synth: {e}")
    counts = ", ".join(f"{c} {v['imaged']} imaged" + (f" + {v['table_only']} table-only"
                                                       if v["table_only"] else "")
                       for c, v in manifest["counts"].items())
    realised = manifest["correlations"]["realised"]["oai"]
    print(f"Wrote {counts} to {args.out} in {time.perf_counter() - t0:.1f} s "
          f"(seed {args.seed}, {'NULL measures' if args.null else 'planted correlations'}, "
          f"matrix {args.matrix[0]}x{args.matrix[1]}); OAI realised r: "
          + ", ".join(f"{m} {r}" for m, r in realised.items()))


if __name__ == "__main__":
    main()
