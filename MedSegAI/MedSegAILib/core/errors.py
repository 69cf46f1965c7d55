"""Exceptions shared by the engine, the command line and the Slicer module.

Every error a *user* can cause (bad file, wrong channel count, invalid model folder, ...) is a
:class:`MedSegAIInputError`. The CLI turns it into one ``error: ...`` line and exit code 2; the Slicer
Logic lets it propagate so that ``slicer.util.tryWithErrorDisplay`` shows its message. Anything
else is a bug and gets exit code 1.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MedSegAIError", "MedSegAIInputError", "ModelFolderError", "CancelledError", "optional_import"]


class MedSegAIError(Exception):
    """Base class of every error raised on purpose by MedSegAI."""


class MedSegAIInputError(MedSegAIError, ValueError):
    """The user gave something unusable. The message says what is wrong and what to do."""


class ModelFolderError(MedSegAIInputError):
    """A model folder (``model.json`` and weights) is missing, invalid or unsafe."""


class CancelledError(MedSegAIError):
    """The run was cancelled by the user (progress callback asked to stop)."""


def optional_import(module: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import a package only some commands need, or say in one line what to install.

    Args:
        module: the import name (``"slicerio"``).
        purpose: what needs it, for the message (``"writing a .seg.nrrd segmentation"``).
        package: the pip name, when it differs from ``module``.

    Raises:
        MedSegAIInputError: the package is not installed in this Python.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MedSegAIInputError(
            f"{purpose} needs the Python package {package or module}, which this Python lacks; "
            f"install it with `python -m pip install {package or module}`."
        ) from e
