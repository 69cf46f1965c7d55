"""Training data: read dataset cases, preprocess them exactly as the engine does, cache, sample.

Array layouts:

- A preprocessed case holds ``image`` ``(z, y, x, C)`` float32 and ``label`` ``(z, y, x)`` uint8 on
  the *model grid*: the canonical LPS view of the input (``preprocessing.reorient_to_canonical``),
  intensity-normalised per channel (``preprocessing.normalize`` with whole-image statistics) and
  resampled to ``spatial.target_spacing`` (``preprocessing.resample_axis_aligned``; linear for
  images, nearest for labels). The engine's own functions are called — nothing is re-implemented.
- 2D samples are slices ``(py, px, C)`` along ``spatial.axis``; 3D samples are patches
  ``(pz, py, px, C)``. Batches are channels-last, as Keras wants them.

Preprocessed cases are cached in memory for the whole run and, when a cache folder is given, as
``.npy`` files keyed by a hash of the input files and every preprocessing setting, so a resumed
or repeated run does not read and resample the data again.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from MedSegAILib.inference import preprocessing
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.io.imageio import atomic_output
from MedSegAILib.protocol import PREPROCESS

__all__ = [
    "PreprocessedCase",
    "DataPlan",
    "make_data_plan",
    "label_lookup",
    "fit_normalization",
    "preprocess_volumes",
    "preprocess_label",
    "model_target_spacing",
    "load_cases",
    "slicing_view",
    "Sampler",
    "make_train_dataset",
    "predict_case",
    "dice_per_label",
    "validation_dice",
    "PREPROCESSING_VERSION",
]

PREPROCESSING_VERSION = 1
_AXIS_OF = {"axial": 0, "coronal": 1, "sagittal": 2}
_MAX_FOREGROUND_POINTS = 20000


# ----------------------------------------------------------------------------------------------
# What to read and how to turn it into network input
# ----------------------------------------------------------------------------------------------


@dataclass
class DataPlan:
    """Channels, labels and geometry that link a dataset to a model.

    Attributes:
        channel_names: model channel names (a subset/reordering of the dataset's channels).
        channel_indices: index of each model channel in the dataset's channel list.
        channels: ``model.json`` channel dicts (``name``, ``modality``, ``normalization``); the
            normalisation may still carry ``fit: true`` until :func:`fit_normalization` ran.
        labels: ``model.json`` label dicts (``name``, ``value``, ``color``, ``terminology``?).
        lookup: uint8 table, dataset label value -> model label value (0 = background).
        spatial: the config's ``spatial`` dict (mode, axis, patch_size, target_spacing, divisible_by).
    """

    channel_names: list[str]
    channel_indices: list[int]
    channels: list[dict[str, Any]]
    labels: list[dict[str, Any]]
    lookup: np.ndarray
    spatial: dict[str, Any]

    @property
    def num_classes(self) -> int:
        """Network outputs: background + labels."""
        return len(self.labels) + 1

    @property
    def normalizations(self) -> list[dict[str, Any]]:
        """The normalisation dicts in model channel order."""
        return [dict(c["normalization"]) for c in self.channels]

    def fingerprint(self) -> str:
        """Hash of every setting that changes the preprocessed arrays (for the ``.npy`` cache)."""
        payload = {
            "version": PREPROCESSING_VERSION,
            "channels": self.channel_indices,
            "normalization": self.normalizations,
            "lookup": hashlib.sha1(self.lookup.tobytes()).hexdigest(),
            "target_spacing": model_target_spacing(self.spatial),
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _default_normalization(name: str) -> dict[str, Any]:
    if name.strip().upper() == "CT":
        return {"method": "ct", "clip": [-1000.0, 1000.0]}
    return {"method": "zscore", "nonzero": True}


def label_lookup(
    label_specs: Sequence[Mapping[str, Any]] | None, dataset_labels: Mapping[str, int]
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Model labels and the dataset-value -> model-value table.

    Args:
        label_specs: config labels (``name``, ``value``, ``source``, ``color``, ``terminology``)
            or None to keep the dataset's labels (renumbered 1..n in value order).
        dataset_labels: ``dataset.json["labels"]`` (name -> value, background 0 included).

    Returns:
        ``(labels, lookup)``: ``model.json`` label dicts and a 256-entry (or larger) uint8 table.

    Raises:
        MedSegAIInputError: a ``source`` value the dataset does not define.
    """
    from .config import default_colour

    dataset_values = {int(v) for v in dataset_labels.values()}
    if label_specs is None:
        foreground = sorted((int(v), n) for n, v in dataset_labels.items() if int(v) != 0)
        label_specs = [
            {"name": name, "value": i + 1, "source": [value]} for i, (value, name) in enumerate(foreground)
        ]
    size = max(256, max(dataset_values | {0}) + 1)
    lookup = np.zeros(size, dtype=np.uint8)
    labels = []
    for spec in label_specs:
        sources = spec.get("source", [spec["value"]])
        unknown = sorted(set(sources) - dataset_values)
        if unknown:
            known = ", ".join(f"{n}={v}" for n, v in sorted(dataset_labels.items(), key=lambda kv: kv[1]))
            raise MedSegAIInputError(
                f"model label {spec['name']!r} maps dataset value(s) {unknown} that dataset.json does not "
                f"define ({known}); fix 'source' in the recipe."
            )
        for source in sources:
            lookup[int(source)] = int(spec["value"])
        entry = {
            "name": str(spec["name"]),
            "value": int(spec["value"]),
            "color": [float(c) for c in (spec.get("color") or default_colour(int(spec["value"])))],
        }
        if spec.get("terminology"):
            entry["terminology"] = spec["terminology"]
        labels.append(entry)
    if not labels:
        raise MedSegAIInputError("the dataset defines no foreground label; add labels to dataset.json or the recipe.")
    if any(label["name"] == "background" for label in labels):
        raise MedSegAIInputError("a model label may not be called 'background'; rename it in the recipe.")
    return sorted(labels, key=lambda item: item["value"]), lookup


def make_data_plan(config: Any, dataset_channels: Sequence[str], dataset_labels: Mapping[str, int]) -> DataPlan:
    """Resolve the config's channels and labels against a dataset.

    Raises:
        MedSegAIInputError: a config channel the dataset does not have, or a bad label mapping.
    """
    dataset_channels = list(dataset_channels)
    specs = config.channels
    if specs is None:
        specs = [{"name": name} for name in dataset_channels]
    channels, indices = [], []
    for spec in specs:
        name = spec["name"]
        if name not in dataset_channels:
            raise MedSegAIInputError(
                f"the recipe asks for channel {name!r} but the dataset has {', '.join(dataset_channels)}; "
                "fix 'channels' in the recipe or use a dataset with that channel."
            )
        indices.append(dataset_channels.index(name))
        entry = {"name": name, "normalization": dict(spec.get("normalization") or _default_normalization(name))}
        if spec.get("modality"):
            entry["modality"] = spec["modality"]
        elif name.strip().upper() == "CT":
            entry["modality"] = "CT"
        if spec.get("description"):
            entry["description"] = spec["description"]
        channels.append(entry)
    labels, lookup = label_lookup(config.labels, dataset_labels)
    return DataPlan(
        channel_names=[c["name"] for c in channels],
        channel_indices=indices,
        channels=channels,
        labels=labels,
        lookup=lookup,
        spatial=dict(config.spatial),
    )


# ----------------------------------------------------------------------------------------------
# Preprocessing (the engine's functions, composed in the engine's order)
# ----------------------------------------------------------------------------------------------


def model_target_spacing(spatial: Mapping[str, Any]) -> list[float | None]:
    """Target spacing ``(x, y, z)`` as the engine applies it.

    2D models never resample across slices: the entry of the slicing axis (z for axial, y for
    coronal, x for sagittal) is None whatever the card says.
    """
    target = list(spatial.get("target_spacing") or (None, None, None))
    if spatial.get("mode", "2d") == "2d":
        target[2 - _AXIS_OF[spatial.get("axis") or "axial"]] = None
    return target


def _model_grid(volume: Volume, spatial: Mapping[str, Any]) -> tuple[np.ndarray, Any, tuple[int, int, int], tuple]:
    view, grid = preprocessing.reorient_to_canonical(volume)
    shape, spacing = preprocessing.target_grid(view.shape, grid.spacing, model_target_spacing(spatial))
    return view, grid, shape, spacing


def preprocess_volumes(
    volumes: Sequence[Volume],
    normalizations: Sequence[Mapping[str, Any]],
    spatial: Mapping[str, Any],
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Network input for one case, as the engine computes it.

    Each channel: canonical LPS view → ``normalize`` with statistics of the whole canonical image
    → linear resampling onto the model grid (``target_grid`` of the first channel; 2D models are
    never resampled across slices), which is what ``MedSegAILib.inference.segment`` feeds the network.

    Args:
        volumes: one :class:`Volume` per model channel, all on one grid.
        normalizations: the channels' ``normalization`` dicts (statistics filled in).
        spatial: ``mode``, ``axis`` and ``target_spacing`` (x, y, z) are used.

    Returns:
        ``(image, spacing)``: ``(z, y, x, C)`` float32 on the model grid and its spacing (x, y, z).
    """
    if len(volumes) != len(normalizations) or not volumes:
        raise ValueError(f"need one normalization per volume, got {len(volumes)} volumes, {len(normalizations)} specs")
    channels = []
    spacing: tuple = ()
    for volume, spec in zip(volumes, normalizations):
        spec = {k: v for k, v in spec.items() if k != "fit"}
        view, _, shape, spacing = _model_grid(volume, spatial)
        stats = preprocessing.intensity_statistics(view, spec)
        normalized = preprocessing.normalize(view, spec, stats)
        channels.append(preprocessing.resample_axis_aligned(normalized, shape, order=1))
    image = np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=-1)
    return np.ascontiguousarray(image), tuple(float(s) for s in spacing)


def preprocess_label(label: Volume, lookup: np.ndarray, spatial: Mapping[str, Any]) -> np.ndarray:
    """Model labels ``(z, y, x)`` uint8 on the model grid (canonical view, mapped, nearest resampling)."""
    view, _, shape, _ = _model_grid(label, spatial)
    values = np.asarray(view)
    if values.size and int(values.max()) >= lookup.size:
        raise MedSegAIInputError(
            f"the label has value {int(values.max())}, larger than any label in dataset.json; fix the labelmap."
        )
    mapped = lookup[values.astype(np.intp, copy=False)]
    return np.ascontiguousarray(preprocessing.resample_axis_aligned(mapped, shape, order=0), dtype=np.uint8)


def _pooled(stats: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Mean and std of the union of samples given (count, mean, M2-free variance) per part."""
    total = sum(n for n, _, _ in stats)
    if total == 0:
        return 0.0, 1.0
    mean = sum(n * m for n, m, _ in stats) / total
    variance = sum(n * (v + (m - mean) ** 2) for n, m, v in stats) / total
    std = math.sqrt(max(variance, 0.0))
    return float(mean), float(std if std > 1e-6 else 1.0)


def fit_normalization(
    read_case: Callable[[str], tuple[list[Volume], Volume]],
    case_ids: Sequence[str],
    plan: DataPlan,
    progress: Callable[[str, int, int, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Replace ``fit: true`` normalisations by ones with statistics from the training cases.

    ``zscore``: pooled mean/std of the cases' voxels that ``preprocessing.zscore_voxels`` selects.
    ``ct``: pooled mean/std of the *clipped* intensities inside the labelled foreground (all
    voxels of a case without foreground), as nnU-Net does for CT.

    Args:
        read_case: case id -> (images in model channel order, label volume).
        case_ids: the training cases (never validation or test cases).
        plan: channels and label table; ``plan.channels`` is updated in place and returned.

    Returns:
        the channel dicts with fitted ``mean``/``std`` and without the ``fit`` key.
    """
    wanted = [i for i, c in enumerate(plan.channels) if c["normalization"].get("fit")]
    if wanted and case_ids:
        parts: dict[int, list[tuple[int, float, float]]] = {i: [] for i in wanted}
        for done, case_id in enumerate(case_ids):
            images, label = read_case(case_id)
            mask = None
            for i in wanted:
                spec = plan.channels[i]["normalization"]
                values = np.asarray(images[i].array, dtype=np.float32)
                if spec["method"] == "ct":
                    low, high = (float(v) for v in spec["clip"])
                    values = np.clip(values, low, high)
                    if mask is None:
                        mask = plan.lookup[np.asarray(label.array).astype(np.intp)] > 0
                    selected = values[mask] if mask.any() else values.ravel()
                else:
                    selected = preprocessing.zscore_voxels(values, spec)
                if selected.size:
                    parts[i].append(
                        (int(selected.size), float(selected.mean(dtype=np.float64)), float(selected.var(dtype=np.float64)))
                    )
            if progress is not None:
                progress(PREPROCESS, done + 1, len(case_ids), "fitting intensity statistics")
        for i in wanted:
            mean, std = _pooled(parts[i])
            spec = plan.channels[i]["normalization"]
            spec["mean"], spec["std"] = round(mean, 6), round(std, 6)
    for channel in plan.channels:
        channel["normalization"].pop("fit", None)
    return plan.channels


# ----------------------------------------------------------------------------------------------
# Cases in memory (+ .npy cache)
# ----------------------------------------------------------------------------------------------


@dataclass
class PreprocessedCase:
    """One case on the model grid.

    Attributes:
        id: case id.
        image: ``(z, y, x, C)`` float32.
        label: ``(z, y, x)`` uint8 model labels.
        spacing: model-grid spacing ``(x, y, z)`` mm.
        foreground: per model label value, up to 20000 ``(z, y, x)`` voxel indices of that label.
    """

    id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    foreground: dict[int, np.ndarray] = field(default_factory=dict)

    def index_foreground(self, seed: int = 0) -> None:
        """Fill :attr:`foreground` (a seeded subsample of each label's voxel indices)."""
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7])
        self.foreground = {}
        for value in np.unique(self.label):
            if value == 0:
                continue
            points = np.argwhere(self.label == value).astype(np.int32)
            if len(points) > _MAX_FOREGROUND_POINTS:
                points = points[np.sort(rng.choice(len(points), _MAX_FOREGROUND_POINTS, replace=False))]
            self.foreground[int(value)] = points


def _file_signature(paths: Iterable[Path]) -> list[Any]:
    signature = []
    for path in paths:
        stat = Path(path).stat()
        signature.append([str(path), stat.st_size, stat.st_mtime_ns])
    return signature


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        np.save(tmp, array, allow_pickle=False)


def load_cases(
    info: Any,
    case_ids: Sequence[str],
    plan: DataPlan,
    cache_dir: str | Path | None = None,
    progress: Callable[[str, int, int, str], None] | None = None,
    seed: int = 0,
) -> list[PreprocessedCase]:
    """Read and preprocess cases (or take them from the ``.npy`` cache).

    Args:
        info: ``MedSegAILib.data.dataset.DatasetInfo``.
        case_ids: which cases.
        plan: channels (fitted normalisation), label table, spatial settings.
        cache_dir: folder for ``<case>-<key>.image.npy``/``.label.npy``; None = memory only.
        progress: ``(stage, done, total, message)``; stage ``preprocess``.
        seed: seed of the foreground-point subsample.

    Returns:
        the cases, in the order of ``case_ids``.

    Raises:
        MedSegAIInputError: unreadable case (the message names the case and file).
    """
    from MedSegAILib.data.dataset import read_case

    if any(c["normalization"].get("fit") for c in plan.channels):
        raise ValueError("fit_normalization must run before load_cases (a channel still has fit: true)")
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    fingerprint = plan.fingerprint()
    cases = []
    for done, case_id in enumerate(case_ids):
        case = info.case(case_id)
        image = label = None
        spacing: tuple = ()
        if cache is not None:
            key_data = json.dumps([fingerprint, _file_signature([*case.images, case.label])])
            key = hashlib.sha1(key_data.encode()).hexdigest()[:16]
            image_path = cache / f"{case_id}-{key}.image.npy"
            label_path = cache / f"{case_id}-{key}.label.npy"
            meta_path = cache / f"{case_id}-{key}.json"
            if image_path.is_file() and label_path.is_file() and meta_path.is_file():
                try:
                    image = np.load(image_path, allow_pickle=False)
                    label = np.load(label_path, allow_pickle=False)
                    spacing = tuple(json.loads(meta_path.read_text())["spacing"])
                except (OSError, ValueError, KeyError):
                    image = label = None
        if image is None or label is None:
            images, label_volume = read_case(info, case)
            selected = [images[i] for i in plan.channel_indices]
            image, spacing = preprocess_volumes(selected, plan.normalizations, plan.spatial)
            label = preprocess_label(label_volume, plan.lookup, plan.spatial)
            if cache is not None:
                _save_npy_atomic(image_path, image)
                _save_npy_atomic(label_path, label)
                meta_path.write_text(json.dumps({"spacing": list(spacing)}))
        item = PreprocessedCase(id=case_id, image=image, label=label, spacing=tuple(spacing))
        item.index_foreground(seed)
        cases.append(item)
        if progress is not None:
            progress(PREPROCESS, done + 1, len(case_ids), f"case {case_id}")
    return cases


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def slicing_view(array: np.ndarray, axis: str) -> np.ndarray:
    """Move the 2D slicing axis of a canonical ``(z, y, x, ...)`` array to the front.

    ``axial`` → ``(z, y, x)``, ``coronal`` → ``(y, z, x)``, ``sagittal`` → ``(x, z, y)``;
    trailing axes (channels) are kept. Returns a view.
    """
    if axis not in _AXIS_OF:
        raise ValueError(f"axis must be axial, coronal or sagittal, got {axis!r}")
    first = _AXIS_OF[axis]
    order = [first] + [a for a in range(3) if a != first] + list(range(3, array.ndim))
    return array.transpose(order)


def _crop_start(size: int, patch: int, rng: np.random.Generator, must_contain: int | None) -> int:
    """Start of a ``patch``-long window on an axis of length ``size`` (negative = zero padding)."""
    if size <= patch:
        low, high = size - patch, 0
    else:
        low, high = 0, size - patch
    if must_contain is not None:
        low = max(low, must_contain - patch + 1)
        high = min(high, must_contain)
    return int(rng.integers(low, high + 1))


def _extract(array: np.ndarray, starts: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """Window ``array[start:start+patch]`` on the leading axes, zero outside the array."""
    out = np.zeros(tuple(patch) + array.shape[len(patch):], dtype=array.dtype)
    source, target = [], []
    for start, size, length in zip(starts, patch, array.shape):
        low, high = max(start, 0), min(start + size, length)
        source.append(slice(low, high))
        target.append(slice(low - start, high - start))
    out[tuple(target)] = array[tuple(source)]
    return out


class Sampler:
    """Reproducible training windows with foreground oversampling.

    Window ``index`` depends only on ``(seed, index)``, so a resumed run continues the same
    stream. A fraction ``foreground_fraction`` of the indices (spread evenly, e.g. every third
    for 1/3) is *forced*: the window is placed around a voxel of a label chosen uniformly among
    the labels present (rare labels are not starved), so it contains foreground. Other windows
    are placed uniformly at random (they may contain foreground too). Windows are zero-padded
    where the image is smaller than the patch (as the engine's sliding windows pad).

    Args:
        cases: preprocessed training cases.
        spatial: ``mode``, ``axis`` (2D), ``patch_size`` (array order).
        num_classes: background + labels.
        foreground_fraction: share of forced foreground samples (>= 1/3 in training configs).
        seed: base seed.
    """

    def __init__(
        self,
        cases: Sequence[PreprocessedCase],
        spatial: Mapping[str, Any],
        num_classes: int,
        foreground_fraction: float = 1.0 / 3.0,
        seed: int = 0,
    ) -> None:
        if not cases:
            raise MedSegAIInputError("no training cases are left after the split; add cases or use fewer folds.")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction!r}")
        self.cases = list(cases)
        self.mode = spatial["mode"]
        self.axis = spatial.get("axis", "axial")
        self.patch = tuple(int(p) for p in spatial["patch_size"])
        if len(self.patch) != (2 if self.mode == "2d" else 3):
            raise ValueError(f"patch_size {self.patch} does not fit mode {self.mode!r}")
        self.num_classes = int(num_classes)
        self.channels = int(self.cases[0].image.shape[-1])
        self.foreground_fraction = float(foreground_fraction)
        self.seed = int(seed)
        if self.mode == "2d":
            self._images = [slicing_view(c.image, self.axis) for c in self.cases]
            self._labels = [slicing_view(c.label, self.axis) for c in self.cases]
            weights = np.array([a.shape[0] for a in self._images], dtype=np.float64)
        else:
            self._images = [c.image for c in self.cases]
            self._labels = [c.label for c in self.cases]
            weights = np.array([np.prod(a.shape[:3]) for a in self._images], dtype=np.float64)
        self._case_weights = weights / weights.sum()
        self._by_label: dict[int, list[int]] = {}
        for i, case in enumerate(self.cases):
            for value in case.foreground:
                self._by_label.setdefault(value, []).append(i)

    def is_forced(self, index: int) -> bool:
        """True when sample ``index`` must contain foreground (when any training case has some)."""
        if not self._by_label:
            return False
        f = self.foreground_fraction
        return math.floor((index + 1) * f + 1e-9) > math.floor(index * f + 1e-9)

    def _forced_point(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        labels = sorted(self._by_label)
        value = labels[int(rng.integers(len(labels)))]
        case_index = self._by_label[value][int(rng.integers(len(self._by_label[value])))]
        points = self.cases[case_index].foreground[value]
        return case_index, points[int(rng.integers(len(points)))]

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Sample ``index`` before augmentation: ``(image, label, forced)``.

        ``image`` is ``patch + (C,)`` float32, ``label`` is ``patch`` uint8 (model label values).
        """
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(index) & 0xFFFFFFFFFFFF, 1])
        forced = self.is_forced(index)
        if forced:
            case_index, point = self._forced_point(rng)
        else:
            case_index, point = int(rng.choice(len(self.cases), p=self._case_weights)), None
        image, label = self._images[case_index], self._labels[case_index]
        if self.mode == "2d":
            if point is not None:
                first = _AXIS_OF[self.axis]
                point = point[[first] + [a for a in range(3) if a != first]]
                slice_index, in_plane = int(point[0]), [int(point[1]), int(point[2])]
            else:
                slice_index, in_plane = int(rng.integers(image.shape[0])), [None, None]
            image, label = image[slice_index], label[slice_index]
            centre = in_plane
        else:
            centre = [int(v) for v in point] if point is not None else [None, None, None]
        starts = [_crop_start(n, p, rng, c) for n, p, c in zip(image.shape, self.patch, centre)]
        return (
            _extract(image, starts, self.patch).astype(np.float32, copy=False),
            _extract(label, starts, self.patch),
            forced,
        )


def make_train_dataset(
    sampler: Sampler,
    batch_size: int,
    augmentation: Mapping[str, Any] | None = None,
    start: int = 0,
    num_parallel_calls: int | None = None,
) -> Any:
    """An endless ``tf.data.Dataset`` of ``(images, labels)`` batches from ``sampler``.

    Sample indices run from ``start`` (``epochs_done * steps_per_epoch * batch_size`` on resume,
    so the stream continues where it stopped). Windows come from ``sampler.window`` (numpy, in
    ``tf.numpy_function``); augmentation (``augment.augment_2d/3d``, seeded with
    ``(sampler.seed, index)``) runs in the TensorFlow graph. A forced-foreground window whose
    augmented label lost all foreground is used un-augmented, so the foreground share holds.
    ``map`` runs in parallel (AUTOTUNE by default) with deterministic order; batches are prefetched.

    Args:
        sampler: the window sampler.
        batch_size: samples per batch (global batch size).
        augmentation: dict for ``augment`` (None, ``{}`` or ``{"enabled": false}`` = none).
        start: first sample index.
        num_parallel_calls: parallel map calls (None = AUTOTUNE).

    Returns:
        dataset of ``float32 (N, *patch, C)`` images and ``int32 (N, *patch)`` label values.
    """
    import tensorflow as tf

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    patch = list(sampler.patch)
    channels = sampler.channels
    augment_fn = None
    if augmentation and augmentation.get("enabled", True) is not False:
        from . import augment

        augment.resolve_config(dict(augmentation))  # fail early on a bad config
        augment_fn = augment.augment_2d if sampler.mode == "2d" else augment.augment_3d
    augmentation = dict(augmentation or {})
    base_seed = tf.constant(sampler.seed & 0x7FFFFFFF, dtype=tf.int64)

    def load(index: Any) -> tuple[np.ndarray, np.ndarray, np.bool_]:
        image, label, forced = sampler.window(int(index))
        return image, label, np.bool_(forced)

    def mapper(index: Any) -> tuple[Any, Any]:
        image, label, forced = tf.numpy_function(load, [index], (tf.float32, tf.uint8, tf.bool), stateful=False)
        image.set_shape(patch + [channels])
        label.set_shape(patch)
        forced.set_shape([])
        if augment_fn is not None:
            new_image, new_label = augment_fn(image, label, augmentation, tf.stack([base_seed, index]))
            keep = tf.logical_or(tf.logical_not(forced), tf.reduce_any(new_label > 0))
            image = tf.where(keep, new_image, image)
            label = tf.where(keep, new_label, label)
        return image, tf.cast(label, tf.int32)

    calls = tf.data.AUTOTUNE if num_parallel_calls is None else int(num_parallel_calls)
    dataset = tf.data.Dataset.range(int(start), 2**62)
    dataset = dataset.map(mapper, num_parallel_calls=calls, deterministic=True)
    dataset = dataset.batch(int(batch_size), drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    dataset = dataset.with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# Validation: whole slices / volumes through the engine's sliding windows
# ----------------------------------------------------------------------------------------------


def predict_case(
    predict: Callable[[np.ndarray], np.ndarray],
    case: PreprocessedCase,
    spatial: Mapping[str, Any],
    batch_size: int = 8,
    overlap: float = 0.25,
) -> np.ndarray:
    """Argmax labels ``(z, y, x)`` uint8 of one preprocessed case (model grid).

    Uses the engine's ``sliding_window_2d``/``sliding_window_3d`` (Gaussian blending) so the
    validation numbers describe what ``medsegai segment`` does, up to resampling back.
    """
    from MedSegAILib.inference import sliding_window

    patch = tuple(int(p) for p in spatial["patch_size"])
    divisible = int(spatial.get("divisible_by", 1))
    if spatial["mode"] == "2d":
        axis = spatial.get("axis", "axial")
        slab = slicing_view(case.image, axis)
        labels = np.empty(slab.shape[:3], dtype=np.uint8)
        chunk = 32
        for first in range(0, slab.shape[0], chunk):
            probs = sliding_window.sliding_window_2d(
                np.ascontiguousarray(slab[first : first + chunk]), predict, patch, overlap, batch_size,
                divisible_by=divisible,
            )
            labels[first : first + chunk] = np.argmax(probs, axis=-1)
        order = np.argsort([_AXIS_OF[axis]] + [a for a in range(3) if a != _AXIS_OF[axis]])
        return np.ascontiguousarray(labels.transpose(order))
    labels = np.empty(case.image.shape[:3], dtype=np.uint8)

    def consume(z0: int, probs: np.ndarray) -> None:
        labels[z0 : z0 + len(probs)] = np.argmax(probs, axis=-1)

    sliding_window.sliding_window_3d(
        np.ascontiguousarray(case.image), predict, patch, overlap, max(1, batch_size // 4),
        divisible_by=divisible, consumer=consume,
    )
    return labels


def dice_per_label(prediction: np.ndarray, truth: np.ndarray, num_labels: int) -> list[float]:
    """Dice of labels ``1..num_labels``; NaN where a label is absent from both arrays."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    scores = []
    for value in range(1, int(num_labels) + 1):
        p, t = prediction == value, truth == value
        total = int(p.sum()) + int(t.sum())
        scores.append(float("nan") if total == 0 else 2.0 * int(np.logical_and(p, t).sum()) / total)
    return scores


def validation_dice(
    predict: Callable[[np.ndarray], np.ndarray],
    cases: Sequence[PreprocessedCase],
    spatial: Mapping[str, Any],
    num_labels: int,
    batch_size: int = 8,
) -> tuple[list[float], dict[str, list[float]]]:
    """Per-label Dice averaged over validation cases, and the per-case values.

    Returns:
        ``(per_label, per_case)``: per_label[i] is the mean Dice of label ``i + 1`` over the cases
        where it is present in the truth or the prediction (NaN if none); per_case maps case id
        to its per-label list.
    """
    per_case = {}
    for case in cases:
        prediction = predict_case(predict, case, spatial, batch_size)
        per_case[case.id] = dice_per_label(prediction, case.label, num_labels)
    per_label = []
    for i in range(num_labels):
        values = [scores[i] for scores in per_case.values() if not math.isnan(scores[i])]
        per_label.append(float(np.mean(values)) if values else float("nan"))
    return per_label, per_case
