"""Atomic file writes: a reader never sees a half-written file, and a failed write keeps the old one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
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
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # a full disk may only show here; the old file is kept then
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` atomically (``atomic_open``)."""
    with atomic_open(path) as f:
        json.dump(value, f, indent=2)
        f.write("\n")
