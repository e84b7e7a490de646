"""fetch.py unpacks only the files under an asset's prefix, and refuses members that would land outside the
destination (an absolute path, or .. climbing out), in wheels (zip) and sdists (tar)."""
import io
import tarfile
import zipfile

import pytest

from cli import UsageError
from fetch import _unpack


def make_archive(path, members: dict):
    if path.suffix == ".whl":
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(zipfile.ZipInfo(name), data)  # a ZipInfo keeps the name as given, .. and all
    else:
        with tarfile.open(path, "w:gz") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_unpacks_the_prefix_only(tmp_path, kind):
    archive = make_archive(tmp_path / f"pkg.{kind}", {"pkg/a.txt": b"a", "pkg/sub/b.txt": b"b", "other/c.txt": b"c",
                                                       "pkg/sub/../d.txt": b"d"})
    _unpack(archive, "pkg/", tmp_path / "out")
    got = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes() for p in (tmp_path / "out").rglob("*.txt")}
    assert got == {"a.txt": b"a", "sub/b.txt": b"b", "d.txt": b"d"}


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
@pytest.mark.parametrize("escape", ["../escaped.txt", "sub/../../escaped.txt", "ABS"])
def test_members_outside_the_destination_are_refused(tmp_path, kind, escape):
    outside = tmp_path / "escaped.txt"
    name = "pkg/" + (str(outside) if escape == "ABS" else escape)  # pkg//tmp/.../escaped.txt: absolute once stripped
    archive = make_archive(tmp_path / f"evil.{kind}", {name: b"pwned"})
    with pytest.raises(UsageError, match="would be written outside"):
        _unpack(archive, "pkg/", tmp_path / "data" / "out")
    assert not outside.exists() and not (tmp_path / "data" / "escaped.txt").exists()
