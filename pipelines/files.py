"""Files that several processes and threads share: the local server's, runners' and endpoints'
records, the executions' state, the definition cache. Written whole, changed under a lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """Write `path` so that a reader sees the old file or the new one, never a part: the text goes
    to a file of this process's and thread's own beside it, which then replaces `path` (a rename
    within a folder is atomic). Concurrent writers each leave a whole file; the last one wins."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Held by one process at a time (an exclusive flock on `path`, made with its folder where
    missing); released when the block ends, also when the process dies in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
