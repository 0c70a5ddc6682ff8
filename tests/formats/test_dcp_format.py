"""DCP folders as bytes: a box read costs only its bytes, and hostile or broken files are refused
(naming the file and the problem) without running any of their code."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ckptio import Booster
from ckptio.engine import reader as reader_module
from ckptio.engine.reader import TensorFile
from ckptio.engine.tensors import Region
from ckptio.errors import CheckpointCorruptError, CheckpointFormatError, UnsafeCheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class _RunsCode:
    """Unpickling it runs a shell command (what a hostile pickle does)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(1000, 64)
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "dcp")
    return tmp_path / "dcp", model


def _metadata(folder):
    with open(folder / ".metadata", "rb") as fh:
        return pickle.load(fh)  # noqa: S301 (the test's own, trusted file)


def _write_metadata(folder, md) -> None:
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump(md, fh)


def _storage(md, fqn):
    return next(info for index, info in md.storage_data.items() if index.fqn == fqn)


def test_a_box_reads_only_its_bytes(saved, monkeypatch):
    folder, model = saved
    read = []
    real = reader_module._pread_exact
    monkeypatch.setattr(reader_module, "_pread_exact", lambda fd, v, off, p: (read.append(len(v)), real(fd, v, off, p)))
    with TensorFile(folder / ".metadata") as tf:
        out = torch.empty(10, 1000)
        tf.read_box("weight", Region((20, 0), (10, 1000)), out)
        assert torch.equal(out, model.weight.detach()[20:30])
        assert sum(read) == 10 * 1000 * 4  # the rows asked for, nothing else of the data
        read.clear()
        column = torch.empty(64, 1)
        tf.read_box("weight", Region((0, 999), (64, 1)), column)  # short runs: whole rows of the range
        assert torch.equal(column, model.weight.detach()[:, 999:])
        assert sum(read) == 64 * 1000 * 4


def test_hostile_metadata_is_refused_without_running_it(saved, tmp_path):
    folder, model = saved
    marker = tmp_path / "ran"
    for hostile in (_RunsCode(marker), {"planner": [_RunsCode(marker)]}):
        (folder / ".metadata").write_bytes(pickle.dumps(hostile))
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused to unpickle: it references \w+\.system"):
            Booster().load_model(model, folder)
    md = _metadata_of(model, tmp_path)
    md.planner_data["weight"] = _RunsCode(marker)  # inside an otherwise real Metadata
    _write_metadata(folder, md)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        Booster().load_model(model, folder)
    assert not marker.exists()


def _metadata_of(model, tmp_path):
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "clean")
    return _metadata(tmp_path / "clean")


def test_data_file_outside_the_folder_is_refused(saved):
    folder, model = saved
    md = _metadata(folder)
    _storage(md, "weight").relative_path = "../elsewhere.distcp"
    _write_metadata(folder, md)
    with pytest.raises(UnsafeCheckpointError, match="points outside the checkpoint folder"):
        Booster().load_model(model, folder)


def test_chunk_whose_pickle_runs_code_is_refused(saved, tmp_path):
    folder, model = saved
    marker = tmp_path / "ran"
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_RunsCode(marker), protocol=2))
        zf.writestr("archive/data/0", bytes(64 * 1000 * 4))
    md = _metadata(folder)
    info = _storage(md, "weight")
    with open(folder / info.relative_path, "ab") as fh:
        info.offset, info.length = fh.tell(), len(blob.getvalue())
        fh.write(blob.getvalue())
    _write_metadata(folder, md)
    with pytest.raises(UnsafeCheckpointError, match=r"chunk \[0, 0\] of 'weight' in __0_0\.distcp: .*\w+\.system"):
        Booster().load_model(model, folder)
    assert not marker.exists()


def test_truncated_or_garbled_files_are_refused(saved):
    folder, model = saved
    data = folder / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-5000])
    with pytest.raises(CheckpointCorruptError, match=r"__0_0\.distcp.*not a readable torch.save archive"):
        Booster().load_model(model, folder)
    (folder / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointFormatError, match=r"\.metadata: not a valid DCP \.metadata pickle"):
        Booster().load_model(model, folder)


def test_safetensors_data_files_are_refused_with_the_reason(tmp_path):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    model = nn.Linear(4, 3)
    writer = FileSystemWriter(tmp_path / "dcp", serialization_format=SerializationFormat.SAFETENSORS)
    dcp.save(model.state_dict(), storage_writer=writer)
    with pytest.raises(CheckpointFormatError, match="serialization_format=SAFETENSORS"):
        Booster().load_model(nn.Linear(4, 3), tmp_path / "dcp")
