"""Data augmentation for segmentation training, in TensorFlow, usable inside ``tf.data``.

One call augments one sample (no batch axis):

- 2D: ``image`` ``(y, x, C)`` float, ``label`` ``(y, x)`` integer.
- 3D: ``image`` ``(z, y, x, C)`` float, ``label`` ``(z, y, x)`` integer.

Geometry (flips, rotation, scaling, shift, elastic deformation) is combined into ONE sampling
map applied to both tensors: linear interpolation for the image, nearest neighbour for the label,
so label values are only ever copied (never invented) and image and label stay aligned. Points
that fall outside the input take the nearest edge voxel (for both image and label). Intensity
changes (scale, shift, contrast, gamma, noise) then act on the image only, per channel.

Randomness is stateless: the same ``seed`` (two integers) gives the same result, in eager mode and
inside ``Dataset.map``. A typical pipeline::

    ds = ds.enumerate().map(
        lambda i, sample: augment_2d(sample[0], sample[1], config, seed=tf.stack([base_seed, i])),
        num_parallel_calls=tf.data.AUTOTUNE)

The ``config`` dict overrides :data:`DEFAULT_AUGMENTATION` per operation (``{"elastic":
{"enabled": False}}`` keeps every other default). Geometric magnitudes are in voxels of the
array as given (for 3D, rotations default to the in-plane ``(y, x)`` axes because slices are often
much thicker than the in-plane spacing).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_AUGMENTATION", "resolve_config", "augment_2d", "augment_3d"]

DEFAULT_AUGMENTATION: dict[str, Any] = {
    "enabled": True,
    # mirror along each listed axis independently with this probability ("x", "y", and "z" in 3D)
    "flip": {"enabled": True, "probability": 0.5, "axes": ["x", "y"]},
    # in-plane rotation (around the z axis) up to max_degrees; 3D also around x/y up to
    # max_degrees_out_of_plane
    "rotate": {"enabled": True, "probability": 0.3, "max_degrees": 15.0, "max_degrees_out_of_plane": 0.0},
    # isotropic zoom factor drawn from range (>1 enlarges the content)
    "scale": {"enabled": True, "probability": 0.3, "range": [0.85, 1.15]},
    # translation up to max_fraction of the size along each axis
    "shift": {"enabled": True, "probability": 0.3, "max_fraction": 0.05},
    # smooth random displacement: normal(0, magnitude_voxels) at control_points per axis,
    # interpolated linearly; in 3D only in-plane unless in_plane_only is False
    "elastic": {"enabled": True, "probability": 0.2, "magnitude_voxels": 3.0, "control_points": 5,
                "in_plane_only": True},
    # image * factor, factor from range (per channel)
    "intensity_scale": {"enabled": True, "probability": 0.3, "range": [0.9, 1.1]},
    # image + offset, offset uniform in [-max, max] (per channel, normalised units)
    "intensity_shift": {"enabled": True, "probability": 0.3, "max": 0.1},
    # (image - mean) * factor + mean, factor from range; clipped to the old range if preserve_range
    "contrast": {"enabled": True, "probability": 0.3, "range": [0.75, 1.25], "preserve_range": True},
    # gamma on the per-channel [min, max] range, gamma from range
    "gamma": {"enabled": True, "probability": 0.3, "range": [0.7, 1.5]},
    # additive Gaussian noise, std uniform in [0, max_std]
    "noise": {"enabled": True, "probability": 0.15, "max_std": 0.1},
}

_GEOMETRIC = ("flip", "rotate", "scale", "shift", "elastic")
_INTENSITY = ("intensity_scale", "intensity_shift", "contrast", "gamma", "noise")
_AXIS_NAMES = {"x": -1, "y": -2, "z": -3}


def _check_range(name: str, key: str, value: Any, low: float | None = None) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"augmentation {name}.{key} must be [low, high], got {value!r}")
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"augmentation {name}.{key} must be finite with low <= high, got {value!r}")
    if low is not None and lo <= low:
        raise ValueError(f"augmentation {name}.{key} values must be > {low}, got {value!r}")
    return [lo, hi]


def _check_non_negative(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"augmentation {name}.{key} must be a non-negative number, got {value!r}")
    return float(value)


def resolve_config(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``config`` into :data:`DEFAULT_AUGMENTATION` and validate every value.

    Args:
        config: partial overrides, e.g. ``{"rotate": {"max_degrees": 5}, "noise": {"enabled": False}}``;
            ``{"enabled": False}`` turns all augmentation off. None means the defaults.

    Returns:
        A full, validated configuration (a new dict).

    Raises:
        ValueError: unknown operation or key, or an invalid value (the message names it).
        TypeError: ``config`` or an operation entry is not a dict.
    """
    result = copy.deepcopy(DEFAULT_AUGMENTATION)
    if config is None:
        return result
    if not isinstance(config, dict):
        raise TypeError(f"augmentation config must be a dict, got {type(config).__name__}")
    for name, value in config.items():
        if name not in result:
            raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(result)}")
        if name == "enabled":
            if not isinstance(value, bool):
                raise ValueError(f"augmentation 'enabled' must be true or false, got {value!r}")
            result["enabled"] = value
            continue
        if not isinstance(value, dict):
            raise TypeError(f"augmentation {name!r} must be a dict of settings, got {value!r}")
        for key, item in value.items():
            if key not in result[name]:
                raise ValueError(f"unknown setting {name}.{key}; known: {', '.join(result[name])}")
            result[name][key] = copy.deepcopy(item)
    for name in _GEOMETRIC + _INTENSITY:
        entry = result[name]
        if not isinstance(entry["enabled"], bool):
            raise ValueError(f"augmentation {name}.enabled must be true or false, got {entry['enabled']!r}")
        probability = entry["probability"]
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
            raise ValueError(f"augmentation {name}.probability must be in [0, 1], got {probability!r}")
        entry["probability"] = float(probability)
    axes = result["flip"]["axes"]
    if not isinstance(axes, (list, tuple)) or any(a not in _AXIS_NAMES for a in axes):
        raise ValueError(f"augmentation flip.axes must be a list of 'x', 'y', 'z', got {axes!r}")
    for key in ("max_degrees", "max_degrees_out_of_plane"):
        result["rotate"][key] = _check_non_negative("rotate", key, result["rotate"][key])
    result["scale"]["range"] = _check_range("scale", "range", result["scale"]["range"], low=0.0)
    result["shift"]["max_fraction"] = _check_non_negative("shift", "max_fraction", result["shift"]["max_fraction"])
    elastic = result["elastic"]
    elastic["magnitude_voxels"] = _check_non_negative("elastic", "magnitude_voxels", elastic["magnitude_voxels"])
    points = elastic["control_points"]
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"augmentation elastic.control_points must be an int >= 2, got {points!r}")
    if not isinstance(elastic["in_plane_only"], bool):
        raise ValueError(f"augmentation elastic.in_plane_only must be true or false, got {elastic['in_plane_only']!r}")
    result["intensity_scale"]["range"] = _check_range("intensity_scale", "range", result["intensity_scale"]["range"])
    result["intensity_shift"]["max"] = _check_non_negative("intensity_shift", "max", result["intensity_shift"]["max"])
    result["contrast"]["range"] = _check_range("contrast", "range", result["contrast"]["range"], low=0.0)
    if not isinstance(result["contrast"]["preserve_range"], bool):
        raise ValueError("augmentation contrast.preserve_range must be true or false")
    result["gamma"]["range"] = _check_range("gamma", "range", result["gamma"]["range"], low=0.0)
    result["noise"]["max_std"] = _check_non_negative("noise", "max_std", result["noise"]["max_std"])
    return result


