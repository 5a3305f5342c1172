"""Stores on object storage (s3://, gs://, ... through fsspec): read-only, with a node-local cache.

    from data_prep.store import open_store
    store = open_store("s3://lab-bucket/study.zarr")       # credentials from the environment

Ingest writes a local store (renames, fsyncs and a journal that object storage does not
offer); upload.py copies a finished one up and verifies the copy there.

Reading: `open_remote_root(url, cache_dir=...)` opens the Zarr group read-only through
zarr's FsspecStore. With a cache folder, every data object (a participant's image shard,
the index and table arrays, their metadata; not the root `zarr.json`) is fetched whole once, written
to `<cache_dir>/<content hash>/<key>` (atomically) and read from there afterwards: trials
on a node share one local copy of the slices they use, and reading a participant holds at
most its own shard in memory. A store's content hash names its cache folder, so an
appended store (a new hash) never reads stale objects.

Credentials and endpoint come from the environment as for any fsspec/boto client
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, an instance
role, ...); a URL that carries credentials itself is refused (they would end up in grid
files, MLflow params and logs).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import urllib.parse
import uuid
from pathlib import Path

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import BufferPrototype
from zarr.storage import FsspecStore, WrapperStore

from data_prep.store.schema import StoreError

STORE_CACHE_ENV = "THIGHMRI_STORE_CACHE"
DEFAULT_STORE_CACHE = Path("~/.cache/thighmri/stores")
ROOT_METADATA = "zarr.json"


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL such as s3://bucket/store.zarr (not for a local path)."""
    return "://" in str(path) and not str(path).startswith("file://")


def check_url(url: str) -> str:
    """The URL unchanged, or StoreError when it embeds credentials (user:secret@host)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.username or parsed.password or "@" in parsed.netloc:
        redacted = f"{parsed.scheme}://<credentials>@{parsed.netloc.rsplit('@', 1)[-1]}{parsed.path}"
        raise StoreError(f"store URL {redacted} carries credentials; give them through the environment "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role) instead")
    return url


# environment variables whose values must never appear in a message, log, param or tag
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def redact(text: str) -> str:
    """`text` with the value of every SECRET_ENV variable set here replaced by <NAME>."""
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:  # a blank or tiny value would redact ordinary words
            text = text.replace(value, f"<{name}>")
    return text


def default_store_cache() -> Path:
    """$THIGHMRI_STORE_CACHE, else ~/.cache/thighmri/stores (node-local disk)."""
    env = os.environ.get(STORE_CACHE_ENV, "").strip()
    return Path(env or DEFAULT_STORE_CACHE).expanduser()


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of `url`; credentials from the environment."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(check_url(url))
    return fs, path


def exists(url: str, name: str = "") -> bool:
    """Whether `url` (or `url/name`) exists on its object storage."""
    fs, path = filesystem(url)
    return fs.exists(posixpath.join(path, name) if name else path)


def _cut(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix:] if byte_range.suffix else b""
    raise TypeError(f"unexpected byte range {byte_range!r}")


def _read_local(path: Path, byte_range: ByteRequest | None) -> bytes:
    with open(path, "rb") as fh:
        if isinstance(byte_range, RangeByteRequest):
            fh.seek(byte_range.start)
            return fh.read(byte_range.end - byte_range.start)
        if isinstance(byte_range, OffsetByteRequest):
            fh.seek(byte_range.offset)
            return fh.read()
        return _cut(fh.read(), byte_range)


def _write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)  # a concurrent reader sees the whole object or none


class NodeCacheStore(WrapperStore):
    """A read-only zarr Store: a remote store's data objects through a local folder.

    The root metadata (`zarr.json`, whose content hash names `folder`) always comes from the
    remote store; any other key (array metadata, image shards, tables) is fetched whole on
    first use (one participant's image shard at most, a few MB), written atomically
    under `folder`, and served from the local file afterwards, byte ranges included.
    Several processes on a node may share the folder: the last writer of a key wins with
    identical bytes.

    Attributes:
        folder: the local copy of this store version (`<cache root>/<content hash>`).
        fetched: objects this process downloaded (cache misses).
    """

    def __init__(self, store: Store, folder: Path) -> None:
        super().__init__(store)
        self.folder = folder
        self.fetched = 0

    def _with_store(self, store: Store) -> NodeCacheStore:
        return type(self)(store, self.folder)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None):
        if key == ROOT_METADATA:  # names the version (content hash): always the server's
            return await self._store.get(key, prototype, byte_range)
        local = self.folder / key
        if local.is_file():
            return prototype.buffer.from_bytes(await asyncio.to_thread(_read_local, local, byte_range))
        whole = await self._store.get(key, prototype)
        if whole is None:
            return None
        data = whole.to_bytes()
        self.fetched += 1
        await asyncio.to_thread(_write_local, local, data)
        return prototype.buffer.from_bytes(_cut(data, byte_range))

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges):
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))


def open_remote_root(url: str, *, cache_dir: str | os.PathLike | None = None,
                     content_hash: str | None = None):
    """The store's root zarr.Group, read-only; through the node cache when cache_dir is given.

    Args:
        url: fsspec URL of the store (s3://bucket/study.zarr).
        cache_dir: cache root; objects go to `<cache_dir>/<hash>/` (None: no cache).
        content_hash: the store's content hash if known (else read from its root attributes).

    Raises:
        StoreError: no store at the URL, or credentials in the URL.
        FileNotFoundError, PermissionError, OSError: as the object storage answers.
    """
    remote = FsspecStore.from_url(check_url(url), read_only=True)
    try:
        root = zarr.open_group(store=remote, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"{url} is not a Zarr store (no group found)") from exc
    if cache_dir is None:
        return root
    digest = (content_hash or str(root.attrs.get("content_hash", ""))).split(":")[-1]
    if not digest:  # an unfinished store has no hash to name a folder that cannot go stale
        return root
    return zarr.open_group(store=NodeCacheStore(remote, Path(cache_dir).expanduser() / digest[:32]), mode="r")
