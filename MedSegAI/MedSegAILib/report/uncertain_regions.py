"""Connected regions of uncertain voxels, ranked for review, and which of them the user has seen.

The uncertainty map that ``medsegai segment --uncertainty`` writes is a uint8 volume on the input's
grid (0 = certain … 255 = maximally uncertain). :func:`rank_regions` thresholds it, labels the
26-connected regions of uncertain voxels and orders them by the uncertain volume they hold (mL),
largest first, so that the panel's **Next uncertain region** button and the benchmark's "first 5/10
regions" visit the same regions in the same order. Ties are broken by the summed uncertainty
(larger first) and then by the region's first voxel in C order of the ``(z, y, x)`` array, so the
order is a pure function of the inputs.

Each :class:`Region` has a centre that lies on one of its own voxels (the region voxel nearest
to its centroid in millimetres: a jump to it always lands on uncertain tissue, even for a curved
region whose centroid falls outside it) and the label value it concerns: the label most present
among its own voxels, or, for a region lying wholly outside every label, the label most present in a
shell of ``margin`` voxels around it (background 0 when none is near).

:class:`RegionVisits` is the small state behind the button: which regions were visited, "region 3
of 12", the next one not visited, and reset when a new segmentation replaces the map.

Pure numpy/scipy: no Slicer import, so the CLI, the benchmark and the tests use it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["DEFAULT_THRESHOLD", "Region", "RegionVisits", "rank_regions"]

# Voxels at or above this value of the uint8 map (0..255) are uncertain: half the maximal uncertainty.
DEFAULT_THRESHOLD = 128
_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# Regions up to this many voxels have their shell searched together (vectorised); larger ones one by one.
_VECTOR_SHELL_VOXELS = 4096


@dataclass(frozen=True)
class Region:
    """One connected region of uncertain voxels.

    Attributes:
        rank: position in the ranking, 0 = the region holding the most uncertain volume.
        voxel_count: number of uncertain voxels in the region.
        volume_ml: their volume in millilitres.
        mean_uncertainty: mean map value (0..255) over the region's voxels.
        peak_uncertainty: largest map value in the region.
        centre_zyx: the centre voxel as ``(z, y, x)`` array indices.
        centre_ijk: the same voxel as Slicer/ITK ``(i, j, k)`` = ``(x, y, z)`` indices.
        centre_ras: its position in millimetres (RAS) when ``ijk_to_ras`` was given, else ``None``.
        label: the label value the region concerns: the one most present among its voxels, else in
            the ``margin`` shell around it (0: no label in or around it).
        bounds_zyx: the region's bounding box as ``((z0, z1), (y0, y1), (x0, x1))``, half-open.
    """

    rank: int
    voxel_count: int
    volume_ml: float
    mean_uncertainty: float
    peak_uncertainty: int
    centre_zyx: tuple[int, int, int]
    centre_ijk: tuple[int, int, int]
    centre_ras: tuple[float, float, float] | None
    label: int
    bounds_zyx: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _check_inputs(uncertainty: np.ndarray, labels: np.ndarray | None, spacing: Sequence[float], threshold: int,
                  min_voxels: int, margin: int, ijk_to_ras: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(uncertainty, np.ndarray) or uncertainty.ndim != 3:
        raise ValueError(f"uncertainty must be a 3D (z, y, x) array, got {type(uncertainty).__name__} {getattr(uncertainty, 'shape', '')}")
    if uncertainty.dtype != np.uint8:
        raise TypeError(f"uncertainty must be uint8 (0 certain .. 255 maximal), got {uncertainty.dtype}")
    if labels is not None:
        if not isinstance(labels, np.ndarray) or labels.shape != uncertainty.shape:
            raise ValueError(f"labels must be an array of the uncertainty's shape {uncertainty.shape}, "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integer, got {labels.dtype}")
    if len(spacing) != 3 or not all(np.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (x, y, z) in mm, got {tuple(spacing)!r}")
    if not 1 <= int(threshold) <= 255:
        raise ValueError(f"threshold must be in 1..255 (uint8 scale), got {threshold}")
    if int(min_voxels) < 1:
        raise ValueError(f"min_voxels must be >= 1, got {min_voxels}")
    if int(margin) < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    matrix = None
    if ijk_to_ras is not None:
        matrix = np.asarray(ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}")
    return uncertainty, matrix


def _most_present(owners: np.ndarray, values: np.ndarray) -> dict[int, int]:
    """Owner -> the nonzero value it has most often (ties: the smaller value)."""
    keep = values > 0
    if not keep.any():
        return {}
    owners, values = owners[keep].astype(np.int64), values[keep].astype(np.int64)
    width = int(values.max()) + 1
    pair_counts = np.bincount(owners * width + values)
    pairs = np.flatnonzero(pair_counts)
    found_owner, found, counts = pairs // width, pairs % width, pair_counts[pairs]
    order = np.lexsort((found, -counts, found_owner))
    first = np.ones(order.size, dtype=bool)
    first[1:] = found_owner[order][1:] != found_owner[order][:-1]
    return dict(zip(found_owner[order][first].tolist(), found[order][first].tolist()))


def _shell_labels(labels: np.ndarray, ids: np.ndarray, zyx: np.ndarray, components: list[int], margin: int) -> dict[int, int]:
    """Component -> the label most present within ``margin`` voxels (chessboard) of its voxels.

    The same voxels a ``margin``-fold 26-connected dilation reaches, gathered for many small regions
    at once: each region voxel's ``(2 margin + 1)³`` neighbours, each neighbour counted once per region.
    """
    wanted = np.zeros(int(ids.max()) + 1, dtype=bool)
    wanted[components] = True
    select = wanted[ids]
    owners, points = ids[select].astype(np.int64), zyx[select]
    axis = np.arange(-margin, margin + 1)
    offsets = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    shape = np.array(labels.shape)
    size = int(labels.size)
    keys = []
    step = max(1, (1 << 22) // len(offsets))
    for begin in range(0, len(owners), step):
        near = points[begin : begin + step, None, :] + offsets[None, :, :]
        inside = np.all((near >= 0) & (near < shape), axis=2)
        flat = np.ravel_multi_index(tuple(near[inside].T), labels.shape)
        keys.append(np.repeat(owners[begin : begin + step], len(offsets))[inside.ravel()] * size + flat)
    unique = np.sort(np.concatenate(keys))  # sort + neighbour test: far faster than np.unique's hash here
    unique = unique[np.concatenate(([True], unique[1:] != unique[:-1]))]
    return _most_present(unique // size, labels.ravel()[unique % size])


def _region_label(labels: np.ndarray, components: np.ndarray, component: int, box: tuple[slice, ...], margin: int) -> int:
    """The label most present in a shell of ``margin`` voxels around a region; ties to the smaller value."""
    grown = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, labels.shape))
    mask = components[grown] == component
    if margin:
        mask = ndimage.binary_dilation(mask, structure=_FULL_CONNECTIVITY, iterations=margin)
    values = labels[grown][mask]
    values = values[values > 0]
    if values.size == 0:
        return 0
    found, counts = np.unique(values, return_counts=True)
    return int(found[np.argmax(counts)])


def rank_regions(uncertainty: np.ndarray, labels: np.ndarray | None, spacing: Sequence[float],
                 threshold: int = DEFAULT_THRESHOLD, *, min_voxels: int = 1, max_regions: int | None = None,
                 margin: int = 2, ijk_to_ras: np.ndarray | None = None) -> list[Region]:
    """Connected regions of uncertain voxels, the one holding the most uncertain volume first.

    Args:
        uncertainty: the uint8 map, shape ``(z, y, x)``; 0 certain … 255 maximally uncertain.
        labels: the segmentation on the same grid, shape ``(z, y, x)`` (integer label values), or
            ``None`` (every region then concerns label 0).
        spacing: voxel size in mm as ``(x, y, z)`` — the order of :attr:`image.Volume.spacing` and of
            Slicer's ``GetSpacing()``.
        threshold: voxels with a map value ``>= threshold`` are uncertain (1..255).
        min_voxels: regions with fewer uncertain voxels are left out (specks).
        max_regions: keep only this many of the best-ranked regions (``None``: all).
        margin: shell, in voxels, searched for the label a region concerns when none is inside it.
        ijk_to_ras: 4x4 matrix from ``(i, j, k, 1)`` to RAS mm (Slicer's ``GetIJKToRASMatrix``); gives
            each region's ``centre_ras``.

    Returns:
        The regions in rank order: uncertain volume descending, then summed uncertainty descending,
        then the region's first voxel in C order — deterministic for given inputs.

    Raises:
        ValueError, TypeError: on arrays of the wrong shape or type and out-of-range arguments.
    """
    uncertainty, matrix = _check_inputs(uncertainty, labels, spacing, threshold, min_voxels, margin, ijk_to_ras)
    if max_regions is not None and int(max_regions) < 0:
        raise ValueError(f"max_regions must be >= 0 or None, got {max_regions}")
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    mask = uncertainty >= np.uint8(threshold)
    # ndimage.label numbers components in C order of their first voxel: the last tie-breaker.
    components, count = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    if count == 0:
        return []
    flat = np.flatnonzero(mask)
    ids = components.ravel()[flat]
    values = uncertainty.ravel()[flat].astype(np.int64)
    sizes = np.bincount(ids, minlength=count + 1)
    sums = np.bincount(ids, weights=values, minlength=count + 1)
    peaks = np.zeros(count + 1, dtype=np.int64)
    np.maximum.at(peaks, ids, values)
    zyx = np.stack(np.unravel_index(flat, mask.shape), axis=1)
    mm = zyx * np.array([float(spacing[2]), float(spacing[1]), float(spacing[0])])
    centroid = np.stack([np.bincount(ids, weights=mm[:, a], minlength=count + 1) for a in range(3)], axis=1)
    centroid /= np.maximum(sizes, 1)[:, None]
    distance = ((mm - centroid[ids]) ** 2).sum(axis=1)
    # per component, the voxel nearest its centroid (ties: first in C order, as flat is sorted)
    order = np.lexsort((np.arange(flat.size), distance, ids))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    centre_of = np.zeros((count + 1, 3), dtype=np.int64)
    centre_of[ids[order][first]] = zyx[order][first]

    candidates = np.arange(1, count + 1)
    candidates = candidates[sizes[1:] >= int(min_voxels)]
    ranked = candidates[np.lexsort((candidates, -sums[candidates], -sizes[candidates]))]
    if max_regions is not None:
        ranked = ranked[: int(max_regions)]
    # bounding boxes from the uncertain voxels alone (no second pass over the whole grid)
    low = np.full((count + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    high = np.full((count + 1, 3), -1, dtype=np.int64)
    for axis in range(3):
        np.minimum.at(low[:, axis], ids, zyx[:, axis])
        np.maximum.at(high[:, axis], ids, zyx[:, axis])
    boxes = {c: tuple(slice(int(low[c, a]), int(high[c, a]) + 1) for a in range(3)) for c in ranked.tolist()}
    inside: dict[int, int] = {}
    shell: dict[int, int] = {}
    if labels is not None:
        inside = _most_present(ids, labels.ravel()[flat])
        alone = [c for c in ranked.tolist() if c not in inside]
        if margin and alone:
            # small regions all at once; the few large ones by dilating their own box
            small = [c for c in alone if sizes[c] <= _VECTOR_SHELL_VOXELS]
            shell = _shell_labels(labels, ids, zyx, small, int(margin)) if small else {}
            for c in alone:
                if sizes[c] > _VECTOR_SHELL_VOXELS:
                    shell[c] = _region_label(labels, components, c, boxes[c], int(margin))
    regions = []
    for rank, component in enumerate(ranked.tolist()):
        box = boxes[component]
        z, y, x = (int(v) for v in centre_of[component])
        ras = None
        if matrix is not None:
            ras = tuple(float(v) for v in (matrix @ np.array([x, y, z, 1.0]))[:3])
        label = inside.get(component, 0) or shell.get(component, 0)
        regions.append(Region(
            rank=rank, voxel_count=int(sizes[component]), volume_ml=float(sizes[component]) * voxel_ml,
            mean_uncertainty=float(sums[component] / sizes[component]), peak_uncertainty=int(peaks[component]),
            centre_zyx=(z, y, x), centre_ijk=(x, y, z), centre_ras=ras, label=label,
            bounds_zyx=tuple((int(s.start), int(s.stop)) for s in box)))  # type: ignore[arg-type]
    return regions


class RegionVisits:
    """Which ranked regions the user has visited, for the **Next uncertain region** button.

    Args:
        regions: the regions in rank order (as :func:`rank_regions` returns them).
    """

    def __init__(self, regions: Sequence[Region] = ()) -> None:
        self.reset(regions)

    def reset(self, regions: Sequence[Region] = ()) -> None:
        """Forget every visit and take a new list of regions (empty: no map)."""
        self.regions: list[Region] = list(regions)
        self.visited: set[int] = set()
        self.current: int | None = None

    def __len__(self) -> int:
        return len(self.regions)

    def next_index(self) -> int | None:
        """Index of the best-ranked region not visited yet, ``None`` when all were."""
        for index in range(len(self.regions)):
            if index not in self.visited:
                return index
        return None

    def visit(self, index: int | None = None) -> Region | None:
        """Mark a region visited and make it the current one.

        Args:
            index: the region's rank; ``None``: the next one not visited.

        Returns:
            The region, or ``None`` when every region was visited (or there are none).
        """
        if index is None:
            index = self.next_index()
            if index is None:
                return None
        if not 0 <= int(index) < len(self.regions):
            raise ValueError(f"region index {index} is out of range 0..{len(self.regions) - 1}")
        self.current = int(index)
        self.visited.add(self.current)
        return self.regions[self.current]

    def counter_text(self) -> str:
        """What the panel shows: ``"region 3 of 12"``, or the state when no region is current."""
        total = len(self.regions)
        if total == 0:
            return "no uncertain regions"
        if self.current is None:
            return f"{total} uncertain region{'s' if total != 1 else ''}"
        text = f"region {self.current + 1} of {total}"
        if len(self.visited) == total:
            text += " (all visited)"
        return text
