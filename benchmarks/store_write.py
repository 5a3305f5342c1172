"""Micro-benchmark of the ingest builder's per-participant cost and of reading the store.

    .venv/bin/python benchmarks/store_write.py [--participants 200] [--out /tmp/bench_store]

Synthetic participants: 15 x 256x512 uint16 slices (phantom thighs,
data_prep/synthetic/phantom.py, scaled to 0..65535 like the recipe). For each participant the
worker's share is done first (untimed for the builder: compress, and for the new path write
the shard into staging),
then the builder's share is timed, as data_prep.ingest.build runs it:
- old: what StoreWriter.add did before sharding (commit fcba9b3, `encoded=`): unpickle the
  worker's result (15 compressed chunks + digests), one zarr `resize` per participant, 15
  chunk files `c.<slice>.0.0`, journal line + fsync. Re-implemented here (the code is gone),
  on an unsharded IMAGE_CODEC array as that code made;
- new: unpickle the worker's result (staged path + digests), StoreWriter.add(staged=): one
  os.replace of the shard file, journal line (fsync at most once a second);
- also the current StoreWriter.add(images=) for both layouts (the in-process / workers=1
  path, and the zarr path kept for old-layout stores), which include the compression.
Then finish() of each store, and reads through open_store(...).images: one whole participant
(images[k*15:(k+1)*15]) and one single slice, random participants, warm page cache.
Prints medians (and 90th percentiles) in ms. Results vary with the disk and machine load.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zarr
from zarr.codecs import BloscCodec

from data_prep.preprocess import Recipe
from data_prep.store import JOURNAL, StoreWriter, open_store, shards, slice_digests
from data_prep.synthetic.phantom import ThighAnatomy, render_axial_stack

RECIPE = Recipe(n_slices=15, size=(256, 512))


def participants(n: int, distinct: int = 8, seed: int = 0) -> list[np.ndarray]:
    """`n` image stacks (cycling over `distinct` rendered phantoms), uint16 0..65535."""
    rng = np.random.default_rng(seed)
    stacks = []
    for _ in range(min(n, distinct)):
        anat = ThighAnatomy(muscle_area_cm2=float(rng.uniform(80, 140)),
                            imat_fraction=float(rng.uniform(0.03, 0.2)),
                            fat_area_cm2=float(rng.uniform(40, 120)))
        image = render_axial_stack(anat, matrix=RECIPE.size, rng=rng).image
        lo, hi = np.percentile(image, [0.5, 99.5])
        stacks.append(np.round(np.clip((image - lo) / (hi - lo), 0, 1) * 65535).astype(np.uint16))
    return [stacks[i % len(stacks)] for i in range(n)]


def entry(i: int) -> tuple[dict, dict]:
    pid = f"{i:016x}"
    return ({"participant": pid, "problems": [],
             "row": {"subject_id": pid, "cohort": "oai", "sex": "female", "age": 60.0,
                     "pixel_spacing_row_mm": 0.98, "pixel_spacing_col_mm": 0.98}},
            {"intensity_low": 1.0, "intensity_high": 2.0})


def old_layout_writer(path: Path) -> StoreWriter:
    """A new store whose images array is in the layout made before sharding."""
    writer = StoreWriter.start(path, RECIPE, build_key="oai:bench")
    root = writer.root
    del root["images"]
    root.create_array("images", shape=(0, *RECIPE.size), chunks=(1, *RECIPE.size),
                      dtype="uint16", fill_value=0, compressors=BloscCodec(**shards.IMAGE_CODEC),
                      chunk_key_encoding=shards.IMAGE_CHUNK_KEYS,
                      config={"write_empty_chunks": True})
    writer = StoreWriter.start(path, RECIPE, build_key="oai:bench")  # resumes: old layout
    assert not writer.sharded
    return writer


def old_add(writer: StoreWriter, journal, ent: dict, stats: dict, digests: list[str],
            encoded: list[bytes]) -> None:
    """StoreWriter.add(..., encoded=...) as it was before sharding (fcba9b3)."""
    import json
    n, start = RECIPE.n_slices, writer.n_slices
    writer.images.resize((start + n, *RECIPE.size))
    folder = writer.path / "images"
    for i, chunk in enumerate(encoded):
        with open(folder / writer.images.metadata.encode_chunk_key((start + i, 0, 0)), "wb") as f:
            f.write(chunk)
    e = dict(ent, index=len(writer.entries), slice_start=start, slice_count=n,
             digests=list(digests), norm={c: float(v) for c, v in stats.items()})
    writer.digests += digests
    writer.rows.append(dict(ent["row"], slice_start=start, slice_count=n))
    writer.norm.append(dict(e["norm"]))
    writer._ids.add(ent["row"]["subject_id"])
    writer.n_slices += n
    journal.write(json.dumps(e, sort_keys=True) + "\n")
    journal.flush()
    os.fsync(journal.fileno())
    writer.entries.append(e)


def encode_slices(images: np.ndarray) -> list[bytes]:
    """The old per-slice chunks (each exactly an inner chunk of the new shard)."""
    return [shards._BLOSC.encode(s) for s in np.ascontiguousarray(images, dtype="<u2")]


def ms(values: list[float]) -> str:
    v = sorted(values)
    return (f"median {1e3 * statistics.median(v):7.3f} ms   p90 "
            f"{1e3 * v[int(0.9 * (len(v) - 1))]:7.3f} ms   mean {1e3 * statistics.fmean(v):7.3f} ms")


def finish(writer: StoreWriter) -> float:
    t = time.perf_counter()
    writer.finish(cohort="oai", cohort_summary={}, ingest_problems=[], provenance={})
    return time.perf_counter() - t


def bench_write(stacks: list[np.ndarray], root: Path) -> dict[str, Path]:
    digests = [slice_digests(s) for s in stacks]
    times: dict[str, list[float]] = {k: [] for k in ("old", "new", "new_images", "old_images")}
    worker: dict[str, list[float]] = {"old": [], "new": []}

    w_old = old_layout_writer(root / "old.zarr")
    w_old._journal.close()
    journal = open(w_old.path / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115 - as the old writer
    w_new = StoreWriter.start(root / "new.zarr", RECIPE, build_key="oai:bench")
    assert w_new.sharded
    for i, images in enumerate(stacks):  # old and new alternately: the same disk conditions
        ent, stats = entry(i)
        t = time.perf_counter()
        payload = pickle.dumps((encode_slices(images), digests[i]), pickle.HIGHEST_PROTOCOL)
        worker["old"].append(time.perf_counter() - t)
        t = time.perf_counter()
        encoded, dig = pickle.loads(payload)
        old_add(w_old, journal, ent, stats, dig, encoded)
        times["old"].append(time.perf_counter() - t)

        staged = w_new.staged_path(i)
        t = time.perf_counter()
        shards.write_shard(images, staged)
        payload = pickle.dumps((str(staged), digests[i]), pickle.HIGHEST_PROTOCOL)
        worker["new"].append(time.perf_counter() - t)
        t = time.perf_counter()
        path, dig = pickle.loads(payload)
        w_new.add(ent, None, stats, dig, staged=path)
        times["new"].append(time.perf_counter() - t)
    journal.close()
    w_old._journal = type(w_old._journal)(w_old.path / JOURNAL)
    t_finish_old = finish(w_old)
    t_finish_new = finish(w_new)

    for name, writer in (("new_images", StoreWriter.start(root / "new_img.zarr", RECIPE,
                                                          build_key="oai:bench")),
                         ("old_images", old_layout_writer(root / "old_img.zarr"))):
        for i, images in enumerate(stacks):
            ent, stats = entry(i)
            t = time.perf_counter()
            writer.add(ent, images, stats, digests[i])
            times[name].append(time.perf_counter() - t)
        finish(writer)

    n = len(stacks)
    print(f"\nbuilder, per participant ({n} participants of 15 x 256x512 uint16):")
    print(f"  old  (resize + 15 chunk files + fsync, unpickle 15 chunks): {ms(times['old'])}")
    print(f"  new  (staged shard: os.replace + journal line, unpickle path): {ms(times['new'])}")
    print(f"  StoreWriter.add(images=), sharded (encode + write + rename): {ms(times['new_images'])}")
    print(f"  StoreWriter.add(images=), old layout (zarr resize + write): {ms(times['old_images'])}")
    print(f"  total builder time: old {sum(times['old']):.3f} s, new {sum(times['new']):.3f} s")
    print(f"  finish(): old {t_finish_old:.3f} s, new {t_finish_new:.3f} s")
    print("worker, per participant (compress [+ write shard] + pickle the result):")
    print(f"  old: {ms(worker['old'])}")
    print(f"  new: {ms(worker['new'])}")
    size = {k: sum(f.stat().st_size for f in (root / f"{k}.zarr" / "images").iterdir()) / n
            for k in ("old", "new")}
    print(f"image bytes: old {size['old'] / 1e6:.3f} MB, new {size['new'] / 1e6:.3f} MB per "
          "participant (raw 3.932 MB)")
    return {"old": root / "old.zarr", "new": root / "new.zarr"}


def bench_read(stores: dict[str, Path], repeat: int = 300, seed: int = 1) -> None:
    print(f"\nreads through open_store(...).images (warm page cache, {repeat} random):")
    for name, path in stores.items():
        store = open_store(path)
        images = store.images
        n = int(images.shape[0]) // RECIPE.n_slices
        whole, one = [], []
        rng = np.random.default_rng(seed)
        images[:]  # warm the page cache
        for _ in range(repeat):
            k = int(rng.integers(n))
            t = time.perf_counter()
            block = images[k * 15:(k + 1) * 15]
            whole.append(time.perf_counter() - t)
            s = int(rng.integers(n * 15))
            t = time.perf_counter()
            sl = images[s]
            one.append(time.perf_counter() - t)
            assert block.shape == (15, *RECIPE.size) and sl.shape == RECIPE.size
        layout = (f"shards {images.shards}, inner chunks {images.chunks}" if images.shards
                  else f"chunks {images.chunks}")
        print(f"  {name} layout ({layout}):")
        print(f"    whole participant: {ms(whole)}")
        print(f"    single slice:      {ms(one)}")
    a, b = (open_store(p).images for p in stores.values())
    assert np.array_equal(a[:], b[:]), "layouts differ in content"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--participants", type=int, default=200)
    p.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.out))
    try:
        t = time.perf_counter()
        stacks = participants(args.participants)
        print(f"{args.participants} participants rendered in {time.perf_counter() - t:.1f} s; "
              f"work folder {root}; zarr {zarr.__version__}, {os.cpu_count()} CPUs")
        stores = bench_write(stacks, root)
        bench_read(stores)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
