"""Training configuration: defaults, validation, loading from JSON/YAML recipes.

A recipe (``training/recipes/*.json``) is a dict with any subset of the keys of
:class:`TrainConfig`; missing keys take the defaults below, unknown keys are refused. Example::

    {"model_id": "mr-brain-tumor", "name": "Brain tumour (MR)", "version": "1.0.0",
     "model": {"builder": "unet_2d", "base_filters": 16, "depth": 4},
     "spatial": {"mode": "2d", "axis": "axial", "patch_size": [128, 128],
                 "target_spacing": [1.5, 1.5, null], "divisible_by": 16},
     "channels": [{"name": "T1post", "modality": "MR",
                   "normalization": {"method": "zscore", "nonzero": true}}],
     "labels": [{"name": "tumor", "value": 1, "source": [1], "color": [0.9, 0.3, 0.2]}],
     "loss": {"name": "dice_ce"}, "epochs": 50, "steps_per_epoch": 100, "batch_size": 8}

Array conventions: ``spatial.patch_size`` is in array order, ``(y, x)`` for 2D and ``(z, y, x)``
for 3D; ``spatial.target_spacing`` is in mm, ``(x, y, z)``, ``null`` keeps the input's spacing —
the same meaning as in ``model.json``.

Normalisation specs are the ``model.json`` dicts (``ct``/``zscore``/``percentile``/``none``) plus
one training-only key, ``"fit": true``: the statistics (``mean``/``std``) are then computed from the
training cases and written into ``model.json`` (the ``fit`` key itself is not).

Labels: each entry maps dataset label values (``source``, default ``[value]``) to the model label
``value``; dataset values that no entry mentions become background. ``labels: null`` keeps the
dataset's own labels (``dataset.json["labels"]``) unchanged.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.inference.preprocessing import NORMALIZATION_METHODS

__all__ = [
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "BUILDERS",
    "SCHEDULES",
    "NORMALIZATION_METHODS",
    "DEFAULT_SPATIAL",
    "default_colour",
]

BUILDERS = ("unet_2d", "unet_3d", "vgg16_unet_2d", "dense_unet_2d")
SCHEDULES = ("warmup_cosine", "step", "plateau", "constant")
STRATEGIES = ("auto", "mirrored", "multiworker", "default")

DEFAULT_SPATIAL_2D: dict[str, Any] = {
    "mode": "2d",
    "axis": "axial",
    "patch_size": [128, 128],
    "target_spacing": [1.5, 1.5, None],
    "divisible_by": 16,
}
DEFAULT_SPATIAL_3D: dict[str, Any] = {
    "mode": "3d",
    "patch_size": [64, 96, 96],
    "target_spacing": [1.5, 1.5, 3.0],
    "divisible_by": 16,
}
DEFAULT_SPATIAL = DEFAULT_SPATIAL_2D

# A colour table for labels that give none (Slicer-like, distinct, readable on grey images).
_PALETTE = (
    (0.87, 0.33, 0.25), (0.30, 0.69, 0.29), (0.22, 0.49, 0.72), (0.98, 0.75, 0.18),
    (0.60, 0.31, 0.64), (0.10, 0.74, 0.80), (0.97, 0.51, 0.75), (0.65, 0.34, 0.16),
    (0.55, 0.84, 0.35), (0.99, 0.55, 0.02), (0.40, 0.40, 0.95), (0.80, 0.80, 0.20),
)


def default_colour(value: int) -> list[float]:
    """A stable display colour (RGB in [0, 1]) for label ``value`` (>= 1)."""
    return list(_PALETTE[(int(value) - 1) % len(_PALETTE)])


def _default_augmentation() -> dict[str, Any]:
    try:
        from . import augment
    except ImportError:
        return {}
    default = getattr(augment, "DEFAULT_AUGMENTATION", {})
    return copy.deepcopy(dict(default))


@dataclass
class TrainConfig:
    """Everything a training run needs besides the dataset and the output folder.

    Attributes:
        model_id: ``model.json`` id of the trained model (lower case, ``[a-z0-9._-]``).
        name: human-readable model name.
        version: model version string (``1.0.0``).
        description: free text for ``model.json``.
        license: licence of the trained weights (state the data's licence too).
        citation: how to cite the training data / model (goes into ``model.json["provenance"]``).
        notice: text of a ``NOTICE`` file written into the model folder (licence/attribution of
            the training data); empty = no file.
        model: builder config passed to ``models.build_model`` (``builder`` plus its options; the
            trainer fills in ``in_channels`` and ``num_classes``).
        spatial: ``mode`` (``2d``/``3d``), ``axis`` (2D slicing axis), ``patch_size`` (array
            order), ``target_spacing`` (mm, x/y/z, ``None`` keeps the input's), ``divisible_by``.
        channels: list of ``{"name", "modality"?, "normalization"}``; ``None`` uses every dataset
            channel with a default normalisation (``ct`` clip [-1000, 1000] for a channel named
            ``CT``, per-image non-zero z-score otherwise).
        labels: list of ``{"name", "value", "source"?, "color"?, "terminology"?}``; ``None`` keeps
            the dataset's labels.
        postprocessing: ``model.json`` post-processing defaults.
        loss: config passed to ``losses.get_loss`` (``{"name": "dice_ce"}`` ...).
        optimizer: AdamW settings: ``learning_rate``, ``weight_decay``, ``clipnorm`` (or None).
        schedule: ``{"name": warmup_cosine|step|plateau|constant, ...}``; warmup_cosine takes
            ``warmup_steps`` (or ``warmup_fraction``) and ``alpha``; step takes ``step_size``
            (steps) and ``gamma``; plateau takes ``factor``, ``patience`` (epochs), ``min_lr``.
        epochs: number of epochs.
        steps_per_epoch: optimizer input batches per epoch.
        max_steps: optional hard cap on the total number of batches (see :meth:`plan`).
        batch_size: global batch size (split across replicas).
        accumulation_steps: gradient accumulation (1 = off).
        mixed_precision: ``"auto"`` (on when a GPU is used), ``True`` or ``False``.
        early_stopping_patience: epochs without validation-Dice improvement before stopping
            (``None``/0 = never).
        augmentation: dict for ``augment.augment_2d/3d`` (``None`` = the package default,
            ``{}`` or ``{"enabled": false}`` = none).
        foreground_fraction: share of samples forced to contain foreground (>= 1/3).
        seed: seed for splits, sampling, augmentation and weight initialisation.
        folds: k of k-fold cross-validation (``None`` = a single validation split).
        fold: which fold (0-based) is the validation fold.
        validation_fraction: share of patients used for validation when ``folds`` is None.
        validation_cases: case ids whose patients (all their cases) form the validation set,
            instead of ``folds``/``validation_fraction``.
        test_cases: case ids held out from training and validation (a held-out test list).
        test_fraction: share of patients held out as the test list (after ``test_cases``).
        validation_max_cases: cap on validation cases evaluated each epoch (None = all).
        cache_dir: folder for the ``.npy`` preprocessing cache (None = in memory only).
        freeze_encoder: with ``--init``, keep the parent's encoder weights fixed.
        keep_parent: with ``--init``, share of the parent's weights blended back into the trained
            weights before export, ``w = keep_parent × w_parent + (1 − keep_parent) × w_trained``
            (weight-space ensembling, "WiSE-FT"): trades some of the gain for less forgetting;
            0 = off.
        num_workers: parallel calls for the ``tf.data`` map (None = AUTOTUNE).
    """

    model_id: str = "custom-model"
    name: str = "Custom segmentation model"
    version: str = "1.0.0"
    description: str = ""
    license: str = ""
    citation: str = ""
    notice: str = ""
    model: dict[str, Any] = field(default_factory=lambda: {"builder": "unet_2d"})
    spatial: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_SPATIAL_2D))
    channels: list[dict[str, Any]] | None = None
    labels: list[dict[str, Any]] | None = None
    postprocessing: dict[str, Any] = field(default_factory=lambda: {"method": "argmax"})
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "dice_ce"})
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"learning_rate": 1e-3, "weight_decay": 1e-4, "clipnorm": None}
    )
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "warmup_cosine", "warmup_fraction": 0.05})
    epochs: int = 50
    steps_per_epoch: int = 100
    max_steps: int | None = None
    batch_size: int = 8
    accumulation_steps: int = 1
    mixed_precision: Any = "auto"
    early_stopping_patience: int | None = 20
    augmentation: dict[str, Any] | None = None
    foreground_fraction: float = 1.0 / 3.0
    seed: int = 0
    folds: int | None = None
    fold: int | None = None
    validation_fraction: float = 0.2
    validation_cases: list[str] = field(default_factory=list)
    test_cases: list[str] = field(default_factory=list)
    test_fraction: float = 0.0
    validation_max_cases: int | None = None
    cache_dir: str | None = None
    freeze_encoder: bool = False
    keep_parent: float = 0.0
    num_workers: int | None = None

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Check every field; raise :class:`MedSegAIInputError` naming the bad key. Returns self."""
        import re

        def bad(key: str, problem: str) -> MedSegAIInputError:
            return MedSegAIInputError(f"training config: '{key}' {problem}; fix the recipe or the command line.")

        if not re.match(r"^[a-z0-9][a-z0-9._-]{1,63}$", str(self.model_id)):
            raise bad("model_id", f"is {self.model_id!r}, it must be 2-64 characters of a-z, 0-9, '.', '_', '-'")
        if not re.match(r"^[0-9]+(\.[0-9]+){0,2}([.-][A-Za-z0-9.]+)?$", str(self.version)):
            raise bad("version", f"is {self.version!r}, use a version such as 1.0.0")
        if not str(self.name).strip():
            raise bad("name", "is empty")
        for key in ("description", "license", "citation", "notice"):
            if not isinstance(getattr(self, key), str):
                raise bad(key, "must be a string")

        if not isinstance(self.model, dict) or self.model.get("builder") not in BUILDERS:
            builder = self.model.get("builder") if isinstance(self.model, dict) else self.model
            raise bad("model.builder", f"is {builder!r}, choose one of {', '.join(BUILDERS)}")
        self._validate_spatial(bad)
        self._validate_channels(bad)
        self._validate_labels(bad)
        if not isinstance(self.postprocessing, dict):
            raise bad("postprocessing", "must be a dict")
        if not isinstance(self.loss, dict):
            raise bad("loss", "must be a dict such as {'name': 'dice_ce'}")
        self._validate_optimizer(bad)

        for key in ("epochs", "steps_per_epoch", "batch_size", "accumulation_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, f"is {value!r}, it must be a whole number >= 1")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise bad("max_steps", f"is {self.max_steps!r}, it must be a whole number >= 1 or null")
        if self.mixed_precision not in ("auto", True, False):
            raise bad("mixed_precision", f"is {self.mixed_precision!r}, use 'auto', true or false")
        if self.early_stopping_patience is not None and (
            not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 0
        ):
            raise bad("early_stopping_patience", f"is {self.early_stopping_patience!r}, use a whole number >= 0")
        if self.augmentation is not None and not isinstance(self.augmentation, dict):
            raise bad("augmentation", "must be a dict or null")
        try:
            fraction = float(self.foreground_fraction)
        except (TypeError, ValueError) as e:
            raise bad("foreground_fraction", f"is {self.foreground_fraction!r}, not a number") from e
        if not (1.0 / 3.0 - 1e-9 <= fraction <= 1.0):
            raise bad("foreground_fraction", f"is {fraction}, it must be between 1/3 and 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise bad("seed", f"is {self.seed!r}, it must be a whole number")
        if self.folds is not None:
            if not isinstance(self.folds, int) or self.folds < 2:
                raise bad("folds", f"is {self.folds!r}, use 2 or more (or null for a single split)")
            if self.fold is None:
                self.fold = 0
            if not isinstance(self.fold, int) or not 0 <= self.fold < self.folds:
                raise bad("fold", f"is {self.fold!r}, it must be between 0 and {self.folds - 1}")
        elif self.fold is not None:
            raise bad("fold", "is set but 'folds' is not; give both (e.g. --folds 5 --fold 0)")
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise bad("validation_fraction", f"is {self.validation_fraction!r}, it must be in [0, 1)")
        if not 0.0 <= float(self.test_fraction) < 1.0:
            raise bad("test_fraction", f"is {self.test_fraction!r}, it must be in [0, 1)")
        for key in ("test_cases", "validation_cases"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise bad(key, "must be a list of case ids")
        if self.validation_cases and self.folds is not None:
            raise bad("validation_cases", "cannot be combined with folds; use one or the other")
        if self.validation_max_cases is not None and (
            not isinstance(self.validation_max_cases, int) or self.validation_max_cases < 1
        ):
            raise bad("validation_max_cases", f"is {self.validation_max_cases!r}, use a whole number >= 1 or null")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 1):
            raise bad("num_workers", f"is {self.num_workers!r}, use a whole number >= 1 or null")
        if isinstance(self.keep_parent, bool) or not isinstance(self.keep_parent, (int, float)) or not (
                0.0 <= float(self.keep_parent) < 1.0):
            raise bad("keep_parent", f"is {self.keep_parent!r}, it must be a number in [0, 1)")
        self.keep_parent = float(self.keep_parent)
        return self

    def _validate_spatial(self, bad: Any) -> None:
        spatial = self.spatial
        if not isinstance(spatial, dict):
            raise bad("spatial", "must be a dict")
        mode = spatial.get("mode")
        if mode not in ("2d", "3d"):
            raise bad("spatial.mode", f"is {mode!r}, use '2d' or '3d'")
        builder = self.model.get("builder", "")
        if builder.endswith("_3d") != (mode == "3d"):
            raise bad("model.builder", f"is {builder!r} but spatial.mode is {mode!r}; use a matching builder")
        defaults = DEFAULT_SPATIAL_2D if mode == "2d" else DEFAULT_SPATIAL_3D
        for key, value in defaults.items():
            spatial.setdefault(key, copy.deepcopy(value))
        unknown = set(spatial) - {"mode", "axis", "patch_size", "target_spacing", "divisible_by", "batch_size"}
        if unknown:
            raise bad("spatial", f"has unknown keys {sorted(unknown)}")
        if mode == "2d" and spatial.get("axis") not in ("axial", "coronal", "sagittal"):
            raise bad("spatial.axis", f"is {spatial.get('axis')!r}, use axial, coronal or sagittal")
        if mode == "3d":
            spatial.pop("axis", None)
        patch = spatial.get("patch_size")
        dims = 2 if mode == "2d" else 3
        if (
            not isinstance(patch, (list, tuple))
            or len(patch) != dims
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch)
        ):
            raise bad("spatial.patch_size", f"is {patch!r}, give {dims} whole numbers (array order)")
        divisible = spatial.get("divisible_by")
        if not isinstance(divisible, int) or divisible < 1:
            raise bad("spatial.divisible_by", f"is {divisible!r}, use a whole number >= 1")
        if any(p % divisible for p in patch):
            raise bad("spatial.patch_size", f"is {list(patch)}, every size must be divisible by {divisible}")
        spatial["patch_size"] = [int(p) for p in patch]
        spacing = spatial.get("target_spacing")
        if spacing is None:
            spatial["target_spacing"] = [None, None, None]
        elif not isinstance(spacing, (list, tuple)) or len(spacing) != 3 or not all(
            s is None or (isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0) for s in spacing
        ):
            raise bad("spatial.target_spacing", f"is {spacing!r}, give 3 positive numbers or null in (x, y, z) mm")
        else:
            spatial["target_spacing"] = [None if s is None else float(s) for s in spacing]

    def _validate_channels(self, bad: Any) -> None:
        if self.channels is None:
            return
        if not isinstance(self.channels, list) or not self.channels:
            raise bad("channels", "must be a non-empty list of {'name', 'normalization'} or null")
        names = []
        for i, channel in enumerate(self.channels):
            if isinstance(channel, str):
                channel = {"name": channel}
                self.channels[i] = channel
            if not isinstance(channel, dict) or not str(channel.get("name", "")).strip():
                raise bad(f"channels[{i}]", "needs a 'name'")
            unknown = set(channel) - {"name", "modality", "description", "normalization"}
            if unknown:
                raise bad(f"channels[{i}]", f"has unknown keys {sorted(unknown)}")
            names.append(channel["name"])
            norm = channel.get("normalization")
            if norm is None:
                continue
            if not isinstance(norm, dict) or norm.get("method") not in NORMALIZATION_METHODS:
                raise bad(
                    f"channels[{i}].normalization",
                    f"is {norm!r}, its 'method' must be one of {', '.join(NORMALIZATION_METHODS)}",
                )
            if norm["method"] == "ct":
                clip = norm.get("clip")
                if not isinstance(clip, (list, tuple)) or len(clip) != 2 or not clip[0] < clip[1]:
                    raise bad(f"channels[{i}].normalization.clip", f"is {clip!r}, give [low, high] with low < high")
            if norm.get("fit") and norm["method"] not in ("ct", "zscore"):
                raise bad(f"channels[{i}].normalization.fit", "works only with the 'ct' and 'zscore' methods")
        if len(set(names)) != len(names):
            raise bad("channels", f"names {names} are not unique")

    def _validate_labels(self, bad: Any) -> None:
        if self.labels is None:
            return
        if not isinstance(self.labels, list) or not self.labels:
            raise bad("labels", "must be a non-empty list of {'name', 'value', 'source'} or null")
        values, names, sources = set(), set(), set()
        for i, label in enumerate(self.labels):
            if not isinstance(label, dict) or not str(label.get("name", "")).strip():
                raise bad(f"labels[{i}]", "needs a 'name'")
            unknown = set(label) - {"name", "value", "source", "color", "terminology"}
            if unknown:
                raise bad(f"labels[{i}]", f"has unknown keys {sorted(unknown)}")
            value = label.get("value", i + 1)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
                raise bad(f"labels[{i}].value", f"is {value!r}, use a whole number 1..255")
            label["value"] = value
            if value in values or label["name"] in names:
                raise bad(f"labels[{i}]", f"repeats value {value} or name {label['name']!r}")
            values.add(value)
            names.add(label["name"])
            source = label.get("source", [value])
            if isinstance(source, int) and not isinstance(source, bool):
                source = [source]
            if not isinstance(source, list) or not source or not all(
                isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 65535 for s in source
            ):
                raise bad(f"labels[{i}].source", f"is {source!r}, give dataset label values (list of whole numbers >= 1)")
            if sources & set(source):
                raise bad(f"labels[{i}].source", f"maps dataset value(s) {sorted(sources & set(source))} twice")
            sources |= set(source)
            label["source"] = source
            color = label.get("color")
            if color is not None and (
                not isinstance(color, (list, tuple))
                or len(color) != 3
                or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in color)
            ):
                raise bad(f"labels[{i}].color", f"is {color!r}, give [r, g, b] in 0..1")
        expected = set(range(1, len(self.labels) + 1))
        if values != expected:
            raise bad("labels", f"values {sorted(values)} must be 1..{len(self.labels)} (one network output per label)")

    def _validate_optimizer(self, bad: Any) -> None:
        if not isinstance(self.optimizer, dict):
            raise bad("optimizer", "must be a dict")
        defaults = {"learning_rate": 1e-3, "weight_decay": 1e-4, "clipnorm": None}
        for key, value in defaults.items():
            self.optimizer.setdefault(key, value)
        unknown = set(self.optimizer) - set(defaults) - {"name", "beta_1", "beta_2", "epsilon"}
        if unknown:
            raise bad("optimizer", f"has unknown keys {sorted(unknown)}")
        if self.optimizer.get("name", "adamw").lower() != "adamw":
            raise bad("optimizer.name", f"is {self.optimizer.get('name')!r}; only 'adamw' is supported")
        learning_rate = self.optimizer["learning_rate"]
        if not isinstance(learning_rate, (int, float)) or not 0 < learning_rate < 10:
            raise bad("optimizer.learning_rate", f"is {learning_rate!r}, use a positive number such as 1e-3")
        if not isinstance(self.optimizer["weight_decay"], (int, float)) or self.optimizer["weight_decay"] < 0:
            raise bad("optimizer.weight_decay", f"is {self.optimizer['weight_decay']!r}, use a number >= 0")
        if not isinstance(self.schedule, dict) or self.schedule.get("name") not in SCHEDULES:
            name = self.schedule.get("name") if isinstance(self.schedule, dict) else self.schedule
            raise bad("schedule.name", f"is {name!r}, choose one of {', '.join(SCHEDULES)}")

    # ------------------------------------------------------------------ helpers
    def plan(self) -> tuple[int, int]:
        """``(epochs, steps_per_epoch)`` actually run, honouring ``max_steps``.

        ``max_steps`` is a hard cap: with ``max_steps < epochs * steps_per_epoch`` the run does
        ``max_steps // steps_per_epoch`` full epochs, or one shorter epoch of ``max_steps`` steps
        when ``max_steps < steps_per_epoch``.
        """
        epochs, steps = self.epochs, self.steps_per_epoch
        if self.max_steps is not None and self.max_steps < epochs * steps:
            if self.max_steps < steps:
                return 1, self.max_steps
            return max(1, self.max_steps // steps), steps
        return epochs, steps

    def augmentation_config(self) -> dict[str, Any]:
        """The augmentation dict to use (package default when ``augmentation`` is None)."""
        if self.augmentation is None:
            return _default_augmentation()
        return copy.deepcopy(self.augmentation)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (round-trips through :func:`config_from_dict`)."""
        return json.loads(json.dumps(asdict(self)))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with ``changes`` applied (``None`` values are ignored)."""
        data = self.to_dict()
        data.update({k: v for k, v in changes.items() if v is not None})
        result = config_from_dict(data)
        result.explicit_keys = frozenset(getattr(self, "explicit_keys", data)) | {
            k for k, v in changes.items() if v is not None
        }
        return result


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a recipe dict.

    Raises:
        MedSegAIInputError: unknown keys or invalid values (the message names the key).
    """
    if not isinstance(data, dict):
        raise MedSegAIInputError(f"training config must be a JSON object, got {type(data).__name__}; fix the recipe.")
    known = {f.name for f in fields(TrainConfig)}
    data = copy.deepcopy(data)
    data.pop("$comment", None)
    if "id" in data and "model_id" not in data:
        data["model_id"] = data.pop("id")
    unknown = sorted(set(data) - known)
    if unknown:
        raise MedSegAIInputError(
            f"training config has unknown keys {unknown}; valid keys are {sorted(known)}."
        )
    if isinstance(data.get("model"), dict):
        data["model"] = dict(data["model"])
        if "spatial" not in data and str(data["model"].get("builder", "")).endswith("_3d"):
            data["spatial"] = copy.deepcopy(DEFAULT_SPATIAL_3D)
    config = TrainConfig(**data)
    config.explicit_keys = frozenset(data)
    if config.foreground_fraction is not None:
        config.foreground_fraction = float(config.foreground_fraction)
    if isinstance(config.max_steps, float) and math.isfinite(config.max_steps):
        config.max_steps = int(config.max_steps)
    return config.validate()


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Load a recipe from a ``.json`` (or ``.yaml``/``.yml``, needs PyYAML) file and apply overrides.

    Args:
        path: recipe file, or None for the defaults.
        **overrides: top-level keys to replace (``None`` values are ignored), e.g. ``epochs=3``.

    Raises:
        MedSegAIInputError: the file is missing or unreadable, or the config is invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MedSegAIInputError(f"config file {path} does not exist; give the path of a JSON recipe.")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as e:
                raise MedSegAIInputError(
                    f"config file {path} is YAML but PyYAML is not installed; install pyyaml or use JSON."
                ) from e
            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise MedSegAIInputError(f"config file {path} is not valid YAML ({e}); fix the file.") from e
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise MedSegAIInputError(
                    f"config file {path} is not valid JSON (line {e.lineno}: {e.msg}); fix the file."
                ) from e
    if not isinstance(data, dict):
        raise MedSegAIInputError(f"config file {path} must hold a JSON object of settings; fix the file.")
    explicit = set(data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    result = config_from_dict(data)
    result.explicit_keys = frozenset(explicit | {k for k, v in overrides.items() if v is not None})
    return result
