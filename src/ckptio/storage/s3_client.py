"""Which client serves ``s3://`` URLs: obstore (a Rust client) when it is installed, s3fs otherwise.

``benchmarks/stores.py`` measured obstore uploading in 0.59x and downloading in 0.41x s3fs's time
on one server, so it is the default. s3fs stays the fallback, and the choice can be forced with
``storage_options={"client": "s3fs"}`` (or ``"obstore"``) or ``CKPTIO_S3_CLIENT=s3fs|obstore``.

The options users already pass for s3fs are mapped onto obstore's S3 config (``endpoint_url`` or
``client_kwargs={"endpoint_url", "region_name"}``, ``key``/``secret``/``token``, ``anon=True``),
from ``storage_options`` over fsspec's own config (``fsspec.config.conf["s3"]``, the
``FSSPEC_S3_*`` variables) over the standard ``AWS_*`` variables. An option obstore cannot
honour is never ignored silently: the URL goes to s3fs instead (or, when obstore was asked for
by name, the save or load is refused). So does a URL whose credentials or region would come
from ``AWS_PROFILE`` or the shared ``~/.aws`` files, which obstore does not read.

obstore's runtime (tokio) does not survive ``fork()``: a process forked after its parent used
obstore hangs on its first request. Such a process (a rank started with ``fork`` by a parent that
had saved or loaded from S3) gets s3fs instead; ranks started by ``torchrun`` or ``spawn`` are
fresh processes and get obstore.

:class:`ObstoreS3FileSystem` is a small blocking fsspec filesystem over obstore's own calls,
not obstore's ``FsspecStore`` adapter: the adapter's recursive ``get`` fails on folder entries,
its ``ls`` of an object raises, and every call hops through fsspec's event-loop thread, for
nothing here where every call blocks. Uploads and whole-object reads use the
adapter's buffered file (obstore's multipart writer and reader); every write hands the writer a
copy, because it keeps a reference to the caller's buffer until the part is sent.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ckptio.errors import CheckpointError

CLIENT_ENV = "CKPTIO_S3_CLIENT"
CLIENTS = ("obstore", "s3fs")
_CLIENT_KWARGS = {"endpoint_url", "region_name"}
_OPTIONS = {"client", "endpoint_url", "key", "secret", "token", "anon", "client_kwargs"}
_ENV = {  # obstore config key -> the standard variables, first set wins
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
}


_STARTED = [False]  # this process built an obstore filesystem (its runtime may be running)
_FORKED = [False]  # this process was forked from one where obstore had started


def _after_fork_in_child() -> None:
    _FORKED[0] = _FORKED[0] or _STARTED[0]


os.register_at_fork(after_in_child=_after_fork_in_child)


def obstore_available() -> bool:
    """Installed, and usable here: not in a process forked after its parent started obstore."""
    if _FORKED[0]:
        return False
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def requested_client(options: dict[str, Any], url: str) -> str | None:
    """The client named by ``storage_options["client"]`` or ``$CKPTIO_S3_CLIENT``; None: the default."""
    name = options.get("client") or os.environ.get(CLIENT_ENV) or None
    if name is not None and name not in CLIENTS:
        raise CheckpointError(f"unknown s3 client {name!r}: use one of {', '.join(CLIENTS)}", path=url)
    return name


def obstore_config(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(S3 config, client options)`` for obstore from s3fs-style options; None when some option
    has no obstore equivalent (the caller then uses s3fs, which understands it)."""
    client_kwargs = options.get("client_kwargs") or {}
    if set(options) - _OPTIONS or set(client_kwargs) - _CLIENT_KWARGS:
        return None
    config: dict[str, Any] = {}
    for key, names in _ENV.items():
        for name in names:
            if os.environ.get(name):
                config[key] = os.environ[name]
                break
    given = {
        "endpoint": options.get("endpoint_url") or client_kwargs.get("endpoint_url"),
        "access_key_id": options.get("key"),
        "secret_access_key": options.get("secret"),
        "session_token": options.get("token"),
        "region": client_kwargs.get("region_name"),
    }
    config.update({k: v for k, v in given.items() if v})
    if options.get("anon"):
        config = {k: v for k, v in config.items() if k in ("endpoint", "region")}
        config["skip_signature"] = True
    if _needs_botocore(config):
        return None
    client_options = {"allow_http": True} if str(config.get("endpoint", "")).startswith("http://") else {}
    return config, client_options


