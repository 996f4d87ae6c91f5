"""The one atomic-output helper (sparsamba.outputs): refuse before work, write beside and rename."""

import pytest

from sparsamba.errors import SparsambaError
from sparsamba.outputs import check_output, write_dir_atomically, write_file_atomically


def test_check_output(tmp_path):
    f = tmp_path / "m.gguf"
    assert check_output(f, overwrite=False, file=True) == f
    f.write_text("old")
    with pytest.raises(SparsambaError, match="m.gguf: already exists; choose another path or pass --overwrite"):
        check_output(f, overwrite=False)
    assert check_output(f, overwrite=True) == f
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(SparsambaError, match="is a directory; give the path of the .gguf file to write"):
        check_output(tmp_path / "d.gguf", True, file=True)
    assert check_output(tmp_path / "d.gguf", overwrite=True) == tmp_path / "d.gguf"  # a folder output


def test_a_failed_write_leaves_the_old_output(tmp_path):
    f = tmp_path / "t.json"
    f.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(SparsambaError, match="cannot write .*disk full"):
        write_file_atomically(f, fail)
    with pytest.raises(ZeroDivisionError):
        write_dir_atomically(tmp_path / "d", lambda tmp: 1 / 0)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.json"]

    write_file_atomically(tmp_path / "sub" / "new.txt", lambda tmp: tmp.write_text("new"))
    assert (tmp_path / "sub" / "new.txt").read_text() == "new" and len(list((tmp_path / "sub").iterdir())) == 1
    write_dir_atomically(tmp_path / "d", lambda tmp: (tmp / "a").write_text("1"))
    write_dir_atomically(tmp_path / "d", lambda tmp: (tmp / "b").write_text("2"), overwrite=True)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["b"]


def _killed_mid_write(out, kind: str) -> None:
    """A child process that dies (os._exit, as kill -9 would leave it) in the middle of writing ``out``."""
    import subprocess
    import sys

    code = f"""
import os
from pathlib import Path
from sparsamba.outputs import write_dir_atomically, write_file_atomically
def die(tmp):
    (Path(tmp) / "half" if {kind == "dir"!r} else Path(tmp)).write_bytes(b"x" * 100)
    os._exit(9)
if {kind == "dir"!r}:
    write_dir_atomically({str(out)!r}, die)
else:
    write_file_atomically({str(out)!r}, die)
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_killed_runs_leftovers_are_removed_by_the_next(tmp_path, capsys, kind):
    out = tmp_path / ("pruned" if kind == "dir" else "m.gguf")
    _killed_mid_write(out, kind)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.sparsamba-tmp-")]
    assert len(left) == 1 and not out.exists()
    check_output(out, overwrite=False)  # what prune / compile call first
    assert list(tmp_path.iterdir()) == []
    assert "left by an interrupted run" in capsys.readouterr().err


def test_a_live_runs_temporaries_are_left_alone(tmp_path):
    import os

    mine = tmp_path / f".x.sparsamba-tmp-{os.getpid()}-abc"
    mine.mkdir()
    check_output(tmp_path / "x", overwrite=False)
    assert mine.is_dir()


def test_an_unwritable_folder_fails_before_any_work(tmp_path, monkeypatch):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    # as root every folder is writable, so the refusal is simulated at the one call that decides it
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    with pytest.raises(SparsambaError, match=r"cannot write into .*ro \(permission denied\)"):
        check_output(ro / "deeper" / "out", overwrite=False)
    (tmp_path / "f").write_text("")
    with pytest.raises(SparsambaError, match="is a file and not a folder"):
        check_output(tmp_path / "f" / "sub", overwrite=False)
