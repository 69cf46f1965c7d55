"""Check input volumes before segmentation, and bring extra channels onto the first one's grid.

Voxel types after :func:`check_volume`: uint8, int8, uint16, int16 and float32 pass unchanged;
bool becomes uint8; float16/float64 become float32; int32, uint32, int64 and uint64 become float32
when every value lies within +-2**24 (the integers float32 holds exactly) and are refused otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..core.errors import MedSegAIInputError
from ..core.image import Volume

__all__ = ["check_volume", "check_channels", "FLOAT32_EXACT_INT"]

FLOAT32_EXACT_INT = 2**24
"""Largest integer magnitude below which every integer is exactly representable in float32."""

_PASS_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.float32)}
_EXPECTED = "a 3D scalar (grey-value) volume"
_SLAB_VOXELS = 16 * 1024 * 1024


def _shape_problem(array: np.ndarray, name: str) -> str | None:
    shape = "x".join(str(s) for s in array.shape)
    if array.ndim == 4 and array.shape[-1] in (2, 3, 4):
        return (
            f"{name} has {array.shape[-1]} values per voxel (RGB or vector image, shape {shape}), "
            f"but MedSegAI needs {_EXPECTED}; convert it to greyscale."
        )
    if array.ndim > 3:
        return (
            f"{name} is a {array.ndim}D image (shape {shape}), but MedSegAI needs {_EXPECTED}; "
            "extract one 3D volume."
        )
    if array.ndim < 3 or min(array.shape) <= 1:
        return (
            f"{name} is a 2D image (shape {shape}), but MedSegAI needs {_EXPECTED} with several slices; "
            "pass the whole 3D scan."
        )
    return None


def _value_range(array: np.ndarray, name: str) -> tuple[float, float]:
    """Minimum and maximum over the volume, in slabs (bounded memory); refuses NaN/Inf."""
    step = max(1, _SLAB_VOXELS // max(1, array[0].size))
    low, high = np.inf, -np.inf
    is_float = array.dtype.kind == "f"
    for start in range(0, array.shape[0], step):
        slab = array[start : start + step]
        if is_float and not np.isfinite(slab).all():
            nan = int(np.count_nonzero(np.isnan(array)))
            inf = int(np.count_nonzero(np.isinf(array)))
            raise MedSegAIInputError(
                f"{name} contains {nan} NaN and {inf} infinite voxel values; fix or re-export the image so every "
                "voxel is a finite number."
            )
        low = min(low, float(slab.min()))
        high = max(high, float(slab.max()))
    return low, high


def check_volume(volume: Volume, name: str = "input image") -> Volume:
    """Refuse volumes that cannot be segmented; convert voxel types that need it.

    Args:
        volume: the image, array ``(z, y, x)``.
        name: how to call it in error messages (e.g. ``"channel 1 (CT)"``).

    Returns:
        ``volume`` itself when it is fine as it is, else a copy with a converted array (see the
        module docstring for the type rules); geometry and metadata are kept.

    Raises:
        MedSegAIInputError: not 3D scalar, unsupported voxel type (complex, text, ...), NaN/Inf
            voxels, empty (all zero) or constant volume, integers beyond float32's exact range.
        TypeError: ``volume`` is not a :class:`Volume`.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
    array = np.asarray(volume.array)
    problem = _shape_problem(array, name)
    if problem:
        raise MedSegAIInputError(problem)
    dtype = array.dtype
    if dtype == np.bool_:
        array = array.view(np.uint8)
    elif dtype.kind not in "iuf":
        raise MedSegAIInputError(
            f"{name} has voxel type {dtype}, which MedSegAI cannot segment; convert it to an integer or float image."
        )
    low, high = _value_range(array, name)
    if low == high == 0:
        raise MedSegAIInputError(f"{name} is empty (every voxel is 0); pass an image that contains the scan.")
    if low == high:
        raise MedSegAIInputError(f"{name} is constant (every voxel is {low:g}); pass an image that contains the scan.")
    if array.dtype.kind in "iu" and array.dtype not in _PASS_DTYPES:
        if low < -FLOAT32_EXACT_INT or high > FLOAT32_EXACT_INT:
            raise MedSegAIInputError(
                f"{name} has {dtype} values from {low:.6g} to {high:.6g}, beyond the +-2^24 range that float32 "
                "holds exactly, so they cannot be image intensities; check the file or rescale it to a smaller range."
            )
        array = array.astype(np.float32)
    elif array.dtype.kind == "f" and array.dtype != np.float32:
        limit = float(np.finfo(np.float32).max)
        if low < -limit or high > limit:
            raise MedSegAIInputError(
                f"{name} has values beyond the float32 range ({low:.3g} to {high:.3g}); rescale the image."
            )
        array = array.astype(np.float32)
    if array is volume.array:
        return volume
    return volume.with_array(array)


