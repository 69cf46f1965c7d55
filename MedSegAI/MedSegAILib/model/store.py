"""The model store: importing model folders (or a .zip of one) and installing new versions.

Models live in the user store (``~/.medsegai/models``, see :func:`MedSegAILib.model.modelcard.user_models_dir`)
as ``<id>-<version>`` folders. Nothing in an imported folder is executed or imported; only
``model.json`` is parsed (weights are loaded later with Keras ``safe_mode``). Copies are staged in a
hidden folder of the store and renamed into place, so a half-copied model is never listed, and an
installed version is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..core.errors import ModelFolderError

__all__ = ["import_model", "install_model_folder", "installed_versions_of"]

_MAX_ZIP_BYTES = 8 * 1024**3
_MAX_ZIP_FILES = 10000


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract regular files only; refuse absolute paths, ``..``, links and zip bombs."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            if len(members) > _MAX_ZIP_FILES:
                raise ModelFolderError(f"{archive.name} holds {len(members)} entries; a model archive holds a few files.")
            total = 0
            for info in members:
                name = info.filename.replace("\\", "/")
                parts = [p for p in name.split("/") if p not in ("", ".")]
                if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise ModelFolderError(f"{archive.name} contains an unsafe path ({info.filename}); use a plain zip of the model folder.")
                mode = (info.external_attr >> 16) & 0o170000
                if mode and mode not in (stat.S_IFREG, stat.S_IFDIR):
                    raise ModelFolderError(f"{archive.name} contains a link or special file ({info.filename}); zip plain files only.")
                total += info.file_size
                if total > _MAX_ZIP_BYTES:
                    raise ModelFolderError(f"{archive.name} expands to more than {_MAX_ZIP_BYTES // 1024**3} GB; it is not a model archive.")
            for info in members:
                parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]
                if info.is_dir() or not parts:
                    continue
                destination = target.joinpath(*parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as source, open(destination, "xb") as sink:
                    shutil.copyfileobj(source, sink)
    except zipfile.BadZipFile as e:
        raise ModelFolderError(f"{archive.name} is not a readable zip archive ({e}); select a model folder or its .zip.") from e


def _find_model_root(folder: Path) -> Path:
    if (folder / "model.json").is_file():
        return folder
    candidates = [p for p in folder.iterdir() if p.is_dir() and (p / "model.json").is_file()]
    if len(candidates) == 1:
        return candidates[0]
    raise ModelFolderError("The archive does not contain one model folder with a model.json; zip the model folder itself.")


def _copy_regular_files(source: Path, target: Path) -> None:
    """Copy a model folder tree (regular files only; links are refused)."""
    target.mkdir(parents=True)
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_symlink():
            raise ModelFolderError(f"The model folder contains a link ({relative}); copy the real files into it.")
        if path.is_dir():
            (target / relative).mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)


def installed_versions_of(store_dir: Path, model_id: str) -> dict[str, Path]:
    """``{version: folder}`` of the installed versions of ``model_id`` in ``store_dir``."""
    versions: dict[str, Path] = {}
    if not store_dir.is_dir():
        return versions
    for folder in store_dir.iterdir():
        card_path = folder / "model.json"
        if folder.name.startswith(".") or not card_path.is_file():
            continue
        with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
            data = json.loads(card_path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("id") == model_id:
                versions[str(data.get("version"))] = folder
    return versions


def install_model_folder(folder: Path, store_dir: Path) -> Any:
    """Validate ``folder`` (a staging copy inside ``store_dir``) and rename it to ``<id>-<version>``."""
    from .modelcard import ModelCard

    card = ModelCard.from_folder(folder)
    existing = installed_versions_of(store_dir, card.id)
    destination = store_dir / f"{card.id}-{card.version}"
    if card.version in existing or destination.exists():
        where = existing.get(card.version, destination)
        raise ModelFolderError(
            f"Model {card.id} version {card.version} is already installed in {where}; "
            "give the new model another version (the installed one is kept unchanged)."
        )
    os.replace(folder, destination)
    return ModelCard.from_folder(destination)


def import_model(folder_or_zip: str | os.PathLike[str], store_dir: str | os.PathLike[str] | None = None) -> Any:
    """Validate a model folder (or a .zip of one) and copy it into the model store.

    Nothing in the folder is executed or imported; only ``model.json`` is parsed (the weights are
    loaded later with Keras ``safe_mode``). The copy is staged in a hidden folder of the store and
    renamed into place as ``<id>-<version>``; an installed version is never overwritten.

    Args:
        folder_or_zip: a model folder, or a ``.zip`` holding one (at its root or in one sub-folder).
        store_dir: the model store (default: the user store, ``~/.medsegai/models``).

    Returns:
        The installed model's ModelCard.

    Raises:
        ModelFolderError: missing path, unsafe/invalid archive, invalid model, or version installed.
    """
    from .modelcard import user_models_dir

    if not folder_or_zip or not str(folder_or_zip).strip():
        raise ModelFolderError("No model folder or .zip is selected; choose one to import.")
    source = Path(folder_or_zip).expanduser()
    if not source.exists():
        raise ModelFolderError(f"{source} does not exist; select a model folder or a .zip of one.")
    store = Path(store_dir).expanduser() if store_dir else user_models_dir()
    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=store))
    try:
        if source.is_dir():
            from .modelcard import ModelCard

            ModelCard.from_folder(source)  # validate before copying anything large
            _copy_regular_files(source, staging / "model")
            model_root = staging / "model"
        elif zipfile.is_zipfile(source):
            _safe_extract(source, staging / "unpacked")
            model_root = _find_model_root(staging / "unpacked")
        else:
            raise ModelFolderError(f"{source.name} is neither a folder nor a .zip archive; select a model folder or its .zip.")
        return install_model_folder(model_root, store)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
