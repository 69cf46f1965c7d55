"""Preprocessing: reorientation to LPS, intensity normalisation and axis-aligned resampling.

Array layouts:

- Volumes are numpy arrays in ``(z, y, x)`` order (``array[k, j, i]``); spacing, origin and
  target spacing are given in ``(x, y, z)`` order (ITK order), direction columns are index axes.
- Reorientation never interpolates: it permutes and reverses numpy axes and returns a *view*.
- Resampling maps voxel centres so that the physical extent is kept: output index ``o`` reads
  input coordinate ``u = (o + 0.5) * n_in / n_out - 0.5`` (clamped to the array, i.e. edge values
  are extended).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Reorientation",
    "reorient_to_canonical",
    "normalize",
    "intensity_statistics",
    "zscore_voxels",
    "NORMALIZATION_METHODS",
    "target_grid",
    "source_coordinates",
    "linear_weights",
    "resample_axis_aligned",
]

NORMALIZATION_METHODS = ("ct", "zscore", "percentile", "none")

# Per-image statistics are computed on a strided subsample of at most about this many voxels.
_STATISTICS_SAMPLE_VOXELS = 2_000_000
_DEFAULT_PERCENTILES = (0.5, 99.5)
# zscore "foreground": statistics from voxels above this fraction of the image's 99.5th percentile.
_FOREGROUND_REFERENCE_PERCENTILE = 99.5


# --------------------------------------------------------------------------------------------
# Reorientation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Reorientation:
    """How a ``(z, y, x)`` array was permuted/flipped to the canonical LPS layout, and back.

    In the canonical layout index axis ``i`` (numpy axis 2) points towards L, ``j`` (numpy axis 1)
    towards P and ``k`` (numpy axis 0) towards S, as closely as the acquisition allows (oblique
    volumes keep their obliqueness; each axis goes to the physical axis it is nearest to).

    Attributes:
        perm: canonical numpy axis ``a`` is original numpy axis ``perm[a]``.
        flip: whether canonical numpy axis ``a`` runs in the opposite direction of its original axis.
        original_shape: spatial shape ``(z, y, x)`` of the original array.
        shape: spatial shape ``(z, y, x)`` of the canonical view.
        spacing: canonical spacing ``(x, y, z)`` in mm.
        origin: LPS position (mm) of canonical voxel ``(0, 0, 0)``.
        direction: canonical 3x3 direction cosines (column ``c`` = canonical index axis ``c``).
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    original_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(x, y, z)`` mm of the canonical view (same as ``spacing``)."""
        return self.spacing

    @property
    def is_identity(self) -> bool:
        """True when the original array already has the canonical layout."""
        return self.perm == (0, 1, 2) and not any(self.flip)

    def _check(self, array: np.ndarray, spatial_axis: int, expected: tuple[int, ...], what: str) -> None:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"array must be a numpy array, got {type(array).__name__}")
        if spatial_axis < 0 or spatial_axis + 3 > array.ndim:
            raise ValueError(f"spatial_axis={spatial_axis} does not leave 3 spatial axes in an array of shape {array.shape}")
        spatial = tuple(array.shape[spatial_axis : spatial_axis + 3])
        if spatial != tuple(expected):
            raise ValueError(f"spatial shape {spatial} of the array does not match the {what} shape {tuple(expected)}")

    def to_canonical(self, array: np.ndarray, spatial_axis: int = 0) -> np.ndarray:
        """Canonical view of an array laid out like the original.

        Args:
            array: array whose axes ``spatial_axis .. spatial_axis + 2`` are the original
                ``(z, y, x)`` axes; axes before and after (channels, classes) are kept as they are,
                e.g. ``(z, y, x)``, ``(K, z, y, x)`` with ``spatial_axis=1`` or ``(z, y, x, K)``.
            spatial_axis: position of the first spatial axis.

        Returns:
            A view (no copy; writable when ``array`` is) in the canonical layout.
        """
        self._check(array, spatial_axis, self.original_shape, "original")
        order = list(range(array.ndim))
        order[spatial_axis : spatial_axis + 3] = [spatial_axis + p for p in self.perm]
        view = array.transpose(order)
        index = [slice(None)] * array.ndim
        for axis, flipped in enumerate(self.flip):
            if flipped:
                index[spatial_axis + axis] = slice(None, None, -1)
        return view[tuple(index)]

    def to_original(self, array: np.ndarray, spatial_axis: int = 0) -> np.ndarray:
        """Map an array in the canonical layout back to the original layout, voxel for voxel.

        Args:
            array: array whose axes ``spatial_axis .. spatial_axis + 2`` are canonical ``(z, y, x)``
                (e.g. ``(z, y, x)`` labels, ``(K, z, y, x)`` with ``spatial_axis=1`` or
                ``(z, y, x, K)`` probabilities).
            spatial_axis: position of the first spatial axis.

        Returns:
            A view (no copy) in the original layout; use ``np.ascontiguousarray`` for a compact copy.
        """
        self._check(array, spatial_axis, self.shape, "canonical")
        index = [slice(None)] * array.ndim
        for axis, flipped in enumerate(self.flip):
            if flipped:
                index[spatial_axis + axis] = slice(None, None, -1)
        unflipped = array[tuple(index)]
        inverse = np.argsort(self.perm)
        order = list(range(array.ndim))
        order[spatial_axis : spatial_axis + 3] = [spatial_axis + int(p) for p in inverse]
        return unflipped.transpose(order)



def _nearest_axes(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """For each index axis c (i, j, k): the physical axis it is nearest to and the sign."""
    best_perm: tuple[int, ...] = (0, 1, 2)
    best_score = -1.0
    for candidate in itertools.permutations(range(3)):
        score = float(sum(abs(direction[candidate[c], c]) for c in range(3)))
        if score > best_score + 1e-12:
            best_perm, best_score = candidate, score
    signs = tuple(1.0 if direction[best_perm[c], c] >= 0 else -1.0 for c in range(3))
    return tuple(best_perm), signs  # type: ignore[return-value]


def reorient_to_canonical(
    array: Any,
    direction: Any = None,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
) -> tuple[np.ndarray, Reorientation]:
    """View an image in the canonical LPS layout (i→L, j→P, k→S) without interpolation.

    Args:
        array: ``(z, y, x)`` numpy array, or a :class:`MedSegAILib.core.image.Volume` (then
            ``direction``, ``spacing`` and ``origin`` come from it and must be left out).
        direction: 3x3 direction cosines (column ``c`` = index axis ``c``, LPS).
        spacing: voxel size ``(x, y, z)`` mm; defaults to 1 mm.
        origin: LPS position of voxel ``(0, 0, 0)``; defaults to zero.

    Returns:
        ``(view, reorientation)``: the canonical view of ``array`` (no copy) and the
        :class:`Reorientation` that maps arrays between both layouts and gives the canonical
        spacing, origin and direction.
    """
    if hasattr(array, "array") and hasattr(array, "direction") and not isinstance(array, np.ndarray):
        if direction is not None or spacing is not None or origin is not None:
            raise ValueError("give either a Volume or an array with direction/spacing/origin, not both")
        array, direction, spacing, origin = array.array, array.direction, array.spacing, array.origin
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array must be a numpy array or a Volume, got {type(array).__name__}")
    if array.ndim != 3:
        raise ValueError(f"array must be 3D (z, y, x), got shape {array.shape}")
    if direction is None:
        raise ValueError("direction is required with a plain array")
    try:
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    except (TypeError, ValueError) as e:
        raise ValueError(f"direction must be a 3x3 matrix, got {direction!r}") from e
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise ValueError(f"direction must be an invertible finite 3x3 matrix, got {matrix.tolist()}")
    spacing_xyz = np.asarray((1.0, 1.0, 1.0) if spacing is None else spacing, dtype=float)
    origin_xyz = np.asarray((0.0, 0.0, 0.0) if origin is None else origin, dtype=float)
    if spacing_xyz.shape != (3,) or origin_xyz.shape != (3,):
        raise ValueError(f"spacing and origin need 3 values (x, y, z), got {spacing!r} and {origin!r}")

    physical_of_index, signs = _nearest_axes(matrix)
    index_of_physical = [0, 0, 0]
    for c, p in enumerate(physical_of_index):
        index_of_physical[p] = c
    size_xyz = array.shape[::-1]

    new_direction = np.empty((3, 3))
    new_spacing = [0.0, 0.0, 0.0]
    start_index = np.zeros(3)
    perm = [0, 0, 0]
    flip = [False, False, False]
    for p in range(3):  # canonical index axis p (x, y, z) comes from original index axis c
        c = index_of_physical[p]
        new_direction[:, p] = matrix[:, c] * signs[c]
        new_spacing[p] = float(spacing_xyz[c])
        perm[2 - p] = 2 - c
        flip[2 - p] = signs[c] < 0
        if signs[c] < 0:
            start_index[c] = size_xyz[c] - 1
    new_origin = origin_xyz + matrix @ (spacing_xyz * start_index)
    reorientation = Reorientation(
        perm=tuple(perm),  # type: ignore[arg-type]
        flip=tuple(flip),  # type: ignore[arg-type]
        original_shape=tuple(int(n) for n in array.shape),  # type: ignore[arg-type]
        shape=tuple(int(array.shape[a]) for a in perm),  # type: ignore[arg-type]
        spacing=tuple(new_spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in new_origin),  # type: ignore[arg-type]
        direction=new_direction,
    )
    return reorientation.to_canonical(array), reorientation


# --------------------------------------------------------------------------------------------
# Intensity normalisation
# --------------------------------------------------------------------------------------------


def _check_spec(spec: Mapping[str, Any]) -> str:
    if not isinstance(spec, Mapping):
        raise TypeError(f"normalization spec must be a dict, got {type(spec).__name__}")
    method = spec.get("method")
    if method not in NORMALIZATION_METHODS:
        raise ValueError(f"normalization method {method!r} is not one of {NORMALIZATION_METHODS}")
    if method == "ct":
        clip = spec.get("clip")
        if clip is None or len(clip) != 2 or not float(clip[0]) < float(clip[1]):
            raise ValueError(f"ct normalization needs clip [low, high] with low < high, got {clip!r}")
    foreground = spec.get("foreground")
    if foreground is not None and (
        isinstance(foreground, bool) or not isinstance(foreground, (int, float)) or not 0 < foreground < 1
    ):
        raise ValueError(f"zscore foreground must be a fraction in (0, 1), got {foreground!r}")
    std = spec.get("std")
    if std is not None and not float(std) > 0:
        raise ValueError(f"normalization std must be > 0, got {std!r}")
    if method == "percentile":
        lower = float(spec.get("lower", _DEFAULT_PERCENTILES[0]))
        upper = float(spec.get("upper", _DEFAULT_PERCENTILES[1]))
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"percentile normalization needs 0 <= lower < upper <= 100, got {lower!r}, {upper!r}")
    return str(method)


def _subsample(array: np.ndarray) -> np.ndarray:
    """A strided view with at most about ``_STATISTICS_SAMPLE_VOXELS`` voxels."""
    if array.size <= _STATISTICS_SAMPLE_VOXELS or array.ndim == 0:
        return array
    step = math.ceil((array.size / _STATISTICS_SAMPLE_VOXELS) ** (1.0 / array.ndim))
    return array[(slice(None, None, step),) * array.ndim]


def zscore_voxels(values: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """The voxels a per-image ``zscore`` takes its mean and std from, as a flat array.

    All of ``values`` by default; the non-zero ones with ``nonzero``; with ``foreground`` f, those
    brighter than f times the 99.5th percentile (of the non-zero ones with ``nonzero``), which
    leaves out air and scanner noise around a head or body whatever the field of view.

    Args:
        values: image voxels, any shape.
        spec: a ``zscore`` normalisation dict.
    """
    values = np.asarray(values).ravel()
    if spec.get("nonzero"):
        values = values[values != 0]
    if spec.get("foreground") is not None and values.size:
        reference = float(np.percentile(values, _FOREGROUND_REFERENCE_PERCENTILE))
        if reference > 0:
            values = values[values > float(spec["foreground"]) * reference]
    return values


def intensity_statistics(array: np.ndarray, spec: Mapping[str, Any]) -> dict[str, float]:
    """Per-image statistics a normalisation needs, computed once on the whole volume.

    Large volumes are measured on a regular strided subsample (about 2 million voxels), which is
    exact enough for means, standard deviations and percentiles and keeps this fast.

    Args:
        array: the whole image, any shape (typically ``(z, y, x)``), any real dtype.
        spec: the channel's normalisation dict (``{"method": ...}``).

    Returns:
        ``{}`` when the method needs no per-image values (``ct``, ``none``, ``zscore`` with fixed
        mean and std); ``{"mean", "std"}`` for ``zscore`` (over :func:`zscore_voxels`); ``{"low", "high"}`` (intensity values of
        the lower/upper percentiles) for ``percentile``.
    """
    method = _check_spec(spec)
    array = np.asarray(array)
    if method == "zscore":
        if spec.get("mean") is not None and spec.get("std") is not None:
            return {}
        sample = zscore_voxels(_subsample(array), spec)
        if sample.size == 0:
            return {"mean": 0.0, "std": 1.0}
        mean = float(np.mean(sample, dtype=np.float64))
        std = float(np.std(sample, dtype=np.float64))
        return {"mean": mean, "std": std if std > 0 else 1.0}
    if method == "percentile":
        sample = _subsample(array)
        lower = float(spec.get("lower", _DEFAULT_PERCENTILES[0]))
        upper = float(spec.get("upper", _DEFAULT_PERCENTILES[1]))
        low, high = np.percentile(sample, [lower, upper])
        return {"low": float(low), "high": float(high)}
    return {}


def normalize(array: np.ndarray, spec: Mapping[str, Any], stats: Mapping[str, float] | None = None) -> np.ndarray:
    """Normalise intensities as a model channel's ``normalization`` spec says.

    Methods: ``ct`` (clip to ``clip``; then ``(x - mean) / std`` when both are given, else scale
    the clip range to [0, 1]); ``zscore`` (fixed ``mean``/``std`` or per-image ones; with
    ``nonzero`` the statistics come from non-zero voxels and zero voxels stay 0; with
    ``foreground`` from the voxels above that fraction of the 99.5th percentile, every voxel
    being normalised); ``percentile``
    (clip to the per-image ``lower``/``upper`` percentiles and scale to [0, 1]); ``none``.

    Args:
        array: image or part of it (e.g. a slab of slices), any shape and real dtype.
        spec: the normalisation dict.
        stats: per-image values from :func:`intensity_statistics` on the *whole* image, so that
            slabs are normalised consistently; computed from ``array`` itself when None.

    Returns:
        A new C-contiguous float32 array of the same shape.
    """
    method = _check_spec(spec)
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise TypeError(f"array must hold real numbers, got dtype {array.dtype}")
    out = array.astype(np.float32, order="C", copy=True)
    if method == "none":
        return out
    if method == "ct":
        low, high = (float(v) for v in spec["clip"])
        np.clip(out, low, high, out=out)
        if spec.get("mean") is not None and spec.get("std") is not None:
            out -= np.float32(spec["mean"])
            out *= np.float32(1.0 / float(spec["std"]))
        else:
            out -= np.float32(low)
            out *= np.float32(1.0 / (high - low))
        return out
    if stats is None or not stats:
        stats = intensity_statistics(array, spec)
    if method == "zscore":
        mean = spec.get("mean") if spec.get("mean") is not None else stats.get("mean")
        std = spec.get("std") if spec.get("std") is not None else stats.get("std")
        if mean is None or std is None:
            raise ValueError(f"zscore normalization needs mean and std (in spec or stats), got stats {dict(stats)!r}")
        if not float(std) > 0:
            raise ValueError(f"zscore std must be > 0, got {std!r}")
        out -= np.float32(mean)
        out *= np.float32(1.0 / float(std))
        if spec.get("nonzero"):
            out[array == 0] = 0.0
        return out
    try:
        low, high = float(stats["low"]), float(stats["high"])
    except KeyError as e:
        raise ValueError(f"percentile normalization needs stats with 'low' and 'high', got {dict(stats)!r}") from e
    np.clip(out, low, high, out=out)
    out -= np.float32(low)
    if high > low:
        out *= np.float32(1.0 / (high - low))
    return out


# --------------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------------


def target_grid(
    shape_zyx: Sequence[int],
    spacing_xyz: Sequence[float],
    target_spacing_xyz: Sequence[float | None] | None,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Size and spacing of the model grid covering the same physical extent as the input.

    Args:
        shape_zyx: input shape ``(z, y, x)``.
        spacing_xyz: input spacing ``(x, y, z)`` mm.
        target_spacing_xyz: wanted spacing ``(x, y, z)``; a None entry (or None for all) keeps
            that axis as it is.

    Returns:
        ``(shape_zyx, spacing_xyz)`` of the model grid: ``n_out = max(1, round(n_in * s_in / s_t))``
        and ``s_out = n_in * s_in / n_out`` so that ``n_out * s_out == n_in * s_in`` exactly.
    """
    if len(shape_zyx) != 3 or len(spacing_xyz) != 3:
        raise ValueError(f"need a 3D shape and spacing, got {shape_zyx!r} and {spacing_xyz!r}")
    target = (None, None, None) if target_spacing_xyz is None else tuple(target_spacing_xyz)
    if len(target) != 3:
        raise ValueError(f"target spacing needs 3 values (x, y, z), got {target_spacing_xyz!r}")
    size_xyz = [int(n) for n in shape_zyx[::-1]]
    out_size = []
    out_spacing = []
    for n_in, s_in, s_t in zip(size_xyz, spacing_xyz, target):
        s_in = float(s_in)
        if n_in < 1 or not s_in > 0:
            raise ValueError(f"invalid shape {tuple(shape_zyx)} or spacing {tuple(spacing_xyz)}")
        if s_t is None:
            out_size.append(n_in)
            out_spacing.append(s_in)
            continue
        if not float(s_t) > 0:
            raise ValueError(f"target spacing must be > 0 or None, got {target_spacing_xyz!r}")
        n_out = max(1, int(round(n_in * s_in / float(s_t))))
        out_size.append(n_out)
        out_spacing.append(n_in * s_in / n_out)
    return tuple(out_size[::-1]), tuple(out_spacing)  # type: ignore[return-value]


