"""MedSegAI companion training package (TensorFlow/Keras). Imported lazily by the CLI."""

from __future__ import annotations

__version__ = "0.1.0"

