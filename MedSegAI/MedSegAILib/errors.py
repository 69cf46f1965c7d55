"""Exceptions shared by the engine, the command line and the Slicer module.

Every error a *user* can cause (bad file, wrong channel count, invalid model folder, ...) is a
:class:`MedSegAIInputError`. The CLI turns it into one ``error: ...`` line and exit code 2; the Slicer
Logic lets it propagate so that ``slicer.util.tryWithErrorDisplay`` shows its message. Anything
else is a bug and gets exit code 1.
"""

from __future__ import annotations

__all__ = ["MedSegAIError", "MedSegAIInputError", "ModelFolderError", "CancelledError"]


class MedSegAIError(Exception):
    """Base class of every error raised on purpose by MedSegAI."""


class MedSegAIInputError(MedSegAIError, ValueError):
    """The user gave something unusable. The message says what is wrong and what to do."""


class ModelFolderError(MedSegAIInputError):
    """A model folder (``model.json`` and weights) is missing, invalid or unsafe."""


class CancelledError(MedSegAIError):
    """The run was cancelled by the user (progress callback asked to stop)."""
