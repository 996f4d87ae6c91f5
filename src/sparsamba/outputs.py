"""Every output sparsamba writes (a model directory, a GGUF, a latency table) is checked before any
work — it must not exist without ``overwrite``, and its folder must be one we can write into — and is
written to a temporary sibling renamed into place when complete: a failure leaves nothing behind, and
an old output untouched.

Temporary siblings are named ``.NAME.sparsamba-tmp-PID-XXXX`` (``-old-`` for an output being
replaced). A run killed outright (``kill -9``, a power cut) cannot remove its own, so the next run
that writes the same output removes those whose process is gone, and says so."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SparsambaError

_TAG = "sparsamba"


def _prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{_TAG}-{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove the temporaries that killed runs left beside ``out``; the paths removed."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{_TAG}-(tmp|old)-(\d+)-")
    removed = []
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return removed
    for p in siblings:
        m = pattern.match(p.name)
        if not m or _alive(int(m.group(2))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        print(f"sparsamba: removed {p}, left by an interrupted run", file=sys.stderr)
    return removed


def check_output(out: str | Path, overwrite: bool, file: bool = False) -> Path:
    """Refuse ``out`` before any work: when it exists without ``overwrite`` (or, for a ``file``, when
    it is a folder), or when the folder it goes into cannot be made or written."""
    out = Path(out)
    if file and out.is_dir():
        raise SparsambaError(f"{out}: is a directory; give the path of the {out.suffix} file to write")
    if out.exists() and not overwrite:
        raise SparsambaError(f"{out}: already exists; choose another path or pass --overwrite")
    # the nearest existing ancestor decides: a file there, or a folder we cannot write, fails now
    # rather than after a prune of many minutes
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SparsambaError(f"{out}: cannot be created, {parent} is a file and not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SparsambaError(f"{out}: cannot write into {parent} (permission denied); choose another folder")
    sweep_leftovers(out)
    return out


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _cannot_write(out: Path, e: OSError) -> SparsambaError:
    return SparsambaError(f"{out}: cannot write ({e.strerror or e}); check the folder and free space")


def write_file_atomically(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Create file ``out`` by ``write(tmp)`` into a temporary sibling renamed into place when complete.
    An OSError (a missing folder, a full disk) becomes a SparsambaError naming ``out``."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(out)
        fd, tmp_name = tempfile.mkstemp(prefix=_prefix(out, "tmp"), dir=out.parent)
    except OSError as e:
        raise _cannot_write(out, e) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it owner-only; an output is meant to be shared
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(out, e) from None
        raise
    return out


def write_dir_atomically(out: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create directory ``out`` by ``fill(tmp)`` into a temporary sibling that is renamed into place
    when complete, so a failure never leaves a half-written directory (nor touches an old one)."""
    out = check_output(out, overwrite)
    umask = _umask()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))
    except OSError as e:
        raise _cannot_write(out, e) from None
    try:
        fill(tmp)
        # mkdtemp (and safetensors) create owner-only files; a model directory is meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _cannot_write(out, e) from None
        raise
    return out
