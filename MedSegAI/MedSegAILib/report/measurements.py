"""Per-segment measurements of a labelmap: voxel count, volume, maximum 3D diameter, bounding box.

Index conventions: ``bbox_ijk`` is ``[[i_min, j_min, k_min], [i_max, j_max, k_max]]`` (inclusive
voxel indices, ``i`` = x = the last numpy axis); ``bbox_lps_mm`` is the physical (LPS, mm) box
of those voxel centres. ``max_diameter_mm`` is the largest distance between two voxel centres of
the segment (3D Feret diameter), from the convex hull of the first/last voxel of each x row.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MedSegAIInputError
from ..core.image import Volume
from ..io.imageio import atomic_output, full_suffix
from ..core.labels import label_entries

__all__ = ["compute_measurements", "write_measurements", "max_feret_diameter", "CSV_COLUMNS", "UNCERTAINTY_COLUMNS"]

CSV_COLUMNS = (
    "name", "value", "voxel_count", "volume_ml", "max_diameter_mm",
    "bbox_i_min", "bbox_j_min", "bbox_k_min", "bbox_i_max", "bbox_j_max", "bbox_k_max",
    "bbox_x_min_mm", "bbox_y_min_mm", "bbox_z_min_mm", "bbox_x_max_mm", "bbox_y_max_mm", "bbox_z_max_mm",
)  # fmt: skip
# Added after CSV_COLUMNS when the rows carry them (``segment --uncertainty``, :mod:`uncertainty`).
UNCERTAINTY_COLUMNS = ("mean_uncertainty", "uncertain_ml_near")
_BRUTE_FORCE_POINTS = 2000
_PAIR_BLOCK = 2048


def _max_pairwise_distance(points: np.ndarray) -> float:
    """Largest Euclidean distance between rows of ``points`` (n, 3).

    Squared distances come from ``|a|^2 + |b|^2 - 2 a.b`` on centred points (a BLAS product per
    block, bounded memory); the winning pair's distance is then computed exactly.
    """
    centred = points - points.mean(axis=0)
    radius = np.sqrt(np.einsum("ij,ij->i", centred, centred))
    # A point p can only be in a pair longer than the bound if |p| + max|q| reaches it.
    bound = float(np.sqrt(np.max(np.sum((centred - centred[np.argmax(radius)]) ** 2, axis=1))))
    keep = np.flatnonzero(radius + radius.max() >= bound * (1.0 - 1e-9))
    points, centred = points[keep], centred[keep]
    norms = np.einsum("ij,ij->i", centred, centred)
    best, pair = -1.0, (0, 0)
    for start in range(0, len(centred), _PAIR_BLOCK):
        block = centred[start : start + _PAIR_BLOCK]
        d2 = norms[start : start + len(block), None] + norms[None, start:] - 2.0 * (block @ centred[start:].T)
        flat = int(np.argmax(d2))
        if d2.flat[flat] > best:
            best = float(d2.flat[flat])
            pair = (start + flat // d2.shape[1], start + flat % d2.shape[1])
    return float(np.linalg.norm(points[pair[0]] - points[pair[1]]))


def max_feret_diameter(points: np.ndarray) -> float:
    """Maximum distance between any two of ``points`` (n, 3) physical coordinates, mm.

    Uses the vertices of the convex hull (scipy.spatial.ConvexHull), which contain the farthest
    pair; small or flat/collinear point sets (where qhull fails) are measured exactly by brute force.
    """
    from scipy.spatial import ConvexHull, QhullError

    points = np.asarray(points, dtype=float)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (n, 3), got {points.shape}")
    if len(points) < 2:
        return 0.0
    if len(points) > _BRUTE_FORCE_POINTS:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:
            points = points[ConvexHull(points, qhull_options="QJ").vertices]
    return _max_pairwise_distance(points)


def _row_extreme_points(mask: np.ndarray, offset: tuple[int, int, int], volume: Volume) -> np.ndarray:
    """Physical LPS coordinates (n, 3) of the first and last mask voxel of every x row.

    Every voxel centre lies on the segment between its row's two extremes, so these points have
    the same convex hull (and farthest pair) as the whole mask, at a fraction of the count.
    """
    present = mask.any(axis=2)
    k, j = np.nonzero(present)
    first = np.argmax(mask, axis=2)[k, j]
    last = mask.shape[2] - 1 - np.argmax(mask[:, :, ::-1], axis=2)[k, j]
    index = np.concatenate([np.stack([first, j, k], axis=1), np.stack([last, j, k], axis=1)]).astype(float)
    index += np.array([offset[2], offset[1], offset[0]], dtype=float)
    matrix = volume.index_to_physical_matrix()
    return index @ matrix[:3, :3].T + matrix[:3, 3]


def _empty_row(name: str, value: int) -> dict[str, Any]:
    return {"name": name, "value": value, "voxel_count": 0, "volume_ml": 0.0, "max_diameter_mm": 0.0,
            "bbox_ijk": None, "bbox_lps_mm": None}  # fmt: skip


def compute_measurements(labels: Volume, labels_spec: Any) -> list[dict[str, Any]]:
    """Measure every label of ``labels_spec`` in the labelmap.

    Args:
        labels: integer labelmap, array ``(z, y, x)``, any orientation.
        labels_spec: label dicts with ``name`` and ``value`` (or a model card), see
            :func:`MedSegAILib.core.labels.label_entries`.

    Returns:
        One dict per label, in ``labels_spec`` order: ``name``, ``value``, ``voxel_count``,
        ``volume_ml`` (voxel count x voxel volume / 1000), ``max_diameter_mm``, ``bbox_ijk``
        and ``bbox_lps_mm`` (``None`` for a label with no voxel).

    Raises:
        TypeError: ``labels`` is not an integer 3D Volume.
    """
    from ..inference.components import label_boxes

    if not isinstance(labels, Volume) or labels.array.ndim != 3:
        raise TypeError("labels must be a 3D Volume")
    array = labels.array
    if array.dtype.kind not in "iub":
        raise TypeError(f"labels must hold integers, got {array.dtype}")
    if array.dtype.kind == "b":
        array = array.view(np.uint8)
    entries = label_entries(labels_spec)
    top = max(e.value for e in entries)
    if array.dtype.kind == "i" and array.min() < 0:
        array = np.where(array < 0, 0, array)
    boxes = label_boxes(array, max_label=top)
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    matrix = labels.index_to_physical_matrix()
    rows = []
    for entry in entries:
        value, name = entry.value, str(entry.name)
        box = boxes[value - 1]
        mask = array[box] == value if box is not None else None
        count = int(np.count_nonzero(mask)) if mask is not None else 0
        if count == 0:
            rows.append(_empty_row(name, value))
            continue
        points = _row_extreme_points(mask, tuple(s.start for s in box), labels)
        low_ijk = [box[2].start, box[1].start, box[0].start]
        high_ijk = [box[2].stop - 1, box[1].stop - 1, box[0].stop - 1]
        corners = np.array([[a, b, c] for a in (low_ijk[0], high_ijk[0]) for b in (low_ijk[1], high_ijk[1])
                            for c in (low_ijk[2], high_ijk[2])], dtype=float)  # fmt: skip
        physical = corners @ matrix[:3, :3].T + matrix[:3, 3]
        rows.append({
            "name": name,
            "value": value,
            "voxel_count": count,
            "volume_ml": count * voxel_ml,
            "max_diameter_mm": max_feret_diameter(points),
            "bbox_ijk": [low_ijk, high_ijk],
            "bbox_lps_mm": [physical.min(axis=0).tolist(), physical.max(axis=0).tolist()],
        })  # fmt: skip
    return rows


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    flat = {key: row.get(key) for key in CSV_COLUMNS[:5]}
    ijk = row.get("bbox_ijk") or [[None] * 3, [None] * 3]
    lps = row.get("bbox_lps_mm") or [[None] * 3, [None] * 3]
    for column, value in zip(CSV_COLUMNS[5:11], ijk[0] + ijk[1]):
        flat[column] = value
    for column, value in zip(CSV_COLUMNS[11:], lps[0] + lps[1]):
        flat[column] = None if value is None else round(float(value), 3)
    flat["volume_ml"] = round(float(flat["volume_ml"]), 4)
    flat["max_diameter_mm"] = round(float(flat["max_diameter_mm"]), 3)
    for column in UNCERTAINTY_COLUMNS:
        if column in row:
            flat[column] = row[column]
    return flat


def write_measurements(path: str | os.PathLike, rows: list[dict[str, Any]], overwrite: bool = False) -> Path:
    """Write measurement rows atomically as ``.csv`` (one row per label) or ``.json``.

    JSON is the list of rows as :func:`compute_measurements` returns them.

    CSV columns are :data:`CSV_COLUMNS` (bounding boxes flattened; empty cells for empty labels),
    then :data:`UNCERTAINTY_COLUMNS` when the rows carry them.

    Raises:
        MedSegAIInputError: the suffix is neither ``.csv`` nor ``.json``, or the file exists and
            ``overwrite`` is false.
    """
    path = Path(path)
    suffix = full_suffix(path)
    if suffix not in (".csv", ".json"):
        raise MedSegAIInputError(f"measurements file {path} must end with .csv or .json; choose one of those.")
    with atomic_output(path, overwrite) as temp:
        if suffix == ".json":
            temp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        else:
            with open(temp, "w", newline="", encoding="utf-8") as handle:
                extra = [c for c in UNCERTAINTY_COLUMNS if any(c in row for row in rows)]
                writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS) + extra)
                writer.writeheader()
                for row in rows:
                    writer.writerow(_csv_row(row))
    return path
