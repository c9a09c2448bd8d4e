"""Atomic file writes (a reader never sees a half-written file, and a failed write keeps the old one), folder
locks (two processes never write into one folder at once) and worker processes that end with their parent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing (``mode`` "w": text, "wb": binary); it replaces
    ``path`` only when the block completes, so readers never see a half-written file and a failed write
    keeps the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes it owner-only; the file gets the usual permissions
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # a full disk may only show here; the old file is kept then
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)


def _file_mode(path: Path) -> int:
    """The permissions ``path`` has, or a new file would get (``0o666`` less the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0o022)  # read it by setting it, then put it back at once
        os.umask(umask)
        return 0o666 & ~umask


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` atomically (``atomic_open``)."""
    with atomic_open(path) as f:
        json.dump(value, f, indent=2)
        f.write("\n")


LOCK_FILE = ".lock"


class FolderBusyError(RuntimeError):
    """Another process holds the lock of a folder this one was about to write into."""


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.lock``, created with the folder) for the block.

    A second process asking for the same folder fails at once with ``FolderBusyError`` naming ``what`` it
    wanted to do, instead of interleaving its appends with the first one's. The operating system releases
    the lock when the holder ends, however it ends (``flock``), so a killed process leaves no stale lock.
    """
    import fcntl  # POSIX; ode-bert runs on Linux and macOS

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise FolderBusyError(
                f"{folder} is in use by another process (PID {holder}): {what} cannot run there at the same "
                "time. Wait for that process to finish (or stop it), then run the same command again"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def die_with_parent() -> None:
    """In a worker process before it starts (``Popen(preexec_fn=...)``, Linux): SIGTERM it when the process
    that started it dies, even by ``kill -9``; a worker in its own session would otherwise work on alone.
    Elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def end_process_groups(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each worker's process group (workers started with ``start_new_session=True``), then wait for
    all of them."""
    processes = list(processes)
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        process.wait()
