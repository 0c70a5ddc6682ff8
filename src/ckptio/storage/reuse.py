"""Unchanged bytes are linked, not written again.

A training run saves the same frozen tensors at every checkpoint. Every committed checkpoint
folder has a manifest with each file's size and xxh3-128 checksum, so a save can tell, before
it writes a file, that an earlier checkpoint already holds exactly its bytes: it hashes the
bytes it would write (in memory, ~10x faster than writing them) and, when a file of the
same size and checksum is indexed here, hard-links that file into its staging folder instead
(:meth:`ckptio.storage.base.FileWriter.write_or_link`). Files written in place by several
ranks are matched by the fingerprint of their pieces instead (:attr:`FileRecord.pieces`),
since no rank sees the whole file.

Why this is safe:

* a committed file is never changed in place by ckptio (every save writes new files and
  renames), so a link names bytes that stay as they are; the checkpoints that share it each
  hold a name of the same inode, and deleting one (rotation) leaves the data to the others;
* a link is a new directory entry in the staging folder: the commit (fsync of the folder,
  then the rename) makes it durable like any written file, and a crash before the commit
  leaves the earlier checkpoint untouched;
* the link must land on the file that was indexed (same device and inode): a file replaced
  since, deleted, or on another filesystem is written instead.

What it cannot see: bytes that rot on disk after the earlier commit are shared by the new
checkpoint too (``verify`` finds them in both). Editing a checkpoint's files in place by
other means changes every checkpoint that links them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ckptio.errors import CheckpointError
from ckptio.storage.base import Reusable, ReuseIndex
from ckptio.storage.manifest import read_manifest


def index_folders(folders: Iterable[str | os.PathLike]) -> ReuseIndex | None:
    """Every file of the committed checkpoint folders among ``folders`` that is still as its
    manifest says (size on disk), by content; None when there is none. Folders without a
    manifest, or whose manifest cannot be read, are skipped: reuse is an optimisation, never a
    reason for a save to fail."""
    by_checksum: dict[tuple[int, str], Reusable] = {}
    by_pieces: dict[tuple[int, str], Reusable] = {}
    for folder in folders:
        folder = Path(folder)
        try:
            manifest = read_manifest(folder) if folder.is_dir() else None
        except (CheckpointError, OSError):
            continue
        if manifest is None:
            continue
        for name, record in manifest.files.items():
            path = folder / name
            with contextlib.suppress(OSError):
                st = os.lstat(path)  # a symlink is never linked: the copy would point where it points
                if st.st_size != record.size or not stat.S_ISREG(st.st_mode):
                    continue
                found = Reusable(str(path), record.size, record.checksum, record.pieces, (st.st_dev, st.st_ino))
                by_checksum.setdefault((record.size, record.checksum), found)
                if record.pieces is not None:
                    by_pieces.setdefault((record.size, record.pieces), found)
    if not by_checksum:
        return None
    return ReuseIndex(by_checksum, by_pieces, frozenset(size for size, _ in by_checksum))


def link_file(source: Reusable, dest: Path) -> bool:
    """Hard-link ``source`` as ``dest``; False (nothing left at ``dest``) where the link is
    impossible or lands on another file than the one indexed."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(source.path, dest)
    except OSError:
        return False
    try:
        st = os.stat(dest)
        if (st.st_dev, st.st_ino) == source.identity and st.st_size == source.size:
            return True
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dest.unlink()
    return False
