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
