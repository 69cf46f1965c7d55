"""``--precision auto|fp32|int8``: which ONNX file of a model folder the engine runs.

A model folder may carry an int8 ONNX file beside its float one (``files.onnx_int8``, written by
``medsegai quantize``) with its validation record in ``model.json`` ``metrics.int8``: the Dice of
the int8 model against the float model's, per label, on real cases, and whether it stayed within
the allowed drop. The engine uses that file only when the record says it passed and the record's
checksums still match both files (a re-exported float model makes an old int8 file invalid).

* ``fp32``: always the float model (``model.onnx``, ``model.keras`` ...).
* ``int8``: the validated int8 file, with ONNX Runtime on the CPU; an error when there is none.
* ``auto``: int8 when :data:`AUTO_PICKS_INT8`, the folder carries a validated int8 file whose
  network ran at least :data:`AUTO_MIN_SPEEDUP` times faster than fp32 when it was validated
  (``metrics.int8.speedup``; int8 is not faster for every network on every CPU), the backend is
  ``auto`` or ``onnx`` and the run is on the CPU; else fp32.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from ..core.errors import MedSegAIInputError

__all__ = ["AUTO_MIN_SPEEDUP", "AUTO_PICKS_INT8", "INT8_FILE", "PRECISIONS", "file_sha256", "int8_record", "int8_weights", "resolve_int8"]

PRECISIONS = ("auto", "fp32", "int8")
INT8_FILE = "model.int8.onnx"
# Measured on the 2-core AVX2 CPU of benchmarks/RESULTS.md section 10: the validated int8 network
# runs about 2x faster than fp32 with the Dice within 0.01 per label, so ``auto`` takes it.
AUTO_PICKS_INT8 = True
AUTO_MIN_SPEEDUP = 1.2


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def int8_record(card: Any) -> dict[str, Any] | None:
    """The card's ``metrics.int8`` validation record, or None."""
    metrics = card.raw.get("metrics") if isinstance(card.raw, dict) else None
    record = metrics.get("int8") if isinstance(metrics, dict) else None
    return record if isinstance(record, dict) else None


def int8_weights(card: Any) -> tuple[Path | None, str]:
    """``(path, "")`` of the folder's validated int8 ONNX file, or ``(None, why not)``."""
    path = card.weights_path("onnx_int8")
    if path is None:
        return None, f"model '{card.id}' has no int8 file ({INT8_FILE})"
    record = int8_record(card)
    if record is None or record.get("passed") is not True:
        return None, f"the int8 file of model '{card.id}' has no passed validation in model.json (metrics.int8)"
    if record.get("sha256") != file_sha256(path):
        return None, f"{path.name} of model '{card.id}' is not the file that was validated (checksum differs)"
    float_path = card.weights_path("onnx")
    if float_path is None or record.get("float_sha256") != file_sha256(float_path):
        return None, f"the int8 file of model '{card.id}' was validated against another model.onnx (checksum differs)"
    return path, ""


def resolve_int8(card: Any, precision: str, backend: str, device: str) -> Path | None:
    """The int8 file to run for these choices, or None for the float model.

    Raises:
        MedSegAIInputError: unknown precision; ``int8`` asked with another backend, on the GPU, or
            for a folder without a validated int8 file.
    """
    if precision not in PRECISIONS:
        raise MedSegAIInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if precision == "fp32":
        return None
    if precision == "int8":
        if backend not in ("auto", "onnx"):
            raise MedSegAIInputError(f"--precision int8 runs with ONNX Runtime; use --backend onnx or auto, not {backend}.")
        if device == "gpu":
            raise MedSegAIInputError("--precision int8 runs on the CPU; use --device cpu or auto, or --precision fp32.")
        if importlib.util.find_spec("onnxruntime") is None:
            raise MedSegAIInputError("--precision int8 needs the Python package 'onnxruntime'; install it or use --precision fp32.")
        path, why = int8_weights(card)
        if path is None:
            raise MedSegAIInputError(
                f"--precision int8: {why}; run `medsegai quantize {card.id} --data DATASET` or use --precision fp32."
            )
        return path
    if not AUTO_PICKS_INT8 or backend not in ("auto", "onnx") or device == "gpu":
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    path, _ = int8_weights(card)
    speedup = (int8_record(card) or {}).get("speedup")
    if path is None or not isinstance(speedup, (int, float)) or speedup < AUTO_MIN_SPEEDUP:
        return None
    if device == "auto":
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return None  # the float model on the GPU
    return path
