"""The engine protocol: what the engine process and the program that runs it (the Slicer panel) agree on.

An engine run (``medsegai segment|train|... --progress json``) writes one progress line per step on
stdout, a JSON object ``{"stage": ..., "done": ..., "total": ..., "message": ...}`` (see
:func:`encode_progress`), and at most one ``error: ...`` line on stderr; it exits with one of the
``EXIT_*`` codes. Both sides take the stage names, their share of a run (for one progress bar
and its time left) and the exit codes from here, so a renamed stage fails the engine's own
tests (:func:`encode_progress` refuses a stage it does not know) instead of freezing a progress
bar in Slicer.
"""

from __future__ import annotations

import json
from typing import Final

__all__ = [
    "ERROR_PREFIX",
    "EXIT_CANCELLED",
    "EXIT_CODES",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "SEGMENTATION_STAGE_WEIGHTS",
    "STAGES",
    "TRAINING_STAGE_WEIGHTS",
    "encode_error",
    "encode_progress",
    "parse_error_line",
    "parse_progress_line",
]

# Exit codes of every engine command.
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1  # unexpected failure (a bug); traceback only with --debug
EXIT_USAGE: Final = 2  # bad usage or bad input; one "error:" line says what to do
EXIT_CANCELLED: Final = 130  # Ctrl-C, SIGTERM or the panel's Cancel; no output was written
EXIT_CODES: Final = (EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CANCELLED)

# Stages, in run order within each command.
READ, PREPROCESS, MODEL, STITCH, POSTPROCESS, WRITE = "read", "preprocess", "model", "stitch", "postprocess", "write"
TRAIN, EXPORT, EVALUATE, IMPORT = "train", "export", "evaluate", "import"
STAGES: Final = (READ, PREPROCESS, MODEL, STITCH, POSTPROCESS, WRITE, TRAIN, EXPORT, EVALUATE, IMPORT)

# Share of a whole ``segment`` run each stage takes (one progress bar and its ETA), in run order.
SEGMENTATION_STAGE_WEIGHTS: Final[dict[str, float]] = {
    READ: 0.04,
    PREPROCESS: 0.06,
    MODEL: 0.75,
    STITCH: 0.04,
    POSTPROCESS: 0.07,
    WRITE: 0.04,
}
# The same for ``train`` (fine-tuning).
TRAINING_STAGE_WEIGHTS: Final[dict[str, float]] = {PREPROCESS: 0.08, TRAIN: 0.88, EXPORT: 0.04}

ERROR_PREFIX: Final = "error:"


def encode_progress(stage: str, done: int, total: int, message: str = "") -> str:
    """One progress line (no newline) for ``stage``: ``done`` of ``total`` steps (0 = unknown).

    Raises:
        ValueError: ``stage`` is not one of :data:`STAGES`.
    """
    if stage not in STAGES:
        raise ValueError(f"progress stage {stage!r} is not one of the protocol's stages {STAGES}")
    return json.dumps({"stage": stage, "done": int(done), "total": int(total), "message": str(message)})


def parse_progress_line(line: str) -> tuple[str, int, int, str] | None:
    """``(stage, done, total, message)`` of one line :func:`encode_progress` wrote, or None for other text."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or "stage" not in record:
        return None
    try:
        return (str(record["stage"]), int(record.get("done", 0) or 0), int(record.get("total", 0) or 0),
                str(record.get("message", "") or ""))
    except (TypeError, ValueError):
        return None


def encode_error(message: str) -> str:
    """The one ``error: ...`` line (no newline) an engine command writes on stderr before a non-zero exit."""
    return f"{ERROR_PREFIX} {message}"


def parse_error_line(line: str) -> str | None:
    """The message of an ``error: ...`` line (any case of the prefix), or None for other text."""
    stripped = line.strip()
    if not stripped.lower().startswith(ERROR_PREFIX):
        return None
    return stripped[len(ERROR_PREFIX):].strip()