def augment_2d(image: Any, label: Any, config: dict[str, Any] | None = None, seed: Any = (0, 0)) -> tuple[Any, Any]:
    """Augment one 2D sample.

    Args:
        image: float tensor ``(y, x, C)`` (channels-last).
        label: integer tensor ``(y, x)`` (uint8/int32/int64).
        config: overrides of :data:`DEFAULT_AUGMENTATION` (see :func:`resolve_config`).
        seed: two integers (tensor of shape ``[2]``, tuple) or one Python int; same seed, same result.

    Returns:
        ``(image, label)``: float32 ``(y, x, C)`` and the label with its original dtype and shape.
    """
    return _augment(image, label, config, seed, spatial_dims=2)


def augment_3d(image: Any, label: Any, config: dict[str, Any] | None = None, seed: Any = (0, 0)) -> tuple[Any, Any]:
    """Augment one 3D sample.

    Args:
        image: float tensor ``(z, y, x, C)`` (channels-last).
        label: integer tensor ``(z, y, x)``.
        config: overrides of :data:`DEFAULT_AUGMENTATION` (see :func:`resolve_config`).
        seed: two integers (tensor of shape ``[2]``, tuple) or one Python int; same seed, same result.

    Returns:
        ``(image, label)``: float32 ``(z, y, x, C)`` and the label with its original dtype and shape.
    """
    return _augment(image, label, config, seed, spatial_dims=3)