def _needs_botocore(config: dict[str, Any]) -> bool:
    """Whether the credentials or region would come from what only s3fs (botocore) reads: a named
    profile, or the shared ``~/.aws`` files when neither the options nor the variables give them."""
    if os.environ.get("AWS_PROFILE"):
        return True
    aws = os.path.expanduser("~/.aws")
    credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(aws, "credentials")
    settings = os.environ.get("AWS_CONFIG_FILE") or os.path.join(aws, "config")
    if "access_key_id" not in config and not config.get("skip_signature") and os.path.exists(credentials):
        return True
    return "region" not in config and os.path.exists(settings)


def _merged_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """What s3fs would be built from: fsspec's config for ``s3`` under the caller's options."""
    import fsspec.config

    return {**fsspec.config.conf.get("s3", {}), **(storage_options or {})}


def s3_filesystem(url: str, storage_options: dict[str, Any] | None):
    """An obstore filesystem for an ``s3://`` URL, or None when s3fs should serve it."""
    options = _merged_options(storage_options)
    client = requested_client(options, url)
    if client == "s3fs" or (client is None and not obstore_available()):
        return None
    mapped = obstore_config(options)
    if mapped is None:
        if client == "obstore":
            unknown = sorted((set(options) - _OPTIONS) | (set(options.get("client_kwargs") or {}) - _CLIENT_KWARGS))
            raise CheckpointError(f"the obstore client cannot honour the storage options {unknown}", path=url)
        return None
    if _FORKED[0]:
        raise CheckpointError(
            "the obstore client cannot run in a process forked after its parent used obstore "
            "(its runtime does not survive fork): use s3fs or start ranks with spawn",
            path=url,
        )
    if not obstore_available():
        raise CheckpointError("the obstore client was asked for but is not installed: pip install obstore", path=url)
    config, client_options = mapped
    _STARTED[0] = True
    return ObstoreS3FileSystem(config=config, client_options=client_options)