def _channel_names(channels: Any) -> list[str]:
    """Channel names from a list of names, a list of channel dicts, or an object with ``.channels``."""
    if hasattr(channels, "channels"):
        channels = channels.channels
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise TypeError(f"channel_names must be a sequence of names, got {type(channels).__name__}")
    names = []
    for channel in channels:
        if isinstance(channel, str):
            names.append(channel)
        elif isinstance(channel, Mapping) and "name" in channel:
            names.append(str(channel["name"]))
        elif hasattr(channel, "name"):
            names.append(str(channel.name))
        else:
            raise TypeError(f"cannot get a channel name from {channel!r}")
    if not names:
        raise ValueError("channel_names must name at least one channel")
    return names


def _physical_bounds(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS box (min, max) covering the voxels (half a voxel beyond the centres)."""
    size = np.array(volume.size_xyz, dtype=float)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=float)
    index = corners * size - 0.5
    matrix = volume.index_to_physical_matrix()
    points = index @ matrix[:3, :3].T + matrix[:3, 3]
    return points.min(axis=0), points.max(axis=0)


def _resample_onto(volume: Volume, reference: Volume) -> Volume:
    """Linear resampling of ``volume`` onto ``reference``'s grid (float32; outside = volume minimum)."""
    import SimpleITK as sitk

    moving = volume.with_array(volume.array.astype(np.float32, copy=False)).to_sitk()
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in reference.size_xyz])
    resampler.SetOutputSpacing(reference.spacing)
    resampler.SetOutputOrigin(reference.origin)
    resampler.SetOutputDirection(tuple(reference.direction.reshape(-1)))
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float(volume.array.min()))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampler.Execute(moving))
    return Volume(
        array=array,
        spacing=reference.spacing,
        origin=reference.origin,
        direction=reference.direction.copy(),
        metadata={**volume.metadata, "resampled": True, "original_geometry": volume.geometry_description()},
    )


def check_channels(
    volumes: Sequence[Volume], channel_names: Any, sources: Sequence[str] | None = None
) -> list[Volume]:
    """Check one volume per model channel and put every channel on the first channel's grid.

    Args:
        volumes: one :class:`Volume` per channel, in the model's channel order.
        channel_names: the model's channel names in order (also accepted: channel dicts with a
            ``name`` key, or an object with a ``.channels`` attribute such as a model card).
        sources: optional description of where each volume came from (e.g. the input file
            names), used in error messages: ``"channel 1 (CT, from scan.nrrd) is empty ..."``.

    Returns:
        The checked volumes (see :func:`check_volume`); channels 2.. whose grid differs from
        channel 1 are linearly resampled onto it (float32, ``metadata["resampled"] = True``).

    Raises:
        MedSegAIInputError: wrong number of volumes, a volume fails :func:`check_volume`, or a
            channel does not overlap channel 1 in physical space.
    """
    names = _channel_names(channel_names)
    if isinstance(volumes, Volume) or not isinstance(volumes, Sequence):
        raise TypeError(f"volumes must be a sequence of Volume, got {type(volumes).__name__}")
    if len(volumes) != len(names):
        raise MedSegAIInputError(
            f"the model expects {len(names)} input image(s), one per channel in this order: {', '.join(names)}; "
            f"got {len(volumes)} — pass one image per channel."
        )
    if sources is not None and len(sources) != len(volumes):
        raise ValueError(f"sources has {len(sources)} entries for {len(volumes)} volumes")
    labels = [
        f"channel {i + 1} ({n}, from {sources[i]})" if sources is not None else f"channel {i + 1} ({n})"
        for i, n in enumerate(names)
    ]
    checked = [check_volume(v, label) for v, label in zip(volumes, labels)]
    reference = checked[0]
    ref_low, ref_high = _physical_bounds(reference)
    result = [reference]
    for index, volume in enumerate(checked[1:], start=1):
        if volume.same_grid(reference):
            result.append(volume)
            continue
        low, high = _physical_bounds(volume)
        if np.any(np.minimum(high, ref_high) <= np.maximum(low, ref_low)):
            raise MedSegAIInputError(
                f"channels do not overlap in space: {labels[index]} covers LPS "
                f"{np.round(low, 1).tolist()} to {np.round(high, 1).tolist()} mm but {labels[0]} covers "
                f"{np.round(ref_low, 1).tolist()} to {np.round(ref_high, 1).tolist()} mm; pass images of the same "
                "patient and study, registered to each other."
            )
        result.append(_resample_onto(volume, reference))
    return result