# ----------------------------------------------------------------------------------------------
# Implementation
# ----------------------------------------------------------------------------------------------


def _seed_tensor(seed: Any) -> Any:
    import tensorflow as tf

    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int or two ints, got {seed!r}")
    if isinstance(seed, int):
        return tf.constant([seed, 0], dtype=tf.int64)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if seed.shape.rank is not None and seed.shape.rank != 1:
        raise ValueError(f"seed must have shape [2], got shape {seed.shape}")
    return tf.reshape(seed, [2])


def _augment(image: Any, label: Any, config: dict[str, Any] | None, seed: Any, spatial_dims: int) -> tuple[Any, Any]:
    import tensorflow as tf

    cfg = resolve_config(config)
    image = tf.convert_to_tensor(image)
    label = tf.convert_to_tensor(label)
    if image.shape.rank is not None and image.shape.rank != spatial_dims + 1:
        raise ValueError(
            f"image must have rank {spatial_dims + 1} (spatial axes + channels), got shape {image.shape}"
        )
    if label.shape.rank is not None and label.shape.rank != spatial_dims:
        raise ValueError(f"label must have rank {spatial_dims} (no channel axis), got shape {label.shape}")
    if not label.dtype.is_integer:
        raise TypeError(f"label must be an integer tensor, got {label.dtype.name}")
    image_shape, label_shape = image.shape, label.shape
    image = tf.cast(image, tf.float32)
    if not cfg["enabled"]:
        return image, label
    seeds = tf.random.experimental.stateless_split(_seed_tensor(seed), num=16)

    geometric = [name for name in _GEOMETRIC if cfg[name]["enabled"] and cfg[name]["probability"] > 0]
    if geometric:
        image, label = _geometric(image, label, cfg, seeds, spatial_dims)
    image = _intensity(image, cfg, seeds, spatial_dims)
    image.set_shape(image_shape)
    label.set_shape(label_shape)
    return image, label


def _apply(probability: float, seed: Any) -> Any:
    """Scalar bool tensor: True with ``probability``."""
    import tensorflow as tf

    return tf.random.stateless_uniform([], seed=seed) < probability


def _rotation_matrix(axis_a: int, axis_b: int, angle: Any, n: int) -> Any:
    """n x n rotation in the plane of array axes ``axis_a``/``axis_b`` (array order)."""
    import tensorflow as tf

    c, s = tf.cos(angle), tf.sin(angle)
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            if (i, j) in ((axis_a, axis_a), (axis_b, axis_b)):
                row.append(c)
            elif (i, j) == (axis_a, axis_b):
                row.append(-s)
            elif (i, j) == (axis_b, axis_a):
                row.append(s)
            else:
                row.append(tf.constant(1.0 if i == j else 0.0))
        rows.append(tf.stack(row))
    return tf.stack(rows)


