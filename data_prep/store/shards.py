"""The `images` array's files: one shard per participant, encoded by the ingest workers.

    from data_prep.store.shards import encode_shard, write_shard
    data = encode_shard(images)            # uint16 (n_slices, rows, cols) -> the shard file
    write_shard(images, staging / "7.shard")

Layout (ARCHITECTURE.md "Zarr store"; `create_image_array`): `images` uint16 (n, rows, cols)
is sharded with one shard per participant, shards (n_slices, rows, cols) holding inner chunks
(1, rows, cols) (training reads single slices), each inner chunk Blosc IMAGE_CODEC, the
shard index at the end of the file with zarr's default index codecs (little-endian uint64
(offset, length) per inner chunk, then crc32c). Shard keys `c.<k>.0.0`: shard k holds slices
k*n_slices .. k*n_slices + n_slices - 1. A shard's bytes do not depend on where it lies in
the array, so a worker builds the whole file (`encode_shard`, byte for byte what zarr writes
with write_empty_chunks=True) into the store's staging folder and the builder only renames
it into place (StoreWriter.add). Stores made before (one chunk per slice, unsharded) are
read and appended to through zarr (`is_participant_sharded` is False for them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec

if TYPE_CHECKING:
    from data_prep.preprocess import Recipe

# Blosc lz4 with bit shuffle: on 256x512 slices about 25x faster than zarr's default (zstd
# level 0: 6 ms per slice) for 7% more bytes on the synthetic cohort (benchmarks/README.md
# "Ingest"). Stores made with another codec are still read and appended to (through zarr).
IMAGE_CODEC = {"typesize": 2, "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle",
               "blocksize": 0}
# Keys `c.<k>.0.0`: all files in one folder. zarr's default `c/<k>/0/0` makes two folders
# per key, and creating them cost more than writing the data.
IMAGE_CHUNK_KEYS = {"name": "default", "separator": "."}
STAGING = "build_staging"  # inside the store while a build or append is unfinished
_NO_CHUNK = 2**64 - 1  # index entry of an inner chunk that was never written
_BLOSC = numcodecs.Blosc(cname=IMAGE_CODEC["cname"], clevel=IMAGE_CODEC["clevel"],
                         shuffle=numcodecs.Blosc.BITSHUFFLE, blocksize=IMAGE_CODEC["blocksize"],
                         typesize=IMAGE_CODEC["typesize"])


def _sharding_codec(rows: int, cols: int) -> ShardingCodec:
    return ShardingCodec(chunk_shape=(1, rows, cols),
                         codecs=[BytesCodec(endian="little"), BloscCodec(**IMAGE_CODEC)])


def create_image_array(root: zarr.Group, recipe: Recipe) -> zarr.Array:
    """The empty `images` array of a new store, one shard per participant (see above)."""
    rows, cols = recipe.size
    return root.create_array(
        "images", shape=(0, rows, cols), dtype="uint16", fill_value=0,
        chunks=(1, rows, cols), shards=(recipe.n_slices, rows, cols),
        compressors=BloscCodec(**IMAGE_CODEC), chunk_key_encoding=IMAGE_CHUNK_KEYS,
        config={"write_empty_chunks": True})


def is_participant_sharded(images: zarr.Array, recipe: Recipe) -> bool:
    """True when `images` has exactly create_image_array's layout for `recipe`: only then
    are shard files built outside zarr (encode_shard) written into it."""
    meta = images.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(meta.codecs) != 1:
        return False
    rows, cols = recipe.size
    expected = _sharding_codec(rows, cols).to_dict()
    return (_json(meta.codecs[0].to_dict()) == _json(expected)
            and images.dtype == np.uint16 and tuple(images.shape[1:]) == (rows, cols)
            and tuple(images.shards or ()) == (recipe.n_slices, rows, cols)
            and meta.encode_chunk_key((1, 0, 0)) == shard_key(1)
            and int(meta.fill_value) == 0)


def _json(d: dict) -> object:
    return json.loads(json.dumps(d))  # tuples -> lists, for comparing codec configurations


def shard_key(k: int) -> str:
    """File name (under `images/`) of shard k: slices k*n_slices .. (k+1)*n_slices - 1."""
    return f"c.{k}.0.0"


def encode_shard(images: np.ndarray) -> bytes:
    """The whole shard file for one participant's uint16 (n_slices, rows, cols) images.

    Byte for byte what zarr 3 writes for that shard of create_image_array's layout with
    write_empty_chunks=True (tested): the inner chunks (bytes codec, little endian, then
    Blosc IMAGE_CODEC) in order (the Morton order of (n, 1, 1) chunks is 0..n-1), then the
    index: (offset, length) per inner chunk as little-endian uint64, then its crc32c.
    """
    return b"".join(_shard_parts(images))


def _shard_parts(images: np.ndarray) -> list[bytes]:
    """The shard file as a list of byte strings: the inner chunks, then index + crc32c."""
    if images.ndim != 3 or images.shape[0] < 1 or images.dtype != np.uint16:
        raise ValueError(f"need uint16 (n_slices, rows, cols), got {images.dtype} "
                         f"{images.shape}")
    images = np.ascontiguousarray(images, dtype="<u2")
    chunks = [_BLOSC.encode(s) for s in images]
    index = np.empty((len(chunks), 2), dtype="<u8")
    index[:, 1] = [len(c) for c in chunks]
    index[:, 0] = np.cumsum(index[:, 1]) - index[:, 1]
    index_bytes = index.tobytes()
    crc = google_crc32c.value(index_bytes).to_bytes(4, "little")
    return [*chunks, index_bytes + crc]


def write_shard(images: np.ndarray, path: str | os.PathLike) -> None:
    """encode_shard(images) to the file `path` (for a worker; not fsynced). No temporary
    name: the builder renames a staged file into the store only after its worker returned,
    so a file left half-written by a killed worker is never used (and staging is emptied
    when the build resumes)."""
    with open(path, "wb") as f:
        f.writelines(_shard_parts(images))


def shard_index_nbytes(n_chunks: int) -> int:
    """Size of the index at the end of a shard of `n_chunks` inner chunks."""
    return 16 * n_chunks + 4


def decode_shard_index(tail: bytes, n_chunks: int) -> np.ndarray:
    """(n_chunks, 2) uint64 (offset, length) from a shard's last shard_index_nbytes bytes;
    _NO_CHUNK marks an inner chunk never written. Raises ValueError on a bad checksum."""
    tail = bytes(tail)
    if len(tail) != shard_index_nbytes(n_chunks):
        raise ValueError(f"shard index of {len(tail)} bytes, expected "
                         f"{shard_index_nbytes(n_chunks)}")
    body, crc = tail[:-4], tail[-4:]
    if google_crc32c.value(body).to_bytes(4, "little") != crc:
        raise ValueError("shard index checksum mismatch")
    return np.frombuffer(body, dtype="<u8").reshape(n_chunks, 2)


def written_inner_chunks(tail: bytes, n_chunks: int) -> list[int]:
    """Positions (0..n_chunks-1) of the inner chunks a shard index says were written."""
    index = decode_shard_index(tail, n_chunks)
    return np.flatnonzero(index[:, 0] != _NO_CHUNK).tolist()


def reset_staging(store_path: Path, create: bool) -> Path:
    """Empty the store's staging folder (files of participants that were never journaled);
    create it when `create`, else leave none."""
    staging = store_path / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    if create:
        staging.mkdir()
    return staging


def remove_stray_shards(images_dir: Path, n_shards: int) -> list[str]:
    """Delete shard files `c.<k>.0.0` with k >= n_shards (written for a participant that was
    never journaled before a kill); returns their names."""
    stray = []
    with os.scandir(images_dir) as it:
        for e in it:
            parts = e.name.split(".")
            if (len(parts) == 4 and parts[0] == "c" and parts[1].isdigit()
                    and int(parts[1]) >= n_shards):
                stray.append(e.name)
    for name in stray:
        os.unlink(images_dir / name)
    return stray


def decode_shard(data: bytes, n_chunks: int, rows: int, cols: int) -> np.ndarray:
    """uint16 (n_chunks, rows, cols) from a whole shard file of create_image_array's layout:
    the inverse of encode_shard (an inner chunk never written reads as the fill value 0).

    About 30x faster than reading the same slices through zarr, whose per-inner-chunk codec
    pipeline costs ~0.4 ms even for tiny slices (benchmarks/README.md "a cell's closing work").
    Use only when ``is_participant_sharded`` holds for the array.

    Raises:
        ValueError: bad index checksum, or an inner chunk of the wrong size.
    """
    view = memoryview(data)
    index = decode_shard_index(view[len(view) - shard_index_nbytes(n_chunks):], n_chunks)
    out = np.zeros((n_chunks, rows, cols), dtype=np.uint16)
    for j, (offset, length) in enumerate(index.tolist()):
        if offset == _NO_CHUNK:
            continue
        chunk = np.frombuffer(_BLOSC.decode(view[offset:offset + length]), dtype="<u2")
        if chunk.size != rows * cols:
            raise ValueError(f"inner chunk {j} holds {chunk.size} values, expected {rows * cols}")
        out[j] = chunk.reshape(rows, cols)
    return out
