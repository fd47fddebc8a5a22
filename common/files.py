"""Files fedlora writes and trusts: atomic writes (a directory, a JSON file), the SHA-256 of a
file, the pickle-format suffixes it refuses, where a run goes by default and fedlora's home directory.

Atomic means a crash never leaves a half-written directory or file under the final name:
everything is written beside it under a hidden temporary name, flushed, then renamed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

# Suffixes of pickle-format weight files (torch.save, pickle). fedlora never writes, ships or
# loads them: a pickle runs code when it is loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_CHUNK = 1 << 20


def pickle_suffix(name: str | Path) -> str | None:
    """The pickle suffix of ``name`` (lower-cased), or None when it is not one."""
    suffix = PurePosixPath(str(name)).suffix.lower()
    return suffix if suffix in PICKLE_SUFFIXES else None


def file_digest(path: str | Path) -> tuple[str, int]:
    """``(sha256 hex, size in bytes)`` of a regular file, read in 1 MiB chunks.

    The file is opened with ``O_NOFOLLOW``: a symlink is refused, never followed.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ValueError(f"{path}: not a regular file")
        digest, size = hashlib.sha256(), 0
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """``with atomic_dir(final) as tmp:`` write into ``tmp``; it becomes ``final`` when the
    block succeeds and is removed when it raises.

    Every file is fsynced before the rename and the directory gets mode 0755. An existing
    ``final`` is replaced (``overwrite=True``) or, with ``overwrite=False``, left alone:
    :class:`FileExistsError`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a flushed temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def default_run_dir() -> Path:
    """Where ``fedlora simulate`` / ``deploy`` put a run given no ``run.dir``: ``./runs/<YYYYmmdd-HHMMSS>``
    (the user's working directory, resolved before Flower starts)."""
    return Path.cwd() / "runs" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def fedlora_home() -> Path:
    """fedlora's own directory on this machine: ``$FEDLORA_HOME``, else ``~/.fedlora``; absolute."""
    return Path(os.environ.get("FEDLORA_HOME") or Path.home() / ".fedlora").expanduser().resolve()


def app_run_dir(run_id: int) -> Path:
    """Where the ServerApp writes a run submitted without ``run.dir`` (a bare ``flwr run``):
    ``<fedlora home>/runs/<YYYYmmdd-HHMMSS>-<Flower run id>``. Absolute, so it does not depend on
    the SuperLink's working directory; the run id is the one ``flwr ls`` / ``flwr log`` show."""
    return fedlora_home() / "runs" / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{int(run_id)}"