def _geometric(image: Any, label: Any, cfg: dict[str, Any], seeds: Any, nd: int) -> tuple[Any, Any]:
    import tensorflow as tf

    size = tf.shape(label)[:nd]
    size_f = tf.cast(size, tf.float32)
    center = (size_f - 1.0) / 2.0
    matrix = tf.eye(nd)
    resample = tf.constant(False)  # True once an operation needing interpolation is drawn

    flip = cfg["flip"]
    if flip["enabled"]:
        signs = []
        for axis in range(nd):
            name = {nd - 1: "x", nd - 2: "y"}.get(axis, "z")
            if name in flip["axes"]:
                do = _apply(flip["probability"], tf.random.experimental.stateless_fold_in(seeds[0], axis))
                signs.append(tf.where(do, -1.0, 1.0))
            else:
                signs.append(tf.constant(1.0))
        flip_signs = tf.stack(signs)
        matrix = tf.linalg.diag(flip_signs) @ matrix
    else:
        flip_signs = tf.ones([nd])

    rotate = cfg["rotate"]
    if rotate["enabled"]:
        plane_axes = [(nd - 2, nd - 1, rotate["max_degrees"])]
        if nd == 3 and rotate["max_degrees_out_of_plane"] > 0:
            plane_axes += [(0, 1, rotate["max_degrees_out_of_plane"]), (0, 2, rotate["max_degrees_out_of_plane"])]
        do = _apply(rotate["probability"], seeds[1])
        resample = tf.logical_or(resample, do)
        for index, (a, b, degrees) in enumerate(plane_axes):
            limit = math.radians(degrees)
            angle = tf.random.stateless_uniform(
                [], seed=tf.random.experimental.stateless_fold_in(seeds[2], index), minval=-limit, maxval=limit
            ) if limit > 0 else tf.constant(0.0)
            angle = tf.where(do, angle, 0.0)
            matrix = _rotation_matrix(a, b, angle, nd) @ matrix

    scale = cfg["scale"]
    if scale["enabled"]:
        low, high = scale["range"]
        factor = tf.random.stateless_uniform([], seed=seeds[3], minval=low, maxval=high) if high > low \
            else tf.constant(low)
        do = _apply(scale["probability"], seeds[4])
        resample = tf.logical_or(resample, do)
        factor = tf.where(do, factor, 1.0)
        matrix = matrix / factor

    offset = tf.zeros([nd])
    shift = cfg["shift"]
    if shift["enabled"] and shift["max_fraction"] > 0:
        fraction = tf.random.stateless_uniform([nd], seed=seeds[5], minval=-1.0, maxval=1.0) * shift["max_fraction"]
        do = _apply(shift["probability"], seeds[6])
        resample = tf.logical_or(resample, do)
        offset = tf.where(do, fraction * size_f, tf.zeros([nd]))

    elastic = cfg["elastic"]
    use_elastic = elastic["enabled"] and elastic["magnitude_voxels"] > 0
    if use_elastic:
        elastic_do = _apply(elastic["probability"], seeds[8])
        resample = tf.logical_or(resample, elastic_do)

    def interpolate() -> tuple[Any, Any]:
        return _resample(image, label, matrix, center, offset, size, size_f, nd,
                         (elastic, seeds[7], elastic_do) if use_elastic else None)

    def mirror_only() -> tuple[Any, Any]:
        # Flips alone move whole voxels: reversing the axes gives exactly what resampling would.
        out_image, out_label = image, label
        for axis in range(nd):
            flipped = flip_signs[axis] < 0
            out_image = tf.cond(flipped, lambda x=out_image, a=axis: tf.reverse(x, [a]), lambda x=out_image: x)
            out_label = tf.cond(flipped, lambda x=out_label, a=axis: tf.reverse(x, [a]), lambda x=out_label: x)
        return out_image, out_label

    return tf.cond(resample, interpolate, mirror_only)


def _resample(image: Any, label: Any, matrix: Any, center: Any, offset: Any, size: Any, size_f: Any, nd: int,
              elastic: tuple[dict[str, Any], Any, Any] | None) -> tuple[Any, Any]:
    """Resample image (linear) and label (nearest) at ``matrix @ (x - center) + center + offset``."""
    import tensorflow as tf

    grids = tf.meshgrid(*[tf.range(size[i], dtype=tf.float32) for i in range(nd)], indexing="ij")
    coords = tf.reshape(tf.stack(grids, axis=-1), [-1, nd])
    source = tf.linalg.matvec(matrix, coords - center) + center + offset

    if elastic is not None:
        elastic_config, field_seed, elastic_do = elastic
        field = _displacement_field(size, elastic_config, field_seed, nd)
        field = tf.where(elastic_do, field, tf.zeros_like(field))
        source = source + tf.reshape(field, [-1, nd])

    upper = size_f - 1.0
    source = tf.clip_by_value(source, 0.0, upper)
    out_image = _sample_linear(image, source, size, nd)
    nearest = tf.cast(tf.round(source), tf.int32)
    out_label = tf.reshape(tf.gather_nd(label, nearest), size)
    return tf.reshape(out_image, tf.concat([size, tf.shape(image)[-1:]], axis=0)), out_label


