"""``file://`` URLs are local paths: normalised once, at the edge (``location.local_path``)."""

import pytest

from ckptio.errors import CheckpointError
from ckptio.storage.location import is_url, local_path


def test_file_url_is_the_absolute_path():
    assert local_path("file:///abs/path") == "/abs/path"
    assert local_path("FILE:///abs/path") == "/abs/path"
    assert local_path("file://localhost/abs/path") == "/abs/path"
    assert local_path("file:///a%20b/c%23d") == "/a b/c#d"  # RFC 8089: percent-escapes decoded
    assert not is_url("file:///abs/path")


def test_other_paths_and_urls_are_unchanged(tmp_path):
    assert local_path("relative/dir") == "relative/dir"
    assert local_path(tmp_path) == str(tmp_path)
    assert local_path("s3://bucket/key") == "s3://bucket/key"


@pytest.mark.parametrize("url", ["file://otherhost/abs/path", "file://relative/path", "file://"])
def test_file_url_of_another_host_is_refused(url):
    with pytest.raises(CheckpointError, match="file:///"):
        local_path(url)
