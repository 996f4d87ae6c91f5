"""bench/speed.py's cache of exported and compiled models: a cached file is reused while the weights and
the source text of the code that wrote it are the same, whatever happened to the files' times, and made
again when either changed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import speed  # noqa: E402
from models import BenchModel  # noqa: E402


@pytest.fixture
def setup(tmp_path, monkeypatch):
    pkg = tmp_path / "src" / "fake_writer"  # the code that "writes" the cached file: a package of two files
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "passes.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    out = tmp_path / "packed" / "m-f16.gguf"
    out.parent.mkdir()
    return BenchModel("m", "130m", 0.0, model, {}), pkg, out


def _make(out: Path, bm: BenchModel) -> None:
    out.write_bytes(b"packed")
    speed._write_stamp(out, speed._stamp(bm, "fake_writer"))


def _age(path: Path, seconds: float) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


def test_reused_until_weights_or_code_change(setup):
    bm, pkg, out = setup
    assert not speed._fresh(out, bm, False, "fake_writer")  # nothing cached yet
    _make(out, bm)
    assert speed._fresh(out, bm, False, "fake_writer")
    assert not speed._fresh(out, bm, True, "fake_writer")  # --rebuild
    # a touch (checkout, stash) that leaves the text as it was: still fresh, though newer than the file
    _age(pkg / "passes.py", 3600)
    assert speed._fresh(out, bm, False, "fake_writer")
    # an edit of any file of the package: made again
    (pkg / "passes.py").write_text("Y = 3\n")
    assert not speed._fresh(out, bm, False, "fake_writer")
    _make(out, bm)
    assert speed._fresh(out, bm, False, "fake_writer")
    # new weights (bench/models.py rewrites them when their recipe changes): made again
    (bm.path / "model.safetensors").write_bytes(b"other weights")
    assert not speed._fresh(out, bm, False, "fake_writer")


def test_a_file_cached_before_stamps_is_judged_by_times(setup):
    bm, pkg, out = setup
    out.write_bytes(b"packed")  # no stamp beside it
    _age(pkg / "passes.py", -3600)
    _age(pkg / "__init__.py", -3600)
    _age(bm.path / "model.safetensors", -3600)
    assert speed._fresh(out, bm, False, "fake_writer")
    assert speed._stamp_path(out).is_file()  # adopted: from now on its stamp decides
    _age(pkg / "passes.py", 7200)
    assert speed._fresh(out, bm, False, "fake_writer")
    # older than its code and without a stamp: made again
    speed._stamp_path(out).unlink()
    assert not speed._fresh(out, bm, False, "fake_writer")
    # a stamp that cannot be read is not trusted
    speed._stamp_path(out).write_text("{not json")
    assert not speed._fresh(out, bm, False, "fake_writer")
