"""Progress reporting for the command line: a terminal bar, JSON lines, or nothing.

A reporter is a callable ``(stage, done, total, message) -> None``, the progress protocol of the
engine. ``json`` writes one object per line on stdout (:func:`MedSegAILib.protocol.encode_progress`)
for programs such as the Slicer module; ``bar`` draws on stderr with stage and time left.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from .protocol import encode_progress

__all__ = ["ProgressCallback", "make_reporter", "BarReporter", "JsonReporter", "format_duration"]

ProgressCallback = Callable[[str, int, int, str], None]


def format_duration(seconds: float) -> str:
    """``75.2 -> '1:15'``."""
    seconds = max(0, int(round(seconds)))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class JsonReporter:
    """One JSON object per line, flushed at once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        self.stream.write(encode_progress(stage, done, total, message) + "\n")
        self.stream.flush()


class BarReporter:
    """A one-line progress bar with the stage, percentage and estimated time left."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self._stage = ""
        self._stage_start = time.monotonic()
        self._last_draw = 0.0

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if stage != self._stage:
            if self._stage:
                self.stream.write("\n")
            self._stage, self._stage_start = stage, now
        finished = total > 0 and done >= total
        if not finished and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        fraction = min(1.0, done / total) if total > 0 else 0.0
        filled = int(round(self.width * fraction))
        elapsed = now - self._stage_start
        eta = f" ETA {format_duration(elapsed * (1 - fraction) / fraction)}" if 0 < fraction < 1 else ""
        text = f"\r{stage:<11} [{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:3.0f}%{eta} {message}"
        self.stream.write(text[:119].ljust(80))
        if finished:
            self.stream.write("\n")
            self._stage = ""
        self.stream.flush()


def make_reporter(kind: str | None) -> ProgressCallback | None:
    """``bar``, ``json``, ``none``; ``None`` means a bar on a terminal, nothing otherwise."""
    if kind is None:
        kind = "bar" if sys.stderr.isatty() else "none"
    if kind == "bar":
        return BarReporter()
    if kind == "json":
        return JsonReporter()
    if kind == "none":
        return None
    raise ValueError(f"unknown progress kind {kind!r}; expected bar, json or none")
