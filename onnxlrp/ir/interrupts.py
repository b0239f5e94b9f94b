"""Ctrl-C and SIGTERM at any moment: stop what the run started, remove the temporary files being written, print one
line, exit.

Only `os` and `signal` are imported here, so that the command installs the handlers before its heavy imports.
"""
from __future__ import annotations

import os
import secrets
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_temporary: set[str] = set()
_cleanups: list[Callable[[], object]] = []


def install() -> None:
    """Handle SIGINT and SIGTERM by removing the registered temporary files and exiting with 128 + signal."""
    for number in SIGNALS:
        signal.signal(number, _on_signal)


def _on_signal(number: int, frame: object) -> None:
    for cleanup in reversed(_cleanups):
        try:
            cleanup()
        except Exception:  # exiting anyway: a cleanup that fails must not keep the files or the exit back
            pass
    for path in list(_temporary):
        try:
            os.unlink(path)
        except OSError:
            pass
    os.write(2, b"onnxlrp: error: interrupted\n")
    os._exit(128 + number)


@contextmanager
def temporary_files(folder: Path, count: int) -> Iterator[list[Path]]:
    """`count` new empty files in `folder` with short names (whatever the output's name length), created with
    the user's umask, registered for removal on a signal, and removed on leaving unless moved away."""
    paths: list[Path] = []
    try:
        for _ in range(count):
            path = folder / f".onnxlrp-{secrets.token_hex(6)}.tmp"
            _temporary.add(str(path))  # registered before it exists: a signal in between finds nothing to remove
            paths.append(path)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield paths
    finally:
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass
            _temporary.discard(str(path))


@contextmanager
def stopped_with(cleanup: Callable[[], object]) -> Iterator[None]:
    """Run `cleanup` (stopping the processes a run started, say) if a signal ends the command inside the block."""
    _cleanups.append(cleanup)
    try:
        yield
    finally:
        _cleanups.remove(cleanup)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (they are delivered afterwards): for moves that must all happen or none."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
