"""Silence converter chatter (Python prints, logging, warnings and C++ logs on fds 1/2) while keeping it
for error messages."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


class Captured:
    def __init__(self) -> None:
        self.text = ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.text.strip().splitlines()[-lines:])

    def failure(self, what: str, exc: BaseException, limit: int = 400) -> str:
        """One error message for a converter failure: `what: ExcType: first line`, then the last lines the
        converter printed while it was silenced."""
        text = str(exc).strip()
        head = text.splitlines()[0][:limit] if text else type(exc).__name__
        return f"{what}: {type(exc).__name__}: {head}" + (f"\n{self.tail()}" if self.text else "")


@contextlib.contextmanager
def quiet(
    loggers: tuple[str, ...] = ("torch", "onnxscript", "litert_torch", "absl", "root"),
) -> Iterator[Captured]:
    """Redirect fds 1 and 2 to a temp file, raise logger levels and ignore warnings inside the block."""
    captured = Captured()
    levels = {name: logging.getLogger(name if name != "root" else None).level for name in loggers}
    with tempfile.TemporaryFile(mode="w+b") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in loggers:
            logging.getLogger(name if name != "root" else None).setLevel(logging.ERROR)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            for name, level in levels.items():
                logging.getLogger(name if name != "root" else None).setLevel(level)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")
