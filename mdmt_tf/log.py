"""The library's one logger, "mdmt_tf": progress and notes of training runs, comparisons and
searches go through it (never print). The `mdmt` command shows its records as "[mdmt]
message", INFO on stdout (with the rest of a command's progress) and warnings on stderr;
an application embedding the library configures it as it likes."""
from __future__ import annotations

import logging
import sys

LOG = logging.getLogger("mdmt_tf")


class _Console(logging.StreamHandler):
    """A handler writing records below WARNING to whatever sys.stdout is when they are
    emitted, and the others to sys.stderr (so a test's or a notebook's replacement streams
    receive them)."""

    def __init__(self):
        super().__init__(sys.stderr)
        self._record_level = logging.INFO

    @property
    def stream(self):
        return sys.stdout if self._record_level < logging.WARNING else sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler sets it in __init__; the property picks the stream
        pass

    def emit(self, record):
        self._record_level = record.levelno
        super().emit(record)


def configure_cli_logging(level: int = logging.INFO) -> None:
    """Show the library's records as "[mdmt] message" (once; the `mdmt` command)."""
    if any(isinstance(h, _Console) for h in LOG.handlers):
        return
    handler = _Console()
    handler.setFormatter(logging.Formatter("[mdmt] %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(level)
