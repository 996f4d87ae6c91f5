"""Every output sparsamba writes (a model directory, a GGUF, a latency table) is refused before any work
when it exists without ``overwrite``, and is written to a temporary sibling renamed into place when
complete: a failure leaves nothing behind, and an old output untouched."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SparsambaError


def check_output(out: str | Path, overwrite: bool, file: bool = False) -> Path:
    """Refuse ``out`` when it exists without ``overwrite`` (or, for a ``file``, when it is a folder)."""
    out = Path(out)
    if file and out.is_dir():
        raise SparsambaError(f"{out}: is a directory; give the path of the {out.suffix} file to write")
    if out.exists() and not overwrite:
        raise SparsambaError(f"{out}: already exists; choose another path or pass --overwrite")
    return out


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_file_atomically(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Create file ``out`` by ``write(tmp)`` into a temporary sibling renamed into place when complete.
    An OSError (a missing folder, a full disk) becomes a SparsambaError naming ``out``."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise SparsambaError(f"{out}: cannot write ({e}); check the folder") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it owner-only; an output is meant to be shared
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise SparsambaError(f"{out}: cannot write ({e}); check the folder and free space") from None
        raise
    return out


def write_dir_atomically(out: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create directory ``out`` by ``fill(tmp)`` into a temporary sibling that is renamed into place
    when complete, so a failure never leaves a half-written directory (nor touches an old one)."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = _umask()
    try:
        fill(tmp)
        # mkdtemp (and safetensors) create owner-only files; a model directory is meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
