"""A real S3-compatible server (moto in server mode) on 127.0.0.1, reached through s3fs."""

from __future__ import annotations

import os
import uuid

import pytest

pytest.importorskip("s3fs", reason="s3fs is needed for the S3 tests (pip install -e .[dev])")
pytest.importorskip("boto3", reason="boto3 is needed to create the test bucket")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for the loopback S3 server")


@pytest.fixture(scope="session")
def s3_server():
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket; fsspec's config points every s3:// URL at the loopback server."""
    import boto3
    import fsspec

    bucket = f"ckptio-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_server, "key": "testing", "secret": "testing"})
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    yield f"s3://{bucket}"
    fs.invalidate_cache()


@pytest.fixture(params=["obstore", "s3fs"])
def s3_client(request, monkeypatch):
    """Runs a test once per client: obstore (the default when installed) and s3fs (forced)."""
    if request.param == "obstore":
        pytest.importorskip("obstore", reason="obstore is not installed")
        monkeypatch.delenv("CKPTIO_S3_CLIENT", raising=False)
    else:
        monkeypatch.setenv("CKPTIO_S3_CLIENT", "s3fs")
    return request.param
