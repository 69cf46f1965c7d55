"""Model folders: ``model.json`` (the model card) beside ``model.keras`` and/or ``model.onnx``.

The card says everything inference needs (channels and their normalisation, labels, spatial mode,
patch, spacing, post-processing) and where the model came from. It is validated against
``schemas/model.schema.json`` plus a few rules JSON Schema cannot express; every problem is reported
in one error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..core.errors import ModelFolderError

__all__ = [
    "DEFAULT_MODEL_ID",
    "ChannelSpec",
    "LabelSpec",
    "SpatialSpec",
    "ModelCard",
    "validate_model_dict",
    "model_search_path",
    "list_models",
    "find_model",
    "builtin_models_dir",
    "user_models_dir",
]

DEFAULT_MODEL_ID = "ct-abdomen-organs"
MODEL_JSON = "model.json"
_SCHEMA_PATH = Path(__file__).with_name("schemas") / "model.schema.json"


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return json.loads(_SCHEMA_PATH.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ChannelSpec:
    """One input channel: its name (e.g. ``CT``, ``T1post``) and intensity normalisation."""

    name: str
    normalization: dict[str, Any]
    modality: str = ""
    description: str = ""


@dataclass(frozen=True)
class LabelSpec:
    """One output label. Network output channel ``value`` is this label; 0 is background."""

    name: str
    value: int
    color: tuple[float, float, float]
    terminology: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"name": self.name, "value": self.value, "color": list(self.color)}
        if self.terminology:
            result["terminology"] = self.terminology
        return result


@dataclass(frozen=True)
class SpatialSpec:
    """How the network sees space.

    Attributes:
        mode: ``"2d"`` (slice-wise) or ``"3d"`` (patches).
        axis: 2D slicing axis in the canonical LPS array (axial = numpy axis 0).
        patch_size: window size in array order, ``(y, x)`` for 2D or ``(z, y, x)`` for 3D.
        target_spacing: mm in ``(x, y, z)`` order; ``None`` keeps the input spacing on that axis.
        divisible_by: network input sizes must be multiples of this (pooling depth).
        batch_size: default number of windows per network call.
    """

    mode: str
    patch_size: tuple[int, ...]
    axis: str = "axial"
    target_spacing: tuple[float | None, float | None, float | None] = (None, None, None)
    divisible_by: int = 1
    batch_size: int = 4


@dataclass
class ModelCard:
    """A validated model folder."""

    folder: Path
    id: str
    name: str
    version: str
    description: str
    channels: list[ChannelSpec]
    labels: list[LabelSpec]
    spatial: SpatialSpec
    postprocessing: dict[str, Any]
    files: dict[str, str]
    raw: dict[str, Any] = field(repr=False)

    @property
    def num_classes(self) -> int:
        """Number of network output channels (background included)."""
        return max(label.value for label in self.labels) + 1

    @property
    def window_size_free(self) -> bool:
        """Whether the network's output inside the image does not depend on how far a window is padded.

        True for a 2D/3D U-Net whose normalisation is batch normalisation or none
        (``architecture.config.norm``): fixed statistics, so a window padded only to the next
        multiple of ``divisible_by`` gives the labels of the card's whole patch (the engine then
        runs the smaller window). Instance or group normalisation computes its statistics over the
        window, padding included, and a card without ``architecture`` says nothing: False.
        """
        architecture = self.raw.get("architecture")
        config = architecture.get("config") if isinstance(architecture, dict) else None
        if not isinstance(config, dict) or "norm" not in config:
            return False
        return config["norm"] in ("batch", "none", None)

    @property
    def channel_names(self) -> list[str]:
        return [channel.name for channel in self.channels]

    @property
    def label_map(self) -> dict[str, int]:
        """``{"background": 0, name: value, ...}``."""
        return {"background": 0, **{label.name: label.value for label in self.labels}}

    def weights_path(self, kind: str) -> Path | None:
        """Path of the ``keras``, ``onnx`` or ``tflite`` file when the card lists it and it exists."""
        name = self.files.get(kind)
        if not name or not isinstance(name, str):
            return None
        path = self.folder / name
        return path if path.is_file() else None

    def summary(self) -> dict[str, Any]:
        """What ``medsegai models`` shows."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "channels": self.channel_names,
            "labels": [label.name for label in self.labels],
            "mode": self.spatial.mode,
            "folder": str(self.folder),
        }

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any], folder: str | Path) -> "ModelCard":
        """Build a card from an already-parsed ``model.json``; raises ``ModelFolderError``."""
        folder = Path(folder)
        problems = validate_model_dict(data)
        if problems:
            raise ModelFolderError(
                f"model folder {folder} has an invalid model.json: " + "; ".join(problems)
                + ". Fix model.json or re-export the model with `medsegai train`."
            )
        spatial = data["spatial"]
        return cls(
            folder=folder,
            id=data["id"],
            name=data["name"],
            version=data["version"],
            description=data.get("description", ""),
            channels=[
                ChannelSpec(
                    name=c["name"],
                    normalization=dict(c["normalization"]),
                    modality=c.get("modality", ""),
                    description=c.get("description", ""),
                )
                for c in data["channels"]
            ],
            labels=[
                LabelSpec(
                    name=lab["name"],
                    value=int(lab["value"]),
                    color=tuple(float(v) for v in lab["color"]),  # type: ignore[arg-type]
                    terminology=lab.get("terminology"),
                )
                for lab in sorted(data["labels"], key=lambda item: item["value"])
            ],
            spatial=SpatialSpec(
                mode=spatial["mode"],
                patch_size=tuple(int(p) for p in spatial["patch_size"]),
                axis=spatial.get("axis", "axial"),
                target_spacing=tuple(spatial.get("target_spacing") or (None, None, None)),  # type: ignore[arg-type]
                divisible_by=int(spatial.get("divisible_by", 1)),
                batch_size=int(spatial.get("batch_size", 4)),
            ),
            postprocessing=dict(data.get("postprocessing", {})),
            files=dict(data["files"]),
            raw=data,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelCard":
        """Read and validate ``folder/model.json``; check the weights it lists exist.

        Raises:
            ModelFolderError: the folder, its ``model.json`` or its weights are unusable.
        """
        folder = Path(folder).expanduser()
        card_path = folder / MODEL_JSON
        if not folder.is_dir():
            raise ModelFolderError(f"model folder {folder} does not exist; run `medsegai models` to list installed models.")
        if not card_path.is_file():
            raise ModelFolderError(f"{folder} is not a model folder: it has no {MODEL_JSON}.")
        try:
            data = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFolderError(f"cannot read {card_path}: {e}. Fix or replace the model folder.") from e
        if not isinstance(data, dict):
            raise ModelFolderError(f"{card_path} must hold a JSON object, not {type(data).__name__}.")
        card = cls.from_dict(data, folder.resolve())
        missing = [
            name for kind, name in card.files.items()
            if isinstance(name, str)
            and not ((card.folder / name / "saved_model.pb").is_file() if kind == "savedmodel" else (card.folder / name).is_file())
        ]
        if missing:
            raise ModelFolderError(
                f"model folder {folder} lists weights that are not there: {', '.join(missing)}. "
                "Copy the complete model folder."
            )
        return card


def validate_model_dict(data: Any) -> list[str]:
    """Every problem of a parsed ``model.json``, as readable strings (empty list = valid)."""
    from .schema_check import iter_problems

    if not isinstance(data, dict):
        return [f"model.json must be a JSON object, not {type(data).__name__}"]
    problems = []
    for problem in sorted(iter_problems(data, _schema()), key=lambda p: [str(part) for part in p.path]):
        where = "/".join(str(part) for part in problem.path) or "(top level)"
        message = problem.message if len(problem.message) < 200 else problem.message[:197] + "..."
        problems.append(f"{where}: {message}")
    if problems:
        return problems
    values = [label["value"] for label in data["labels"]]
    names = [label["name"] for label in data["labels"]]
    if len(set(values)) != len(values):
        problems.append(f"labels: values must be unique, got {values}")
    if sorted(values) != list(range(1, len(values) + 1)):
        problems.append(f"labels: values must be 1..{len(values)} (network output channels), got {sorted(values)}")
    if len(set(names)) != len(names) or "background" in names:
        problems.append("labels: names must be unique and must not be 'background'")
    channel_names = [c["name"] for c in data["channels"]]
    if len(set(channel_names)) != len(channel_names):
        problems.append(f"channels: names must be unique, got {channel_names}")
    spatial = data["spatial"]
    expected = 2 if spatial["mode"] == "2d" else 3
    if len(spatial["patch_size"]) != expected:
        problems.append(f"spatial/patch_size: {spatial['mode']} mode needs {expected} values, got {spatial['patch_size']}")
    divisor = spatial.get("divisible_by", 1)
    if any(p % divisor for p in spatial["patch_size"]):
        problems.append(f"spatial/patch_size: {spatial['patch_size']} must be multiples of divisible_by={divisor}")
    post = data.get("postprocessing", {})
    for key in ("largest_component", "fill_holes"):
        if isinstance(post.get(key), list):
            unknown = sorted(set(post[key]) - set(names))
            if unknown:
                problems.append(f"postprocessing/{key}: unknown labels {unknown}")
    unknown = sorted(set(post.get("thresholds", {})) - set(names))
    if unknown:
        problems.append(f"postprocessing/thresholds: unknown labels {unknown}")
    return problems


def builtin_models_dir() -> Path:
    """``MedSegAI/Resources/Models`` (the models shipped with the extension)."""
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def user_models_dir() -> Path:
    """Where imported and fine-tuned models go (``$MEDSEGAI_USER_MODELS`` or ``~/.medsegai/models``)."""
    return Path(os.environ.get("MEDSEGAI_USER_MODELS", Path.home() / ".medsegai" / "models")).expanduser()


def model_search_path() -> list[Path]:
    """Folders searched for model folders, highest priority first."""
    extra = [Path(p).expanduser() for p in os.environ.get("MEDSEGAI_MODELS", "").split(os.pathsep) if p]
    return [*extra, user_models_dir(), builtin_models_dir()]


def _candidate_folders() -> list[Path]:
    folders = []
    for root in model_search_path():
        if root.is_dir():
            folders.extend(sorted(p for p in root.iterdir() if (p / MODEL_JSON).is_file()))
    return folders


def list_models() -> list[ModelCard]:
    """Every valid installed model (invalid folders are skipped; ``find_model`` reports them)."""
    cards = []
    for folder in _candidate_folders():
        try:
            cards.append(ModelCard.from_folder(folder))
        except ModelFolderError:
            continue
    return cards


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.replace("-", ".").split(".") if part.isdigit())


def find_model(id_or_path: str | Path | None = None) -> ModelCard:
    """Resolve a model id or folder path to a validated card.

    A path (absolute, relative, or containing a separator) is used as is. An id picks the highest
    version among installed models with that id. ``None`` means ``DEFAULT_MODEL_ID``.

    Raises:
        ModelFolderError: nothing matches, or the folder is invalid.
    """
    wanted = str(id_or_path) if id_or_path is not None else DEFAULT_MODEL_ID
    as_path = Path(wanted).expanduser()
    if as_path.is_dir() or os.sep in wanted or wanted.startswith("."):
        return ModelCard.from_folder(as_path)
    matches = []
    for folder in _candidate_folders():
        try:
            data = json.loads((folder / MODEL_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("id") == wanted:
            matches.append((folder, str(data.get("version", "0"))))
    if not matches:
        installed = ", ".join(sorted({card.id for card in list_models()})) or "none"
        raise ModelFolderError(
            f"no installed model has id '{wanted}' (installed: {installed}); "
            "pass a model folder path or run `medsegai models`."
        )
    folder, _ = max(matches, key=lambda item: _version_key(item[1]))
    return ModelCard.from_folder(folder)