def without_client(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The options to hand to s3fs (which knows no ``client``)."""
    return {k: v for k, v in (storage_options or {}).items() if k != "client"}


def _filesystem_class():
    from fsspec.spec import AbstractFileSystem
    from obstore.fsspec import BufferedFile

    class ObstoreFile(BufferedFile):
        def close(self) -> None:
            # a file whose opening failed (no such object) has no reader: nothing to close
            if not hasattr(self, "_reader") and not hasattr(self, "_writer"):
                self.closed = True
                return
            super().close()

        def write(self, data) -> int:
            # obstore's writer keeps a reference to the caller's buffer until it uploads the part,
            # so a buffer reused after write() returns (torch.save's, a staging buffer) would be
            # uploaded with its later content: hand it an immutable copy
            return super().write(data if type(data) is bytes else bytes(data))

        def discard(self) -> None:
            """Drop the upload: obstore's writer, never closed, never completes the object. Parts
            already sent (objects over 10 MiB) stay as an invisible incomplete multipart upload
            until the bucket's lifecycle rule removes it: obstore 0.12 has no abort (s3fs aborts)."""
            self.closed = True

    class ObstoreS3FileSystem(AbstractFileSystem):
        """Blocking fsspec filesystem for ``s3://`` over obstore (see the module docstring)."""

        protocol = ("s3",)
        root_marker = ""

        def __init__(self, *, config: dict[str, Any], client_options: dict[str, Any], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._config, self._client_options = dict(config), dict(client_options)
            self._stores: dict[str, Any] = {}
            self._lock = threading.Lock()

        def _split_path(self, path: str) -> tuple[str, str]:
            bucket, _, key = self._strip_protocol(path).partition("/")
            return bucket, key

        def _construct_store(self, bucket: str):
            from obstore.store import S3Store

            with self._lock:
                if bucket not in self._stores:
                    self._stores[bucket] = S3Store(
                        bucket, config=self._config, client_options=self._client_options or None
                    )
                return self._stores[bucket]

        def _store_key(self, path: str):
            bucket, key = self._split_path(path)
            return self._construct_store(bucket), key

        @staticmethod
        def _file_entry(bucket: str, meta: dict) -> dict[str, Any]:
            return {"name": f"{bucket}/{meta['path']}", "size": meta["size"], "type": "file"}

        def ls(self, path: str, detail: bool = True, **kwargs: Any):
            bucket, key = self._split_path(path)
            result = self._construct_store(bucket).list_with_delimiter(key or None)
            entries = [self._file_entry(bucket, o) for o in result["objects"]]
            entries += [{"name": f"{bucket}/{p}", "size": 0, "type": "directory"} for p in result["common_prefixes"]]
            if not entries:
                entries = [self.info(path)]  # an object lists as itself; nothing raises FileNotFoundError
            entries.sort(key=lambda e: e["name"])
            return entries if detail else [e["name"] for e in entries]

        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            bucket, key = self._split_path(path)
            store = self._construct_store(bucket)
            if key:
                try:
                    return self._file_entry(bucket, store.head(key))
                except FileNotFoundError:
                    pass
            listed = store.list_with_delimiter(key or None)
            if listed["objects"] or listed["common_prefixes"]:
                return {"name": f"{bucket}/{key}".rstrip("/"), "size": 0, "type": "directory"}
            raise FileNotFoundError(path)

        def find(self, path: str, maxdepth=None, withdirs: bool = False, detail: bool = False, **kwargs: Any):
            if maxdepth is not None:
                return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
            bucket, key = self._split_path(path)
            found: dict[str, dict[str, Any]] = {}
            for chunk in self._construct_store(bucket).list(key or None):
                for meta in chunk:
                    entry = self._file_entry(bucket, meta)
                    found[entry["name"]] = entry
            if not found:
                try:
                    entry = self.info(path)
                except FileNotFoundError:
                    entry = None
                if entry is not None and entry["type"] == "file":
                    found[entry["name"]] = entry
            if withdirs:
                top = self._strip_protocol(path)
                for name in list(found):
                    parent = name.rsplit("/", 1)[0]
                    while len(parent) > len(top) and parent.startswith(top + "/"):
                        found.setdefault(parent, {"name": parent, "size": 0, "type": "directory"})
                        parent = parent.rsplit("/", 1)[0]
            names = sorted(found)
            return {n: found[n] for n in names} if detail else names

        def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
            store, key = self._store_key(path)
            if start is None and end is None:
                return store.get(key).bytes().to_bytes()
            size = None if (start or 0) >= 0 and (end is not None and end >= 0) else store.head(key)["size"]
            start = 0 if start is None else (start if start >= 0 else max(size + start, 0))
            end = size if end is None else (end if end >= 0 else size + end)
            if end <= start:
                return b""
            return store.get_range(key, start=start, end=end).to_bytes()

        def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
            store, key = self._store_key(path)
            store.put(key, value)

        def rm_file(self, path: str) -> None:
            store, key = self._store_key(path)
            store.delete(key)

        def rm(self, path, recursive: bool = False, maxdepth=None) -> None:
            paths = [path] if isinstance(path, str) else list(path)
            by_bucket: dict[str, list[str]] = {}
            for p in paths:
                names = self.find(p) if recursive else [self._strip_protocol(p)]
                if not names:
                    raise FileNotFoundError(p)
                for name in names:
                    bucket, key = self._split_path(name)
                    by_bucket.setdefault(bucket, []).append(key)
            for bucket, keys in by_bucket.items():
                self._construct_store(bucket).delete(keys)

        def _open(self, path: str, mode: str = "rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
            if mode not in ("rb", "wb"):
                raise ValueError(f"only 'rb' and 'wb' are supported, got {mode!r}")
            return ObstoreFile(self, self._strip_protocol(path), mode, **kwargs)

    return ObstoreS3FileSystem


_CLASS: list[type] = []


def ObstoreS3FileSystem(**kwargs: Any):  # noqa: N802 (built lazily: obstore is optional)
    """The obstore-backed filesystem (fsspec caches one per configuration, cleared after fork)."""
    if not _CLASS:
        _CLASS.append(_filesystem_class())
    return _CLASS[0](**kwargs)
