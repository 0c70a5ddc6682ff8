"""Object-store clients side by side: s3fs against obstore (a Rust-backed client) through its own
fsspec adapter and through ckptio's filesystem over it (``ckptio.storage.s3_client``, what
ckptio uses for s3:// when obstore is installed), on the same S3 server, in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/stores.py --mib 64 --repeats 5

The server is moto's, started on 127.0.0.1 (no real store is reachable from here), so the
figures say how much each client costs on top of one and the same server, not what S3 gives.
The operations are the ones a checkpoint makes: uploading a shard in 8 MiB writes, downloading
it whole, and reading 64 scattered byte ranges of it (a rank reading its boxes).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid

CHUNK = 8 * 1024 * 1024


def _clients(endpoint: str, bucket: str):
    import s3fs

    try:
        from obstore.fsspec import FsspecStore
    except ImportError:
        sys.exit("obstore is not installed: .venv/bin/python -m pip install obstore")

    s3 = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
    obs = FsspecStore(
        "s3",
        config={
            "aws_endpoint": endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "aws_region": "us-east-1",
        },
        client_options={"allow_http": True},
    )
    from ckptio.storage.s3_client import ObstoreS3FileSystem

    config = {"endpoint": endpoint, "access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}
    ours = ObstoreS3FileSystem(config=config, client_options={"allow_http": True})
    return {"s3fs": s3, "obstore": obs, "ckptio": ours}


def _upload(fs, path: str, data: bytes) -> None:
    view = memoryview(data)  # ckptio hands the store views of its buffers (ckptio's client copies them)
    with fs.open(path, "wb") as fh:
        for start in range(0, len(data), CHUNK):
            fh.write(view[start : start + CHUNK])


def _download(fs, path: str) -> int:
    return len(fs.cat_file(path))


def _ranges(fs, path: str, size: int, count: int = 64) -> int:
    rng = random.Random(0)
    total = 0
    for _ in range(count):
        start = rng.randrange(0, size - 65536)
        total += len(fs.cat_file(path, start=start, end=start + 65536))
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        clients = _clients(endpoint, bucket)
        data = os.urandom(args.mib * 1024 * 1024)
        samples: dict[str, list[float]] = {}
        for repeat in range(args.repeats):
            names = list(clients) if repeat % 2 == 0 else list(reversed(clients))
            for name in names:
                fs = clients[name]
                path = f"{bucket}/{name}-{repeat}.bin"
                for op, fn in (
                    ("upload", lambda fs=fs, path=path: _upload(fs, path, data)),
                    ("download", lambda fs=fs, path=path: _download(fs, path)),
                    ("64 ranges of 64 KiB", lambda fs=fs, path=path: _ranges(fs, path, len(data))),
                ):
                    start = time.perf_counter()
                    fn()
                    samples.setdefault(f"{op} | {name}", []).append(time.perf_counter() - start)
    finally:
        server.stop()
    print(f"{args.mib} MiB object, median of {args.repeats}, moto on 127.0.0.1")
    print(f"{'operation':<22} {'client':<8} {'median s':>9} {'/ s3fs':>7}")
    for key in sorted(samples):
        op, client = key.split(" | ")
        median = statistics.median(samples[key])
        ref = statistics.median(samples[f"{op} | s3fs"])
        print(f"{op:<22} {client:<8} {median:>9.3f} {median / ref:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