def source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Input coordinates (float64) read by each output index: ``(o + 0.5) * n_in / n_out - 0.5``."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along one axis: ``(i0, i1, w)`` with ``out[o] = in[i0] * (1 - w) + in[i1] * w``.

    ``i0``/``i1`` are non-decreasing intp arrays, ``w`` float32; coordinates outside the input are
    clamped to its first/last sample.
    """
    u = np.clip(source_coordinates(n_in, n_out), 0.0, n_in - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (u - i0).astype(np.float32)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    index = np.floor((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(index, n_in - 1)


def resample_axis_aligned(
    array: np.ndarray,
    out_shape: Sequence[int],
    order: int = 1,
    axes: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample along some axes onto a grid with the same physical extent (separable, fast).

    Args:
        array: any-dimensional array, e.g. ``(z, y, x)`` image, ``(S, y, x, K)`` probabilities.
        out_shape: new sizes of the resampled ``axes`` (one per axis, in the order of ``axes``).
        order: 1 = linear (images, probabilities; result float32), 0 = nearest (labels; dtype kept).
        axes: the axes to resample; default all axes (then ``len(out_shape) == array.ndim``).

    Returns:
        A new array; axes not listed keep their size. Returns ``array`` itself when no size changes.
    """
    array = np.asarray(array)
    if axes is None:
        axes = tuple(range(array.ndim))
    axes = tuple(int(a) % array.ndim if array.ndim else int(a) for a in axes)
    if len(set(axes)) != len(axes) or any(a >= array.ndim for a in axes):
        raise ValueError(f"invalid axes {axes} for an array of shape {array.shape}")
    if len(out_shape) != len(axes):
        raise ValueError(f"out_shape {tuple(out_shape)} needs one size per axis in {axes}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    sizes = {a: int(n) for a, n in zip(axes, out_shape)}
    if any(n < 1 for n in sizes.values()):
        raise ValueError(f"out_shape must be positive, got {tuple(out_shape)}")
    todo = [a for a in axes if sizes[a] != array.shape[a]]
    if not todo:
        return array
    # Shrinking axes first keeps the intermediate arrays small.
    todo.sort(key=lambda a: sizes[a] / array.shape[a])
    result = array
    if order == 1 and result.dtype != np.float32:
        result = result.astype(np.float32)
    for axis in todo:
        n_in, n_out = result.shape[axis], sizes[axis]
        if order == 0:
            result = np.take(result, _nearest_indices(n_in, n_out), axis=axis)
            continue
        i0, i1, weight = linear_weights(n_in, n_out)
        shape = [1] * result.ndim
        shape[axis] = n_out
        low = np.take(result, i0, axis=axis)
        high = np.take(result, i1, axis=axis)
        high -= low
        high *= weight.reshape(shape)
        low += high
        result = low
    return result
