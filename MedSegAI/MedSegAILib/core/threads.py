"""How many threads the engine's compute uses: ``MEDSEGAI_THREADS``, else the usable cores."""

from __future__ import annotations

import os

from .errors import MedSegAIInputError

__all__ = ["thread_count"]


def thread_count() -> int:
    """Threads for ONNX Runtime / TensorFlow intra-op work and parallel post-processing.

    Raises:
        MedSegAIInputError: ``MEDSEGAI_THREADS`` is set but not a whole number.
    """
    value = os.environ.get("MEDSEGAI_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError as e:
            raise MedSegAIInputError(f"MEDSEGAI_THREADS must be a whole number, not {value!r}.") from e
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
