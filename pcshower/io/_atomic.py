"""Atomic file writes: write beside the target under a hidden temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from pathlib import Path

__all__ = ["atomic_path", "remove_stale_temporaries", "check_output", "TMP_MARKER"]

#: Temporary files carry this in their name; shard listings skip them.
TMP_MARKER = ".tmp-"


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
# .NAME.tmp-[HOST.]PID-HEX8 (names written before 2026-12 have no host)
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<host>[A-Za-z0-9-]+)\.)?(?P<pid>\d+)-[0-9a-f]{8}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers on this host that have died (killed
    mid-write). Those of live processes, and of other hosts sharing the folder, are kept."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{_glob_escape(path.name)}{TMP_MARKER}*"):
        m = _TMP_NAME.match(tmp.name)
        if m is None or m["name"] != path.name or (m["host"] not in (None, _HOST)):
            continue
        if not _pid_alive(int(m["pid"])):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    ``os.replace`` is atomic on POSIX within one file system, so a reader never sees a half
    written file under the final name: a crash or kill leaves only the hidden temporary, and an
    exception removes it. Temporaries of ``path`` left by dead writers on this host are removed
    first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}{TMP_MARKER}{_HOST}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output(path: str | os.PathLike, *, overwrite: bool = False, option: str = "--out",
                 directory: bool = False) -> Path:
    """Check before any work that ``path`` can be written: a file that is not a directory and
    not an existing file unless ``overwrite``, or (``directory=True``) a folder that is not a
    file; and a writable folder to put it in (the nearest existing one, since missing folders
    are made). Raises ``ValueError`` (usage) or ``PermissionError`` (I/O)."""
    path = Path(path)
    if directory:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{option} {path} exists and is not a directory")
        folder = path
    else:
        if path.is_dir():
            raise ValueError(f"{option} {path} is a directory; name a file")
        if path.exists() and not overwrite:
            raise ValueError(f"{option} {path} exists; pass --overwrite to replace it")
        folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: {folder} is a file, not a folder; choose another "
                         "path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: cannot write in {folder} (permission denied or "
                              "read-only); choose another folder")
    return path
