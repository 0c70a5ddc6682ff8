"""Which client serves s3:// URLs, and how s3fs-style options map onto obstore's (no server needed)."""

from __future__ import annotations

import os

import pytest

from ckptio.errors import CheckpointError
from ckptio.storage import fsspec_storage, s3_client

pytest.importorskip("obstore", reason="obstore is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed")

_AWS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "CKPTIO_S3_CLIENT")  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    import fsspec.config

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name in _AWS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})


def test_s3fs_options_map_onto_obstore_config():
    config, client = s3_client.obstore_config(
        {"key": "K", "secret": "S", "token": "T", "client_kwargs": {"endpoint_url": "http://h:9", "region_name": "r"}}
    )
    assert config == {"endpoint": "http://h:9", "access_key_id": "K", "secret_access_key": "S",
                      "session_token": "T", "region": "r"}  # fmt: skip
    assert client == {"allow_http": True}
    config, client = s3_client.obstore_config({"endpoint_url": "https://h", "anon": True, "key": "K"})
    assert config == {"endpoint": "https://h", "skip_signature": True} and client == {}


def test_standard_variables_fill_what_the_options_leave(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://e:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    config, client = s3_client.obstore_config({"key": "K"})
    assert config == {"endpoint": "http://e:1", "access_key_id": "K", "secret_access_key": "envsecret",
                      "region": "eu-west-1"}  # fmt: skip
    assert client == {"allow_http": True}


def test_credentials_or_region_only_botocore_would_find_go_to_s3fs(monkeypatch, tmp_path):
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\naws_access_key_id = K\n")
    assert s3_client.obstore_config({"client_kwargs": {"region_name": "r"}}) is None
    assert s3_client.obstore_config({"key": "K", "secret": "S", "client_kwargs": {"region_name": "r"}}) is not None
    (tmp_path / ".aws" / "config").write_text("[default]\nregion = eu-west-1\n")
    assert s3_client.obstore_config({"key": "K", "secret": "S"}) is None
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert s3_client.obstore_config({"key": "K", "secret": "S"}) is not None
    monkeypatch.setenv("AWS_PROFILE", "work")
    assert s3_client.obstore_config({"key": "K", "secret": "S"}) is None


def test_default_is_obstore_and_s3fs_can_be_forced(monkeypatch):
    fs, path = fsspec_storage.filesystem("s3://bucket/run/ck/", {"key": "K", "secret": "S"})
    assert type(fs).__name__ == "ObstoreS3FileSystem" and path == "bucket/run/ck"
    assert fs.unstrip_protocol(path) == "s3://bucket/run/ck"
    fs, path = fsspec_storage.filesystem("s3://bucket/run", {"client": "s3fs", "key": "K", "secret": "S"})
    assert type(fs).__name__ == "S3FileSystem" and path == "bucket/run" and "client" not in fs.storage_options
    monkeypatch.setenv("CKPTIO_S3_CLIENT", "s3fs")
    assert type(fsspec_storage.filesystem("s3://bucket/run")[0]).__name__ == "S3FileSystem"
    monkeypatch.setenv("CKPTIO_S3_CLIENT", "boto")
    with pytest.raises(CheckpointError, match="unknown s3 client 'boto'") as info:
        fsspec_storage.filesystem("s3://bucket/run")
    assert "s3://bucket/run" in str(info.value)


def test_an_option_obstore_cannot_honour_goes_to_s3fs_or_is_refused():
    options = {"key": "K", "secret": "S", "requester_pays": True}
    assert type(fsspec_storage.filesystem("s3://bucket/run", options)[0]).__name__ == "S3FileSystem"
    with pytest.raises(CheckpointError, match=r"cannot honour the storage options \['requester_pays'\]"):
        fsspec_storage.filesystem("s3://bucket/run", {**options, "client": "obstore"})
    nested = {"client_kwargs": {"verify": False}}
    assert type(fsspec_storage.filesystem("s3://bucket/run", nested)[0]).__name__ == "S3FileSystem"


def test_a_process_forked_after_obstore_started_gets_s3fs():
    """obstore's runtime does not survive fork: the child would hang on its first request."""
    assert type(fsspec_storage.filesystem("s3://bucket/a")[0]).__name__ == "ObstoreS3FileSystem"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            name = type(fsspec_storage.filesystem("s3://bucket/a")[0]).__name__
            try:
                fsspec_storage.filesystem("s3://bucket/a", {"client": "obstore"})
                forced = "allowed"
            except CheckpointError as exc:
                forced = "refused" if "forked" in str(exc) else str(exc)
            os.write(write, f"{name} {forced}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as fh:
        assert fh.read().decode() == "S3FileSystem refused"