def _displacement_field(size: Any, elastic: dict[str, Any], seed: Any, nd: int) -> Any:
    """Smooth displacement ``(*size, nd)`` in voxels: normal control points, linear interpolation."""
    import tensorflow as tf

    points = elastic["control_points"]
    coarse = tf.random.stateless_normal([points] * nd + [nd], seed=seed) * elastic["magnitude_voxels"]
    if nd == 3 and elastic["in_plane_only"]:
        coarse = coarse * tf.constant([0.0, 1.0, 1.0])
    if nd == 2:
        return tf.image.resize(coarse[None], size, method="bilinear")[0]
    planes = tf.image.resize(coarse, size[1:], method="bilinear")  # (points, y, x, 3)
    planes = tf.transpose(planes, [1, 0, 2, 3])  # (y, points, x, 3)
    planes = tf.image.resize(planes, tf.stack([size[0], size[2]]), method="bilinear")  # (y, z, x, 3)
    return tf.transpose(planes, [1, 0, 2, 3])


def _sample_linear(image: Any, source: Any, size: Any, nd: int) -> Any:
    """(Bi/tri)linear samples of ``image`` at ``source`` (P, nd) (already clipped) -> (P, C)."""
    import tensorflow as tf

    base = tf.floor(source)
    frac = source - base
    base = tf.cast(base, tf.int32)
    upper = size - 1
    result = None
    for corner in range(2 ** nd):
        offsets = [(corner >> (nd - 1 - axis)) & 1 for axis in range(nd)]
        index = tf.minimum(base + tf.constant(offsets, dtype=tf.int32), upper)
        weight = tf.ones_like(frac[:, 0])
        for axis, bit in enumerate(offsets):
            weight = weight * (frac[:, axis] if bit else 1.0 - frac[:, axis])
        term = tf.gather_nd(image, index) * weight[:, None]
        result = term if result is None else result + term
    return result


def _per_channel_draw(channels: Any, seed: Any, value_range: Sequence[float]) -> Any:
    """One value per channel, uniform in ``value_range`` (the low end when the range is a point)."""
    import tensorflow as tf

    low, high = value_range
    if high > low:
        return tf.random.stateless_uniform(channels, seed=seed, minval=low, maxval=high)
    return tf.fill(channels, low)


def _intensity(image: Any, cfg: dict[str, Any], seeds: Any, nd: int) -> Any:
    import tensorflow as tf

    channels = tf.shape(image)[-1:]
    spatial_axes = list(range(nd))

    entry = cfg["intensity_scale"]
    if entry["enabled"] and entry["probability"] > 0:
        factor = _per_channel_draw(channels, seeds[9], entry["range"])
        image = tf.where(_apply(entry["probability"], seeds[10]), image * factor, image)

    entry = cfg["intensity_shift"]
    if entry["enabled"] and entry["probability"] > 0 and entry["max"] > 0:
        shift = tf.random.stateless_uniform(channels, seed=seeds[11], minval=-entry["max"], maxval=entry["max"])
        image = tf.where(_apply(entry["probability"], tf.random.experimental.stateless_fold_in(seeds[11], 1)),
                         image + shift, image)

    entry = cfg["contrast"]
    if entry["enabled"] and entry["probability"] > 0:
        factor = _per_channel_draw(channels, seeds[12], entry["range"])
        mean = tf.reduce_mean(image, axis=spatial_axes, keepdims=True)
        changed = (image - mean) * factor + mean
        if entry["preserve_range"]:
            changed = tf.clip_by_value(changed, tf.reduce_min(image, axis=spatial_axes, keepdims=True),
                                       tf.reduce_max(image, axis=spatial_axes, keepdims=True))
        image = tf.where(_apply(entry["probability"], tf.random.experimental.stateless_fold_in(seeds[12], 1)),
                         changed, image)

    entry = cfg["gamma"]
    if entry["enabled"] and entry["probability"] > 0:
        gamma = _per_channel_draw(channels, seeds[13], entry["range"])
        minimum = tf.reduce_min(image, axis=spatial_axes, keepdims=True)
        span = tf.maximum(tf.reduce_max(image, axis=spatial_axes, keepdims=True) - minimum, 1e-7)
        changed = tf.pow((image - minimum) / span, gamma) * span + minimum
        image = tf.where(_apply(entry["probability"], tf.random.experimental.stateless_fold_in(seeds[13], 1)),
                         changed, image)

    entry = cfg["noise"]
    if entry["enabled"] and entry["probability"] > 0 and entry["max_std"] > 0:
        std = tf.random.stateless_uniform([], seed=seeds[14], minval=0.0, maxval=entry["max_std"])
        noise = tf.random.stateless_normal(tf.shape(image), seed=seeds[15]) * std
        image = tf.where(_apply(entry["probability"], tf.random.experimental.stateless_fold_in(seeds[14], 1)),
                         image + noise, image)
    return image
