"""Per-voxel uncertainty of a segmentation: the normalised entropy of the (TTA-mean) softmax, as uint8.

Scale of the stored map (``--uncertainty FILE``): ``0`` = certain (one class has probability 1),
``255`` = maximal uncertainty (all ``K`` classes equally probable); the value is
``round(255 · H(p̄) / log K)`` with ``p̄`` the softmax averaged over the flip test-time
augmentation passes (when ``--tta`` is on; the single pass otherwise) and over the overlapping
sliding windows, ``H(p) = −Σ p log p``. A two-class voxel at ``p = 0.5`` is 255, at
``p = 0.9`` 120, at ``p = 0.99`` 21. The scale depends on ``K``: with 7 classes a 50/50 split
between two of them is 91 and a 90/10 split 43.

"Uncertain" (measurements, regions, ranking) means at least as unsure as a 99/1 split between two
classes: :func:`uncertain_level` (21 for ``K = 2``, 7 for ``K = 7``).

The map is made in the engine's streaming loop (:mod:`inference`): the entropy is computed at the
model's in-plane size from the probabilities of a few rows at a time, interpolated linearly to the
input grid and rounded to uint8 — never a float32 volume per class.

Layouts: probabilities ``(..., K)`` channels-last; maps ``(z, y, x)`` like :class:`image.Volume`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.errors import ModelFolderError
from ..core.image import Volume

__all__ = [
    "UNCERTAIN_SPLIT",
    "uncertain_level",
    "NEAR_MM",
    "SCALE",
    "normalized_entropy",
    "entropy_uint8",
    "uncertainty_measurements",
]

SCALE = 255
# A voxel is "uncertain" when its entropy reaches that of this two-class split (99 % / 1 %): chosen by
# measurement (bench_uncertainty.py: the first 10 regions at this level hold about twice as many of the
# held-out brain errors as at 90 / 10, 45-86 %).
UNCERTAIN_SPLIT = 0.99
# "Near" a segment: within this distance (mm) of one of its voxels, the segment itself included.
NEAR_MM = 5.0
# Class probabilities must sum to 1 within this tolerance for the map to mean anything.
_SUM_TOLERANCE = 0.02


def normalized_entropy(probabilities: np.ndarray, *, check: bool = True) -> np.ndarray:
    """``H(p) / log K`` along the last axis, float32 in [0, 1].

    Args:
        probabilities: ``(..., K)`` class probabilities (``K >= 2``), channels-last.
        check: refuse outputs that are not probability distributions (logits, sigmoids).

    Raises:
        ModelFolderError: ``check`` and the values are not probabilities summing to 1: such a
            model cannot give an uncertainty map.
        ValueError: fewer than two classes.
    """
    probabilities = np.asarray(probabilities)
    classes = probabilities.shape[-1]
    if classes < 2:
        raise ValueError(f"probabilities need at least 2 classes on the last axis, got shape {probabilities.shape}")
    if check and probabilities.size:
        low, high = float(probabilities.min()), float(probabilities.max())
        sums = probabilities.sum(axis=-1, dtype=np.float32)
        worst = float(np.max(np.abs(sums - 1.0)))
        if low < -1e-4 or high > 1.0 + 1e-4 or worst > _SUM_TOLERANCE:
            raise ModelFolderError(
                f"the model's outputs are not class probabilities (values in [{low:.3g}, {high:.3g}], per-voxel sums "
                f"off by up to {worst:.3g}), so it cannot give an uncertainty map; run without --uncertainty "
                f"or use a model that ends in a softmax"
            )
    p = np.clip(probabilities, np.float32(1e-12), np.float32(1.0)).astype(np.float32, copy=False)
    entropy = -np.einsum("...k,...k->...", p, np.log(p), dtype=np.float32)
    entropy *= np.float32(1.0 / math.log(classes))
    return np.clip(entropy, 0.0, 1.0, out=entropy)


def uncertain_level(num_classes: int, split: float = UNCERTAIN_SPLIT) -> int:
    """The uint8 map value from which a voxel counts as uncertain for a ``num_classes`` model (21 for 2, 7 for 7).

    That of a voxel split ``split`` / ``1 - split`` between two classes: ``255 · H2(split) / log K``.
    """
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    if not 0.5 <= float(split) < 1.0:
        raise ValueError(f"split must be in [0.5, 1), got {split!r}")
    h2 = -(split * math.log(split) + (1.0 - split) * math.log(1.0 - split))
    return max(1, int(round(SCALE * h2 / math.log(int(num_classes)))))


def entropy_uint8(normalized: np.ndarray) -> np.ndarray:
    """Map ``[0, 1]`` floats to the stored uint8 scale (``0`` certain … ``255`` maximal)."""
    scaled = np.asarray(normalized, dtype=np.float32) * np.float32(SCALE)
    np.rint(scaled, out=scaled)
    return np.clip(scaled, 0, SCALE, out=scaled).astype(np.uint8)


def uncertainty_measurements(labels: Volume, uncertainty: Volume, rows: list[dict[str, Any]], num_classes: int,
                             near_mm: float = NEAR_MM, level: int | None = None) -> list[dict[str, Any]]:
    """Add ``mean_uncertainty`` and ``uncertain_ml_near`` to measurement rows (in place; returned).

    ``mean_uncertainty`` is the mean of the map inside the segment on the 0–1 scale (uint8 / 255);
    ``uncertain_ml_near`` the volume (mL) of voxels whose map value is ≥ ``level`` (default
    :func:`uncertain_level` of ``num_classes``) and that lie
    within ``near_mm`` of the segment (the segment included). Work is confined to each segment's
    bounding box grown by ``near_mm`` (a distance transform of that box only).

    Args:
        labels: the label map (``(z, y, x)`` integers).
        uncertainty: the uint8 map on exactly ``labels``' grid.
        rows: :func:`measurements.compute_measurements` rows (``value``, ``bbox_ijk``).

    Raises:
        ValueError: the two volumes are not on the same grid.
    """
    from scipy import ndimage

    level = uncertain_level(num_classes) if level is None else int(level)

    if not uncertainty.same_grid(labels):
        raise ValueError("the uncertainty map is not on the labels' grid")
    label_array, map_array = np.asarray(labels.array), np.asarray(uncertainty.array)
    spacing_zyx = tuple(float(s) for s in labels.spacing[::-1])
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    margin = [int(math.ceil(near_mm / s)) for s in spacing_zyx]
    for row in rows:
        box = row.get("bbox_ijk")
        if not box:
            row["mean_uncertainty"], row["uncertain_ml_near"] = 0.0, 0.0
            continue
        (i0, j0, k0), (i1, j1, k1) = box
        low = [max(0, k0 - margin[0]), max(0, j0 - margin[1]), max(0, i0 - margin[2])]
        high = [min(label_array.shape[0], k1 + 1 + margin[0]), min(label_array.shape[1], j1 + 1 + margin[1]),
                min(label_array.shape[2], i1 + 1 + margin[2])]
        region = tuple(slice(a, b) for a, b in zip(low, high))
        inside = label_array[region] == row["value"]
        values = map_array[region]
        row["mean_uncertainty"] = round(float(values[inside].mean()) / SCALE, 4) if inside.any() else 0.0
        near = ndimage.distance_transform_edt(~inside, sampling=spacing_zyx) <= near_mm
        row["uncertain_ml_near"] = round(int(np.count_nonzero(near & (values >= level))) * voxel_ml, 4)
    return rows
