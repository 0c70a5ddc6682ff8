"""The fast local writer: exact bytes and checksum whatever the chunking, partial writes included."""

from __future__ import annotations

import os

import pytest
import xxhash

from ckptio.storage import local


@pytest.mark.parametrize("short_writes", [False, True])
def test_writer_bytes_and_checksum(tmp_path, monkeypatch, short_writes):
    monkeypatch.setattr(local, "_PIECE", 1000)  # several pieces and early-writeback calls
    monkeypatch.setattr(local, "_SMALL", 64)  # small chunks are gathered into one writev
    if short_writes:  # the kernel may write less than asked: the rest must follow
        real_write, real_writev = os.write, os.writev
        monkeypatch.setattr(local.os, "write", lambda fd, data: real_write(fd, memoryview(data)[:7]))
        monkeypatch.setattr(local.os, "writev", lambda fd, views: real_writev(fd, [memoryview(views[0])[:5]]))
    chunks = [b"h" * 8, b"", bytes(range(256)) * 20, b"a", b"bc" * 10, memoryview(b"xyz" * 900), b"tail"]
    record = local.LocalFileWriter(tmp_path).write("sub/f.bin", chunks)
    expected = b"".join(bytes(c) for c in chunks)
    assert (tmp_path / "sub" / "f.bin").read_bytes() == expected
    assert record.size == len(expected)
    assert record.checksum == xxhash.xxh3_128(expected).hexdigest()
