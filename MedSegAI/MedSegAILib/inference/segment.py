"""From checked input channels to a uint8 label map on exactly the first channel's grid.

Pipeline (memory bounded: never a float32 classes × volume array):

1. Reorient every channel to canonical LPS (a numpy *view*, no copy) and compute per-image
   intensity statistics once per channel.
2. 2D models: stream slabs of slices along the card's axis (axial = canonical z, coronal = y,
   sagittal = x). Each slab is normalised, resampled in-plane to the target spacing, predicted
   with 2D sliding windows, its probabilities are resampled back in-plane (linear, before
   argmax) and turned into labels that are written straight into the output array.
   3D models: the normalised volume is resampled to the model grid (float32, input-sized), 3D
   sliding windows stream finished z rows, which are interpolated back to the input grid (z
   first, then in-plane) a few rows at a time and turned into labels.
3. Labels are written through the canonical view of the output array, so the result is already
   in the original layout; each label's bounding box and the connected components that
   post-processing needs (islands, largest component) are gathered on the way, on the mapping
   thread (:mod:`components`). Then post-processing runs in place on that view: it only erases
   the pieces that go and fills holes.
4. With an ``uncertainty`` array, the same row-interpolated probabilities also give the
   normalised-entropy map (uint8, :mod:`uncertainty`), written through the same canonical view.

Threads: the network call releases the GIL, so preparing the next 2D slab and mapping finished
probabilities back (2D and 3D) run on worker threads while the network computes; at most one
task waits per thread, which keeps the memory bound.

Layouts: volumes ``(z, y, x)``; network batches channels-last ``(N, y, x, C)`` (2D) or
``(N, z, y, x, C)`` (3D) returning ``(N, ..., K)`` probabilities with class index == label value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import CancelledError, MedSegAIInputError
from ..core.image import Volume
from .components import StreamedComponents
from .postprocessing import component_labels, postprocess_in_place
from ..model.precision import PRECISIONS
from ..protocol import MODEL, POSTPROCESS, PREPROCESS, STITCH
from .preprocessing import (
    intensity_statistics,
    linear_weights,
    normalize,
    reorient_to_canonical,
    resample_axis_aligned,
    target_grid,
)
from .sliding_window import sliding_window_2d, sliding_window_3d, window_grid
from .uncertainty import entropy_uint8, normalized_entropy

__all__ = [
    "CPU_BATCH_PIXELS",
    "DEFAULT_BATCH_SIZE",
    "STREAM_BUDGET_BYTES",
    "SegmentOptions",
    "argmax_labels",
    "cpu_batch_size",
    "decide_labels",
    "segment_volumes",
    "upsample_argmax",
]

DEFAULT_BATCH_SIZE = {"2d": 8, "3d": 1}
# On a CPU the windows of one network call are computed one after the other: a larger batch buys
# no speed (ct-abdomen-organs, 200 windows of 208x256 on 2 cores, median of 3: 8.8 / 9.4 / 9.1 s
# fp32 and 6.8 / 7.2 / 6.6 s int8 at 16 / 8 / 4 windows per call), only memory (16 -> 8 windows:
# peak RSS 538 -> 474 MB for a 512x512x200 CT). So a CPU call holds at most this many input pixels.
CPU_BATCH_PIXELS = 8 * 256 * 256
# Size of the float32 working set (slab accumulators, back-mapping chunks) per streaming step.
STREAM_BUDGET_BYTES = 64 * 1024 * 1024
# upsample_argmax interpolates only label borders; above this fraction of output pixels, all of them.
_SPARSE_BORDER_FRACTION = 0.3
# upsample_argmax's marker of output pixels whose label must be interpolated (never a class index).
_UNDECIDED = 255
_SLICING_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}

ProgressFn = Callable[..., None]


@dataclass
class SegmentOptions:
    """Run-time choices that override the model card.

    Attributes:
        overlap: fraction of each window shared with its neighbours, in [0, 1).
        tta: flip test-time augmentation (average with the prediction of each axis flipped).
        batch_size: windows per network call; None uses the card's (or 8 in 2D, 1 in 3D), on a
            CPU at most :func:`cpu_batch_size` (the pipeline sets it from the predictor's device).
        postprocessing: keys merged over the card's ``postprocessing`` dict.
        precision: ``auto``, ``fp32`` or ``int8``: which ONNX file of the folder runs
            (:mod:`MedSegAILib.model.precision`); used where the predictor is loaded.
    """

    overlap: float = 0.5
    tta: bool = False
    batch_size: int | None = None
    postprocessing: dict[str, Any] | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        try:
            overlap = float(self.overlap)
        except (TypeError, ValueError) as e:
            raise ValueError(f"overlap must be a number in [0, 1), got {self.overlap!r}") from e
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        self.overlap = overlap
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or int(self.batch_size) < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        if self.postprocessing is not None and not isinstance(self.postprocessing, Mapping):
            raise TypeError(f"postprocessing must be a dict or None, got {type(self.postprocessing).__name__}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32 or int8, got {self.precision!r}")


def argmax_labels(probabilities: np.ndarray) -> np.ndarray:
    """uint8 index of the most probable class along the last axis (ties: lowest index)."""
    return np.argmax(probabilities, axis=-1).astype(np.uint8)


def upsample_argmax(probabilities: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """``argmax`` of the in-plane linear resampling of ``(n, a, b, K)`` probabilities, without most of its cost.

    Equal, voxel for voxel, to ``argmax_labels(resample_axis_aligned(probabilities, out_shape,
    order=1, axes=(1, 2)))``, which interpolates one in-plane axis and then the other, each output
    value a convex combination of two inputs with the same weights for every class. Where the
    inputs of such a combination share one argmax label, the result has that label too (float
    rounding is monotonic, so ties stay ties: lowest index). So the labels are decided at the
    input size first, and only output pixels whose two-by-two source block holds more than one
    label (label borders) are interpolated, with the same float32 operations in the same order as
    the dense path. No ``(n, A, b, K)`` or ``(n, A, B, K)`` float32 intermediate is built.

    Args:
        probabilities: ``(n, a, b, K)`` float32, class index == label value.
        out_shape: ``(A, B)`` in-plane output size.

    Returns:
        ``(n, A, B)`` uint8 labels.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be (n, a, b, K), got shape {probabilities.shape}")
    sizes = {1: int(out_shape[0]), 2: int(out_shape[1])}
    todo = [axis for axis in (1, 2) if sizes[axis] != probabilities.shape[axis]]
    todo.sort(key=lambda axis: sizes[axis] / probabilities.shape[axis])  # resample_axis_aligned's order
    if not todo:
        return argmax_labels(probabilities)
    if probabilities.dtype != np.float32:
        probabilities = probabilities.astype(np.float32)
    if probabilities.shape[-1] > _UNDECIDED:  # the marker below must not be a class
        return argmax_labels(resample_axis_aligned(probabilities, (sizes[1], sizes[2]), order=1, axes=(1, 2)))
    coarse = argmax_labels(probabilities)
    # A source pixel decides the output pixels interpolated from it and its next neighbour along
    # each resampled axis (itself at the far edge, as the clamped weights do) when they all agree.
    first = todo[0]
    decided = coarse == _next_along(coarse, first)
    if len(todo) == 2:
        second = todo[1]
        decided &= _next_along(decided, second)  # the two pixels after it along the second axis
        decided &= coarse == _next_along(coarse, second)
    code = np.where(decided, coarse, np.uint8(_UNDECIDED))
    weights = {axis: linear_weights(probabilities.shape[axis], sizes[axis]) for axis in todo}
    labels = code
    for axis in todo:
        labels = np.take(labels, weights[axis][0], axis=axis)
    undecided = np.nonzero(~decided)
    if undecided[0].size == 0:
        return labels
    unknown = _output_pixels(undecided, {axis: weights[axis][0] for axis in todo}, probabilities.shape)
    if unknown is None:  # speckled maps: interpolate every pixel
        return argmax_labels(resample_axis_aligned(probabilities, (sizes[1], sizes[2]), order=1, axes=(1, 2)))
    labels[unknown] = argmax_labels(_interpolate_at(probabilities, unknown, todo, weights))
    return labels


def _output_pixels(source: tuple[np.ndarray, ...], first_sources: Mapping[int, np.ndarray],
                   shape: Sequence[int]) -> tuple[np.ndarray, ...] | None:
    """The output pixels ``(n, A, B)`` whose first source pixel (``first_sources[axis][i]``) is in ``source``.

    ``np.nonzero`` of the taken map would find the same pixels (in another order) but scans the
    whole output; each source pixel owns a run of outputs per axis (the index maps are
    non-decreasing), so the runs are expanded instead. None when they exceed
    ``_SPARSE_BORDER_FRACTION`` of the output.
    """
    starts, counts = {}, {}
    for axis in (1, 2):
        if axis in first_sources:
            index = first_sources[axis]
            starts[axis] = np.searchsorted(index, source[axis], side="left")
            counts[axis] = np.searchsorted(index, source[axis], side="right") - starts[axis]
        else:
            starts[axis], counts[axis] = source[axis], np.ones_like(source[axis])
    per_pixel = counts[1] * counts[2]
    total = int(per_pixel.sum())
    out_size = shape[0] * np.prod([len(first_sources[a]) if a in first_sources else shape[a] for a in (1, 2)])
    if total > _SPARSE_BORDER_FRACTION * out_size:
        return None
    owner = np.repeat(np.arange(per_pixel.size), per_pixel)
    offset = np.arange(total) - np.repeat(np.cumsum(per_pixel) - per_pixel, per_pixel)
    width = counts[2][owner]
    return source[0][owner], starts[1][owner] + offset // width, starts[2][owner] + offset % width


def _next_along(array: np.ndarray, axis: int) -> np.ndarray:
    """``array`` shifted by one towards the start along ``axis``, the last entry repeated."""
    head = [slice(None)] * array.ndim
    head[axis] = slice(1, None)
    tail = [slice(None)] * array.ndim
    tail[axis] = slice(-1, None)
    return np.concatenate([array[tuple(head)], array[tuple(tail)]], axis=axis)


def _interpolate_at(probabilities: np.ndarray, where: tuple[np.ndarray, ...], todo: Sequence[int],
                    weights: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """``resample_axis_aligned(probabilities, ..., order=1)`` at the output pixels ``where`` only: ``(m, K)``.

    The axes in ``todo`` (one or two) are interpolated in that order with ``low + (high - low) * w``
    in float32, exactly as the dense resampling does. (No nested closures: a self-referencing one
    would keep ``probabilities``, a view of a whole slab, alive until the cyclic garbage collector ran.)
    """
    first = todo[0]
    fraction = weights[first][2][where[first]][:, None]
    if len(todo) == 1:
        return _lerp(_gather(probabilities, where, weights, {first: 0}),
                     _gather(probabilities, where, weights, {first: 1}), fraction)
    second = todo[1]
    low = _lerp(_gather(probabilities, where, weights, {first: 0, second: 0}),
                _gather(probabilities, where, weights, {first: 1, second: 0}), fraction)
    high = _lerp(_gather(probabilities, where, weights, {first: 0, second: 1}),
                 _gather(probabilities, where, weights, {first: 1, second: 1}), fraction)
    return _lerp(low, high, weights[second][2][where[second]][:, None])


def _gather(probabilities: np.ndarray, where: tuple[np.ndarray, ...],
            weights: Mapping[int, tuple[np.ndarray, np.ndarray, np.ndarray]], picks: Mapping[int, int]) -> np.ndarray:
    """``probabilities`` at the source pixels of ``where``: along each axis in ``picks``, its ``i0`` (0) or ``i1`` (1)."""
    index = [weights[axis][picks[axis]][where[axis]] if axis in picks else where[axis] for axis in range(3)]
    return probabilities[index[0], index[1], index[2]]


def _lerp(low: np.ndarray, high: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """``low + (high - low) * fraction`` in place in ``low`` (both fresh arrays)."""
    high -= low
    high *= fraction
    low += high
    return low


def decide_labels(config: Mapping[str, Any], labels: Sequence[Any], num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """The function turning ``(..., K)`` probabilities into uint8 labels.

    ``method: argmax`` (default) takes the most probable class. ``method: threshold`` takes, per
    voxel, the most probable foreground label among those whose probability reaches its
    threshold (``thresholds`` maps label name → value, default 0.5), else background.
    """
    method = config.get("method", "argmax") or "argmax"
    if method == "argmax":
        return argmax_labels
    if method != "threshold":
        raise MedSegAIInputError(f"post-processing method {method!r} is unknown; use 'argmax' or 'threshold'")
    thresholds = dict(config.get("thresholds") or {})
    names = {label.name: int(label.value) for label in labels}
    unknown = sorted(set(thresholds) - set(names))
    if unknown:
        raise MedSegAIInputError(f"thresholds name unknown label(s) {unknown}; use names from {sorted(names)}")
    limits = np.full(num_classes - 1, np.inf, dtype=np.float32)
    for name, value in names.items():
        limits[value - 1] = float(thresholds.get(name, 0.5))

    def threshold(probabilities: np.ndarray) -> np.ndarray:
        foreground = probabilities[..., 1:]
        passed = foreground >= limits
        best = np.argmax(np.where(passed, foreground, np.float32(-1.0)), axis=-1)
        return np.where(passed.any(axis=-1), best + 1, 0).astype(np.uint8)

    return threshold


class _Clock:
    """Seconds per stage, with the time spent inside ``predict`` counted as ``model``."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        self.seconds = {"preprocess": 0.0, "model": 0.0, "stitch": 0.0, "postprocess": 0.0}
        self._predict = predict

    def predict(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self._predict(batch)
        finally:
            self.seconds["model"] += time.perf_counter() - start


class _Background:
    """One worker thread running one task at a time, in order; errors surface in ``wait``."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsegai-map")
        self._pending: Any = None

    def submit(self, task: Callable[..., Any], *args: Any) -> None:
        """Wait for the previous task (at most one queued: bounded memory), then start ``task``."""
        self.wait()
        self._pending = self._pool.submit(task, *args)

    def wait(self) -> Any:
        """The running task's result (None when there is none)."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self._pool.shutdown(wait=True)


class _RowMapper:
    """Maps streamed probability rows (model grid) to labels on the input grid, a few rows at a time.

    Rows arrive along axis 0 in order; source rows are kept only while an output row still needs
    them. Probabilities are interpolated linearly (axis 0 first, at the model's in-plane size,
    then in-plane) before ``decide``; the labels are written into ``components.out``, a
    ``(n0, n1, n2)`` uint8 (possibly strided) view, and handed to ``components`` (label boxes and
    the connected components post-processing needs, gathered while the network runs). With
    ``uncertainty`` (a uint8 view laid out like ``components.out``), the normalised entropy of the
    same row-interpolated probabilities is computed at the model's in-plane size, interpolated
    in-plane and written there (:mod:`uncertainty`).
    """

    def __init__(self, source_rows: int, components: StreamedComponents, decide: Callable[[np.ndarray], np.ndarray], classes: int,
                 uncertainty: np.ndarray | None = None) -> None:
        self.out = components.out
        if uncertainty is not None and uncertainty.shape != self.out.shape:
            raise ValueError(f"uncertainty output shape {uncertainty.shape} differs from the labels' {self.out.shape}")
        self.uncertainty = uncertainty
        self.components = components
        self.decide = decide
        self.classes = classes
        self.identity_rows = source_rows == self.out.shape[0]
        if self.identity_rows:
            self.i0 = self.i1 = np.arange(self.out.shape[0], dtype=np.intp)
            self.weight = np.zeros(self.out.shape[0], dtype=np.float32)
        else:
            self.i0, self.i1, self.weight = linear_weights(source_rows, self.out.shape[0])
        self.next_row = 0
        self.next_source = 0
        self.buffer: np.ndarray | None = None
        self.buffer_start = 0
        self.seconds = 0.0

    def _chunk_rows(self) -> int:
        source = self.buffer.shape[1] * self.buffer.shape[2] if self.buffer is not None else 1
        per_row = max(source, self.out.shape[1] * self.out.shape[2]) * (self.classes + (self.uncertainty is not None)) * 4 * 3
        return max(1, STREAM_BUDGET_BYTES // per_row)

    def push(self, first: int, rows: np.ndarray) -> None:
        """Take source rows ``first .. first + len(rows)`` (``(n, a, b, K)`` float32)."""
        if first != self.next_source:
            raise ValueError(f"rows must arrive in order without gaps: expected row {self.next_source}, got {first}")
        self.next_source = first + len(rows)
        if self.buffer is None or len(self.buffer) == 0:
            self.buffer, self.buffer_start = rows, first
        else:
            self.buffer = np.concatenate([self.buffer, rows], axis=0)
        started = time.perf_counter()
        ready = int(np.searchsorted(self.i1, self.next_source, side="left"))  # outputs whose sources all arrived
        step = self._chunk_rows()
        for start in range(self.next_row, ready, step):
            stop = min(start + step, ready)
            labels = self._labels(start, stop)
            self.out[start:stop] = labels
            self.components.add(start, labels)
            del labels
        self.next_row = max(self.next_row, ready)
        if self.next_row < len(self.i0):
            keep = int(self.i0[self.next_row]) - self.buffer_start
            if keep > 0:
                self.buffer = self.buffer[keep:].copy()
                self.buffer_start += keep
        else:
            self.buffer = None
        self.seconds += time.perf_counter() - started

    def _labels(self, start: int, stop: int) -> np.ndarray:
        if self.identity_rows:
            probabilities = self.buffer[start - self.buffer_start : stop - self.buffer_start]
        else:
            probabilities = self.buffer[self.i0[start:stop] - self.buffer_start]
            high = self.buffer[self.i1[start:stop] - self.buffer_start]
            high -= probabilities
            high *= self.weight[start:stop, None, None, None]
            probabilities += high
            del high
        if self.uncertainty is not None:
            entropy = normalized_entropy(probabilities)
            if entropy.shape[1:3] != self.out.shape[1:3]:
                entropy = resample_axis_aligned(entropy, self.out.shape[1:3], order=1, axes=(1, 2))
            self.uncertainty[start:stop] = entropy_uint8(entropy)
            del entropy
        if self.decide is argmax_labels:
            return upsample_argmax(probabilities, self.out.shape[1:3])
        resampled = resample_axis_aligned(probabilities, self.out.shape[1:3], order=1, axes=(1, 2))
        return self.decide(resampled)

    def check_complete(self) -> None:
        if self.next_row != self.out.shape[0]:
            raise RuntimeError(f"only {self.next_row} of {self.out.shape[0]} rows were mapped back")


def _report(progress: ProgressFn | None, stage: str, done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(stage, done, total, message)


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("segmentation cancelled")


def cpu_batch_size(card: Any) -> int:
    """Windows per network call on a CPU: the card's batch, capped at :data:`CPU_BATCH_PIXELS` pixels.

    Args:
        card: a model card (``spatial.mode``, ``spatial.patch_size``, ``spatial.batch_size``).

    Returns:
        ``min(card batch, CPU_BATCH_PIXELS // window pixels)``, at least 1 (3D: pixels of the
        whole ``(z, y, x)`` window).
    """
    pixels = math.prod(int(p) for p in card.spatial.patch_size)
    return max(1, min(_card_batch_size(card), CPU_BATCH_PIXELS // max(1, pixels)))


def _card_batch_size(card: Any) -> int:
    """The card's windows per call, else :data:`DEFAULT_BATCH_SIZE` for its mode."""
    return int(getattr(card.spatial, "batch_size", None) or DEFAULT_BATCH_SIZE[card.spatial.mode])


def _check_inputs(volumes: Sequence[Volume], card: Any) -> None:
    if isinstance(volumes, Volume) or not isinstance(volumes, Sequence) or not volumes:
        raise TypeError("volumes must be a non-empty list of Volume objects, one per model channel")
    names = [channel.name for channel in card.channels]
    if len(volumes) != len(names):
        raise MedSegAIInputError(
            f"the model needs {len(names)} input channel(s) ({', '.join(names)}) but {len(volumes)} "
            f"image(s) were given; give one image per channel in this order"
        )
    first = volumes[0]
    for name, volume in zip(names, volumes):
        if np.asarray(volume.array).ndim != 3:
            raise MedSegAIInputError(f"channel {name!r} is not a 3D image (shape {volume.array.shape}); give a 3D volume")
        if volume.array.shape != first.array.shape:
            raise MedSegAIInputError(
                f"channel {name!r} has shape {volume.array.shape} but the first channel has {first.array.shape}; "
                f"resample all channels onto the first channel's grid"
            )
    if card.spatial.mode not in ("2d", "3d"):
        raise ValueError(f"card.spatial.mode must be '2d' or '3d', got {card.spatial.mode!r}")


def _segment_2d(
    views: list[np.ndarray],
    out: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    card: Any,
    specs: list[Mapping[str, Any]],
    stats: list[dict[str, float]],
    decide: Callable[[np.ndarray], np.ndarray],
    tracked: list[int],
    clock: _Clock,
    options: SegmentOptions,
    batch_size: int,
    progress: ProgressFn | None,
    should_cancel: Callable[[], bool] | None,
    uncertainty: np.ndarray | None = None,
) -> StreamedComponents:
    spatial = card.spatial
    axis = _SLICING_AXIS.get(getattr(spatial, "axis", None) or "axial")
    if axis is None:
        raise ValueError(f"card.spatial.axis must be axial, coronal or sagittal, got {spatial.axis!r}")
    slabs = [np.moveaxis(view, axis, 0) for view in views]  # (S, rows, cols) views
    out_slices = np.moveaxis(out, axis, 0)
    count, rows, cols = slabs[0].shape
    target = list(spatial.target_spacing) if spatial.target_spacing is not None else [None, None, None]
    target[2 - axis] = None  # slices are independent: never resample across them
    shape_zyx = tuple(out.shape)
    model_shape, _ = target_grid(shape_zyx, spacing_zyx[::-1], target)
    plane = tuple(n for a, n in enumerate(model_shape) if a != axis)
    patch = tuple(int(p) for p in spatial.patch_size)
    if len(patch) != 2:
        raise ValueError(f"a 2d model needs a (y, x) patch_size, got {patch}")
    channels, classes = len(views), int(card.num_classes)
    per_slice = len(window_grid(plane, patch, options.overlap))
    slice_bytes = 4 * (plane[0] * plane[1] * (classes + 2 * channels) + rows * cols * (classes + channels))
    slab_size = max(STREAM_BUDGET_BYTES // slice_bytes, math.ceil(batch_size / per_slice), 1)
    slab_size = min(count, slab_size)
    axes = [axis] + [a for a in range(3) if a != axis]
    components = StreamedComponents(out_slices, classes - 1, tracked, axes)
    mapper = _RowMapper(count, components, decide, classes,
                        None if uncertainty is None else np.moveaxis(uncertainty, axis, 0))
    divisible_by = int(getattr(spatial, "divisible_by", 1) or 1)
    _SlabStream(
        slabs, mapper, plane, patch, slab_size, specs, stats, clock, options, batch_size, divisible_by,
        bool(getattr(card, "window_size_free", False)), per_slice, progress, should_cancel,
    ).run()
    mapper.check_complete()
    clock.seconds["stitch"] += mapper.seconds
    return components


@dataclass
class _SlabStream:
    """The 2D loop: slabs of slices are preprocessed one ahead on a thread, predicted here, and
    mapped back on another thread while the next slab is predicted (numpy, SciPy and ONNX Runtime
    release the GIL), so the cores stay busy with the network."""

    slabs: list[np.ndarray]
    mapper: _RowMapper
    plane: tuple[int, ...]
    patch: tuple[int, ...]
    slab_size: int
    specs: list[Mapping[str, Any]]
    stats: list[dict[str, float]]
    clock: _Clock
    options: SegmentOptions
    batch_size: int
    divisible_by: int
    fit_window: bool
    per_slice: int
    progress: ProgressFn | None
    should_cancel: Callable[[], bool] | None

    def prepare(self, first: int) -> tuple[np.ndarray, float]:
        """Normalised, in-plane resampled ``(n, y, x, C)`` float32 batch of one slab, and its seconds."""
        start = time.perf_counter()
        last = min(len(self.slabs[0]), first + self.slab_size)
        batch = np.empty((last - first,) + self.plane + (len(self.slabs),), dtype=np.float32)
        for c, slab in enumerate(self.slabs):
            normalised = normalize(slab[first:last], self.specs[c], self.stats[c])
            batch[..., c] = resample_axis_aligned(normalised, self.plane, order=1, axes=(1, 2))
            del normalised
        return batch, time.perf_counter() - start

    def run(self) -> None:
        count = len(self.slabs[0])
        total_windows = count * self.per_slice
        firsts = list(range(0, count, self.slab_size))
        with _Background() as prefetch, _Background() as mapping:
            prefetch.submit(self.prepare, firsts[0])
            for index, first in enumerate(firsts):
                _check_cancel(self.should_cancel)
                batch, seconds = prefetch.wait()
                self.clock.seconds["preprocess"] += seconds
                if index + 1 < len(firsts):
                    prefetch.submit(self.prepare, firsts[index + 1])
                done = first * self.per_slice
                start, model_before = time.perf_counter(), self.clock.seconds["model"]
                probabilities = sliding_window_2d(
                    batch,
                    self.clock.predict,
                    self.patch,
                    self.options.overlap,
                    self.batch_size,
                    tta=self.options.tta,
                    divisible_by=self.divisible_by,
                    fit_window=self.fit_window,
                    num_classes=self.mapper.classes,
                    progress=lambda d, t, offset=done: _report(self.progress, MODEL, offset + d, total_windows),
                    should_cancel=self.should_cancel,
                )
                del batch
                model_seconds = self.clock.seconds["model"] - model_before
                self.clock.seconds["stitch"] += time.perf_counter() - start - model_seconds
                mapping.submit(self.mapper.push, first, probabilities)
                del probabilities
            mapping.wait()


def _segment_3d(
    views: list[np.ndarray],
    out: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    card: Any,
    specs: list[Mapping[str, Any]],
    stats: list[dict[str, float]],
    decide: Callable[[np.ndarray], np.ndarray],
    tracked: list[int],
    clock: _Clock,
    options: SegmentOptions,
    batch_size: int,
    progress: ProgressFn | None,
    should_cancel: Callable[[], bool] | None,
    uncertainty: np.ndarray | None = None,
) -> StreamedComponents:
    spatial = card.spatial
    patch = tuple(int(p) for p in spatial.patch_size)
    if len(patch) != 3:
        raise ValueError(f"a 3d model needs a (z, y, x) patch_size, got {patch}")
    model_shape, _ = target_grid(tuple(out.shape), spacing_zyx[::-1], spatial.target_spacing)
    channels, classes = len(views), int(card.num_classes)

    start = time.perf_counter()
    image: np.ndarray | None = None
    for c in range(channels):
        _check_cancel(should_cancel)
        resampled = resample_axis_aligned(normalize(views[c], specs[c], stats[c]), model_shape, order=1)
        if channels == 1:
            image = resampled[..., None]
        else:
            if image is None:
                image = np.empty(tuple(model_shape) + (channels,), dtype=np.float32)
            image[..., c] = resampled
        del resampled
        _report(progress, PREPROCESS, c + 1, channels)
    clock.seconds["preprocess"] += time.perf_counter() - start

    start, model_before = time.perf_counter(), clock.seconds["model"]
    components = StreamedComponents(out, classes - 1, tracked)
    mapper = _RowMapper(model_shape[0], components, decide, classes, uncertainty)
    total_windows = len(window_grid(model_shape, patch, options.overlap))
    with _Background() as mapping:  # finished rows are mapped back while the next windows run
        sliding_window_3d(
            image,
            clock.predict,
            patch,
            options.overlap,
            batch_size,
            tta=options.tta,
            divisible_by=int(getattr(spatial, "divisible_by", 1) or 1),
            num_classes=classes,
            consumer=lambda first, rows: mapping.submit(mapper.push, first, rows),
            progress=lambda d, t: _report(progress, MODEL, d, total_windows),
            should_cancel=should_cancel,
        )
        mapping.wait()
    mapper.check_complete()
    clock.seconds["stitch"] += time.perf_counter() - start - (clock.seconds["model"] - model_before)
    return components


def segment_volumes(
    volumes: Sequence[Volume],
    card: Any,
    predict: Any,
    options: SegmentOptions | None = None,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    timings: dict[str, float] | None = None,
    uncertainty: np.ndarray | None = None,
) -> Volume:
    """Segment one case: channels on one grid in, uint8 labels on exactly the same grid out.

    Args:
        volumes: one :class:`Volume` per model channel, in the card's channel order, all with the
            first one's shape (``validation.check_channels`` resamples them beforehand).
        card: the model card (``channels``, ``labels``, ``num_classes``, ``spatial``,
            ``postprocessing``).
        predict: a callable or an object with ``.predict``: float32 channels-last batch →
            float32 probabilities ``(N, ..., K)``, class index == label value.
        options: overlap, TTA, batch size and post-processing overrides.
        progress: ``progress(stage, done, total, message="")`` with stages ``preprocess``,
            ``model`` (windows), ``stitch``, ``postprocess``.
        should_cancel: polled between batches and slabs; True raises :class:`errors.CancelledError`.
        timings: when given, filled with seconds for ``preprocess``, ``model`` (inside
            ``predict`` only), ``stitch`` (blending, mapping back, argmax) and ``postprocess``.
        uncertainty: when given, a uint8 ``(z, y, x)`` array of the first volume's shape that is
            filled with the uncertainty map (:mod:`uncertainty`: 0 certain … 255 maximal), made
            in the same streamed pass as the labels (before post-processing).

    Returns:
        A uint8 ``(z, y, x)`` label :class:`Volume` with the first volume's shape, spacing, origin
        and direction.
    """
    options = options if options is not None else SegmentOptions()
    if not isinstance(options, SegmentOptions):
        raise TypeError(f"options must be SegmentOptions or None, got {type(options).__name__}")
    _check_inputs(volumes, card)
    if uncertainty is not None:
        if not isinstance(uncertainty, np.ndarray) or uncertainty.dtype != np.uint8:
            raise TypeError(f"uncertainty must be a uint8 numpy array or None, got {type(uncertainty).__name__}")
        if uncertainty.shape != np.asarray(volumes[0].array).shape:
            raise ValueError(f"uncertainty has shape {uncertainty.shape}, the input {np.asarray(volumes[0].array).shape}")
    network = getattr(predict, "predict", predict)
    if not callable(network):
        raise TypeError(f"predict must be callable or have a .predict method, got {type(predict).__name__}")
    clock = _Clock(network)
    config = {**dict(getattr(card, "postprocessing", None) or {}), **dict(options.postprocessing or {})}
    classes = int(card.num_classes)
    decide = decide_labels(config, card.labels, classes)
    names = {int(label.value): label.name for label in card.labels}
    tracked = component_labels(config, names, classes - 1)  # checks the post-processing options before any work
    mode = card.spatial.mode
    batch_size = int(options.batch_size or _card_batch_size(card))

    start = time.perf_counter()
    _report(progress, PREPROCESS, 0, len(volumes))
    first = volumes[0]
    view, reorientation = reorient_to_canonical(np.asarray(first.array), first.direction, first.spacing, first.origin)
    views = [view] + [reorientation.to_canonical(np.asarray(v.array)) for v in volumes[1:]]
    specs = [dict(channel.normalization) for channel in card.channels]
    stats = []
    for channel_view, spec in zip(views, specs):
        _check_cancel(should_cancel)
        stats.append(intensity_statistics(channel_view, spec))
    labels = np.zeros(first.array.shape, dtype=np.uint8)
    labels_view = reorientation.to_canonical(labels)  # writes land in the original layout
    spacing_zyx = tuple(reorientation.spacing[::-1])
    clock.seconds["preprocess"] += time.perf_counter() - start
    if mode == "2d":
        _report(progress, PREPROCESS, len(volumes), len(volumes))

    segment = _segment_2d if mode == "2d" else _segment_3d
    uncertainty_view = None if uncertainty is None else reorientation.to_canonical(uncertainty)
    components = segment(
        views, labels_view, spacing_zyx, card, specs, stats, decide, tracked, clock, options, batch_size, progress, should_cancel,
        uncertainty_view,
    )
    _report(progress, STITCH, 1, 1)

    _check_cancel(should_cancel)
    start = time.perf_counter()
    _report(progress, POSTPROCESS, 0, 1)
    postprocess_in_place(labels_view, spacing_zyx, config, names, components=components)
    clock.seconds["postprocess"] += time.perf_counter() - start
    _report(progress, POSTPROCESS, 1, 1)
    if timings is not None:
        timings.update(clock.seconds)
    return Volume(
        array=labels,
        spacing=tuple(first.spacing),
        origin=tuple(first.origin),
        direction=np.array(first.direction, dtype=float, copy=True),
        metadata={},
    )
