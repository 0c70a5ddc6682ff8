"""Which format a file is, from its first bytes: one answer for every reader.

A file's name says what its writer meant; its bytes say what it is. Loaders ask here before
they parse, so a JSON scheduler file handed to a weights loader is called JSON, not "a
safetensors header of 7.9e18 bytes", and a ``.safetensors`` name on a ``torch.save`` file
still reads. Only the head of the file is read (one small ``read``).
"""

from __future__ import annotations

import os
import struct

from ckptio.formats.safetensors_format import MAX_HEADER_BYTES

SAFETENSORS, TORCH, JSON, TEXT, EMPTY, UNKNOWN = "safetensors", "torch", "json", "text", "empty", "unknown"
_HEAD = 4096


def file_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"torch"`` (zip or pickle), ``"json"``, ``"text"``, ``"empty"`` or
    ``"unknown"`` (binary we do not recognise: maybe a damaged file, which its reader reports)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEAD)
        size = os.fstat(fh.fileno()).st_size
    return head_format(head, size)


def head_format(head: bytes, size: int) -> str:
    """:func:`file_format` of a file of ``size`` bytes that starts with ``head``."""
    if size == 0:
        return EMPTY
    if len(head) >= 9:
        # safetensors: a little-endian header length that fits in the file, then a JSON object
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(MAX_HEADER_BYTES, size - 8) and head[8:].lstrip(b" \t\r\n").startswith(b"{"):
            return SAFETENSORS
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return TORCH  # torch.save's zip, or a legacy pickle (protocol 2+)
    stripped = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if b"\0" in head:
        return UNKNOWN
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut by the end of the head
            return UNKNOWN
        text = head[: exc.start].decode("utf-8")
    if stripped[:1] in (b"{", b"["):
        return JSON
    printable = sum(c.isprintable() or c in "\t\r\n" for c in text)
    return TEXT if text and printable >= 0.95 * len(text) else UNKNOWN


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """By the bytes when they are recognised, else by the suffix (a damaged ``.safetensors``
    file is then reported by the safetensors reader, a damaged ``.bin`` by torch's)."""
    found = file_format(path)
    if found in (SAFETENSORS, TORCH):
        return found == SAFETENSORS
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    return suffix not in (".bin", ".pt", ".pth")
