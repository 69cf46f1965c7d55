"""Loading a model folder's ``model.keras`` with whatever Keras 3 this Python has.

Imported only when a Keras model is loaded (it imports Keras). ``safe_mode=True`` always: a model
file cannot run code (no ``Lambda`` layers, no pickled functions); MedSegAI's own serialisable
layers (:mod:`MedSegAILib.model.keras_layers`, package ``medsegai``) are registered first.

Slicer 5.8 runs Python 3.9, whose newest Keras is 3.10, while models are usually saved by a newer
Keras, whose configurations carry arguments older Keras rejects (``HeNormal(input_axes=...)``,
``BatchNormalization(renorm=...)``). When the file does not load as it is and the ``model.json``
beside it names the builder and its configuration (``architecture``), the network is rebuilt with
the installed Keras and the weights are read from the same file, layer by layer — what the newer
Keras wrote, without executing anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from ..core.errors import ModelFolderError

__all__ = ["load_keras_model", "register_custom_objects", "saved_with_keras"]

def register_custom_objects() -> None:
    """Register MedSegAI's own Keras layers (:mod:`MedSegAILib.model.keras_layers`, package ``medsegai``).

    A model file holds layers only: losses and metrics (the training package's) are not needed to
    load it uncompiled.
    """
    importlib.import_module(f"{__package__}.keras_layers")


def saved_with_keras(path: str | os.PathLike[str]) -> str | None:
    """The Keras version that wrote a ``.keras`` file (its ``metadata.json``), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            return str(json.loads(archive.read("metadata.json")).get("keras_version")) or None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _architecture(path: Path) -> dict[str, Any] | None:
    card = path.parent / "model.json"
    try:
        architecture = json.loads(card.read_text(encoding="utf-8")).get("architecture")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(architecture, dict) and isinstance(architecture.get("config"), dict):
        return architecture
    return None


def _rebuild(path: Path, architecture: dict[str, Any]) -> Any:
    """The network built from ``architecture`` with this Keras, weights read from ``path``."""
    if importlib.util.find_spec("medsegai_training") is None:
        raise ModelFolderError("the training package (medsegai_training) that builds this network is not installed")
    from medsegai_training.models import build_model

    config = dict(architecture["config"])
    config.setdefault("builder", architecture.get("builder"))
    model = build_model(config)
    model.load_weights(str(path))
    return model


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """Load a ``.keras`` file (or a folder holding ``model.keras``), uncompiled, with ``safe_mode=True``.

    Args:
        path: the ``.keras`` file, or a model folder.

    Returns:
        The ``keras.Model``.

    Raises:
        ModelFolderError: missing, unsafe or unreadable file (the message says which Keras wrote it
            when it is newer than this one and the network could not be rebuilt).
    """
    import keras

    file = Path(path)
    if file.is_dir():
        file = file / "model.keras"
    if not file.is_file():
        raise ModelFolderError(f"Keras model file {file} does not exist; give a model folder or a .keras file.")
    register_custom_objects()
    try:
        return keras.saving.load_model(str(file), safe_mode=True, compile=False)
    except Exception as first:  # keras raises ValueError/TypeError/OSError/KeyError for unsafe or broken files
        error = first
    architecture = _architecture(file)
    if architecture is not None:
        try:
            return _rebuild(file, architecture)
        except Exception as second:  # same variety as above, from building or reading the weights
            error = second
    writer = saved_with_keras(file)
    newer = f" It was saved by Keras {writer}; this Python has Keras {keras.__version__}." if writer and writer != keras.__version__ else ""
    raise ModelFolderError(
        f"refused to load {file}: {error}.{newer} Model files with Lambda layers or other code are not allowed; "
        "re-export the model without them, or use a Python with a Keras at least as new as the one that saved it."
    ) from error
