"""Sliding-window prediction with Gaussian blending and bounded memory.

Array layouts (channels-last, like Keras):

- 2D: the input is a slab of slices ``(S, y, x, C)`` float32; the network gets batches of
  ``(N, py, px, C)`` and returns ``(N, py, px, K)`` probabilities. The result is ``(S, y, x, K)``.
- 3D: the input is ``(z, y, x, C)`` float32; batches are ``(N, pz, py, px, C)`` → ``(N, pz, py, px, K)``.
  Windows are visited in z order and only the z range still covered by unvisited windows is
  held in float32 accumulators; finished rows are handed to a consumer ``(z0, probs)`` with
  ``probs`` of shape ``(n, y, x, K)``.

Windows are spread evenly (first at 0, last ending exactly at the border); an axis shorter than
the patch is zero-padded symmetrically on the fly (no padded copy of the input) and the padding is
cropped from the result. In 2D, for a network whose output does not depend on the padding
(``fit_window``: batch normalisation, ``ModelCard.window_size_free``) and whose down-sampling
factor is declared (``divisible_by`` > 1), such an axis is padded only to the next multiple of it,
not to the whole patch (:func:`fitted_patch`): a 202-pixel axis under a 256 patch runs as 208,
19 % less network work for the same one window per slice. Overlapping predictions are blended with a Gaussian importance map
(σ = patch × ``sigma_scale``): ``sum(w · p) / sum(w)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..core.errors import CancelledError, ModelFolderError

__all__ = [
    "gaussian_importance_map",
    "window_starts",
    "window_grid",
    "fitted_patch",
    "sliding_window_2d",
    "sliding_window_3d",
    "PredictFn",
    "WindowProgress",
]

PredictFn = Callable[[np.ndarray], np.ndarray]
WindowProgress = Callable[[int, int], None]
RowConsumer = Callable[[int, np.ndarray], None]

_IMPORTANCE_FLOOR = 1e-3
# Finished 3D rows are handed to the consumer in pieces of about this size.
_FLUSH_BYTES = 32 * 1024 * 1024


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights for blending overlapping windows.

    Args:
        patch_size: window shape in array order, ``(py, px)`` or ``(pz, py, px)``.
        sigma_scale: σ as a fraction of the patch size along each axis (0.125 → σ = patch / 8).

    Returns:
        float32 array of shape ``patch_size``, centred Gaussian, maximum 1, clipped below at
        ``1e-3`` so that window borders never get zero weight.
    """
    patch = tuple(int(p) for p in patch_size)
    if not patch or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be positive integers, got {tuple(patch_size)!r}")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    weights = np.ones((), dtype=np.float64)
    for p in patch:
        sigma = p * sigma_scale
        distance = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        profile = np.exp(-0.5 * (distance / sigma) ** 2)
        weights = np.multiply.outer(weights, profile)
    weights /= weights.max()
    return np.maximum(weights, _IMPORTANCE_FLOOR).astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows along one axis.

    The first window starts at 0 and the last one ends exactly at ``size``; windows are spread
    evenly with a step of at most ``max(1, floor(patch * (1 - overlap)))``. When ``size <= patch``
    there is a single window at 0 (the caller pads the axis to ``patch``).

    Args:
        size: length of the axis.
        patch: window length.
        overlap: fraction of the window shared by neighbours, ``0 <= overlap < 1``.
    """
    size, patch = int(size), int(patch)
    if size < 1 or patch < 1:
        raise ValueError(f"size and patch must be >= 1, got size={size}, patch={patch}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if size <= patch:
        return [0]
    max_step = max(1, int(math.floor(patch * (1.0 - float(overlap)) + 1e-9)))
    count = math.ceil((size - patch) / max_step) + 1
    step = (size - patch) / (count - 1)
    return [int(round(i * step)) for i in range(count)]


def _axis_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts in array coordinates; negative (centred padding) when the axis is short."""
    if size < patch:
        return [-((patch - size) // 2)]
    return window_starts(size, patch, overlap)


def window_grid(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """All window start tuples for an array ``shape`` (row-major order: first axis slowest).

    Starts may be negative on axes shorter than the patch (symmetric zero padding).
    """
    if len(shape) != len(patch_size):
        raise ValueError(f"shape {tuple(shape)} and patch_size {tuple(patch_size)} differ in length")
    per_axis = [_axis_starts(n, p, overlap) for n, p in zip(shape, patch_size)]
    grid = np.stack(np.meshgrid(*[np.asarray(s) for s in per_axis], indexing="ij"), axis=-1)
    return [tuple(int(v) for v in row) for row in grid.reshape(-1, len(shape))]


def fitted_patch(shape: Sequence[int], patch_size: Sequence[int], divisible_by: int) -> tuple[int, ...]:
    """The window actually run: ``patch_size``, shrunk on axes the image does not fill.

    A fully convolutional network takes any size that is a multiple of its down-sampling factor.
    On an axis shorter than the patch there is one window either way; padding it only to the next
    multiple of ``divisible_by`` instead of to the whole patch gives the network less to compute.

    Args:
        shape: the image's size per axis (array order).
        patch_size: the card's window, same order.
        divisible_by: the network's down-sampling factor; 1 means "not declared", and then the
            patch is kept whole (a network's constraint is unknown).

    Returns:
        The window per axis: ``min(patch, ceil(size / divisible_by) × divisible_by)`` where
        ``divisible_by`` > 1, else ``patch_size`` unchanged.

    Raises:
        ValueError: ``shape`` and ``patch_size`` differ in length, or a size is below 1.
    """
    if len(shape) != len(patch_size):
        raise ValueError(f"shape {tuple(shape)} and patch_size {tuple(patch_size)} differ in length")
    if any(int(n) < 1 for n in shape) or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"shape {tuple(shape)} and patch_size {tuple(patch_size)} must be positive")
    step = int(divisible_by)
    if step <= 1:
        return tuple(int(p) for p in patch_size)
    return tuple(min(int(p), -(-int(n) // step) * step) for n, p in zip(shape, patch_size))


def _crop(start: int, patch: int, size: int) -> tuple[slice, slice]:
    """(slice in the array, slice in the window) of the part of a window inside the array."""
    low, high = max(start, 0), min(start + patch, size)
    return slice(low, high), slice(low - start, high - start)


def _check_patch(patch_size: Sequence[int], dims: int, divisible_by: int) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != dims or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be {dims} positive integers, got {tuple(patch_size)!r}")
    if int(divisible_by) < 1:
        raise ValueError(f"divisible_by must be >= 1, got {divisible_by!r}")
    if any(p % int(divisible_by) for p in patch):
        raise ValueError(f"patch_size {patch} is not divisible by divisible_by={divisible_by}")
    return patch


def _check_common(array: np.ndarray, dims: int, overlap: float, batch_size: int, name: str) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 4 or min(array.shape) < 1:
        layout = "(S, y, x, C)" if dims == 2 else "(z, y, x, C)"
        raise ValueError(f"{name} must be a non-empty {layout} array, got shape {array.shape}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")


def _batches(count: int, batch_size: int) -> Iterator[range]:
    for first in range(0, count, batch_size):
        yield range(first, min(first + batch_size, count))


class _Predictor:
    """Calls the network with optional flip TTA and checks the output layout once."""

    def __init__(self, predict: PredictFn, spatial: int, tta: bool, num_classes: int | None) -> None:
        if not callable(predict):
            raise TypeError(f"predict must be callable, got {type(predict).__name__}")
        self.predict = predict
        self.spatial = spatial
        self.tta = bool(tta)
        self.num_classes = num_classes

    def _call(self, batch: np.ndarray) -> np.ndarray:
        output = np.asarray(self.predict(batch))
        expected = batch.shape[:-1]
        if output.ndim != batch.ndim or output.shape[:-1] != expected:
            raise ModelFolderError(
                f"the model returned an array of shape {output.shape} for input {batch.shape}; "
                f"a segmentation model must return (N, ..., classes) with the input's spatial size"
            )
        if self.num_classes is None:
            self.num_classes = int(output.shape[-1])
        elif output.shape[-1] != self.num_classes:
            raise ModelFolderError(
                f"the model returned {output.shape[-1]} classes but its model card declares "
                f"{self.num_classes} (background + labels); fix the labels in model.json"
            )
        return output

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for ``batch`` as a float32 array that the caller may modify."""
        result = self._call(batch)
        if result.dtype != np.float32 or not result.flags.writeable or np.may_share_memory(result, batch):
            result = result.astype(np.float32, copy=True)
        if not self.tta:
            return result
        for axis in range(1, 1 + self.spatial):
            flipped = np.ascontiguousarray(np.flip(batch, axis=axis))
            result += np.flip(self._call(flipped), axis=axis)
        result *= np.float32(1.0 / (1 + self.spatial))
        return result


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("segmentation cancelled")


def sliding_window_2d(
    slab: np.ndarray,
    predict: PredictFn,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 8,
    *,
    tta: bool = False,
    divisible_by: int = 1,
    fit_window: bool = False,
    num_classes: int | None = None,
    importance_map: np.ndarray | None = None,
    progress: WindowProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Predict every slice of a slab with 2D sliding windows and Gaussian blending.

    Args:
        slab: ``(S, y, x, C)`` float32 normalised slices (any strides).
        predict: network, ``(N, py, px, C)`` float32 → ``(N, py, px, K)`` probabilities.
        patch_size: ``(py, px)``.
        overlap: window overlap fraction in [0, 1).
        batch_size: windows per ``predict`` call (windows of several slices share a batch).
        tta: average the prediction with those of the images flipped along y and along x.
        divisible_by: the patch size must be a multiple of it (network down-sampling factor).
        fit_window: the network's output does not depend on the padding (no instance
            normalisation): with ``divisible_by`` > 1, an axis shorter than the patch runs padded
            only to its next multiple (:func:`fitted_patch`).
        num_classes: expected K (checked); taken from the first output when None.
        importance_map: ``(py, px)`` blending weights; Gaussian σ = patch/8 by default. Given,
            the patch is used whole.
        progress: called as ``progress(windows_done, windows_total)`` after each batch.
        should_cancel: checked before each batch; True raises :class:`errors.CancelledError`.

    Returns:
        ``(S, y, x, K)`` float32 blended probabilities (the slab's memory is the only
        volume-sized allocation: the accumulator is exactly this array). With one window per
        slice and the whole slab in one ``predict`` call it is a cropped view of the network's
        output (nothing to blend, nothing copied).
    """
    _check_common(slab, 2, overlap, batch_size, "slab")
    patch = _check_patch(patch_size, 2, divisible_by)
    slices, height, width, channels = slab.shape
    if fit_window and importance_map is None:
        patch = fitted_patch((height, width), patch, divisible_by)
    starts = window_grid((height, width), patch, overlap)
    crops = [(_crop(sy, patch[0], height), _crop(sx, patch[1], width)) for sy, sx in starts]
    single_window = len(crops) == 1  # one window per slice: nothing to blend, no weights needed
    if importance_map is not None:
        weights = np.asarray(importance_map, np.float32)
        if weights.shape != patch:
            raise ValueError(f"importance_map shape {weights.shape} differs from patch_size {patch}")
    elif not single_window:
        weights = gaussian_importance_map(patch)

    network = _Predictor(predict, 2, tta, num_classes)
    windows = [(s, w) for s in range(slices) for w in range(len(crops))]
    total = len(windows)
    accumulator: np.ndarray | None = None
    batch_buffer = np.zeros((min(batch_size, total),) + patch + (channels,), dtype=np.float32)
    done = 0
    for indices in _batches(total, int(batch_size)):
        _check_cancel(should_cancel)
        batch = batch_buffer[: len(indices)]
        for b, n in enumerate(indices):
            s, w = windows[n]
            (ay, wy), (ax, wx) = crops[w]
            if batch.shape[1:3] != (wy.stop - wy.start, wx.stop - wx.start):
                batch[b] = 0.0
            batch[b, wy, wx] = slab[s, ay, ax]
        probabilities = network(batch)
        done += len(indices)
        if single_window:  # nothing to blend: the (cropped) prediction is the result
            (_, wy), (_, wx) = crops[0]
            if len(indices) == total:  # the whole slab in one call: no copy at all
                if progress is not None:
                    progress(done, total)
                return probabilities[:, wy, wx]
            if accumulator is None:
                accumulator = np.empty((slices, height, width, probabilities.shape[-1]), dtype=np.float32)
            accumulator[indices.start : indices.stop] = probabilities[:, wy, wx]
        else:
            if accumulator is None:
                accumulator = np.zeros((slices, height, width, probabilities.shape[-1]), dtype=np.float32)
            probabilities *= weights[None, ..., None]
            for b, n in enumerate(indices):
                s, w = windows[n]
                (ay, wy), (ax, wx) = crops[w]
                accumulator[s, ay, ax] += probabilities[b, wy, wx]
        del probabilities  # free before the next batch is predicted
        if progress is not None:
            progress(done, total)
    if accumulator is None:
        raise RuntimeError("no window was predicted")  # unreachable: the slab is non-empty
    if not single_window:
        weight_sum = np.zeros((height, width), dtype=np.float32)
        for (ay, wy), (ax, wx) in crops:
            weight_sum[ay, ax] += weights[wy, wx]
        accumulator *= (1.0 / weight_sum)[..., None]
    return accumulator


class _RowAccumulator:
    """Float32 sums over the open z range ``[base, top)`` of a 3D prediction, in a ring buffer.

    Row ``z`` lives at buffer row ``z % capacity``, so advancing ``base`` never moves data.
    """

    def __init__(self, capacity: int, plane: tuple[int, int], classes: int) -> None:
        self.plane = plane
        self.classes = classes
        self.values = np.zeros((capacity,) + plane + (classes,), dtype=np.float32)
        self.weights = np.zeros((capacity,) + plane, dtype=np.float32)
        self.base = 0
        self.top = 0

    def _parts(self, start: int, stop: int) -> list[tuple[slice, slice]]:
        """(buffer rows, relative rows) pieces of the z range ``[start, stop)``."""
        capacity = self.values.shape[0]
        first, count = start % capacity, stop - start
        if first + count <= capacity:
            return [(slice(first, first + count), slice(0, count))]
        head = capacity - first
        return [(slice(first, capacity), slice(0, head)), (slice(0, count - head), slice(head, count))]

    def ensure(self, top: int) -> None:
        """Make rows up to ``top`` (exclusive) addressable (grows the ring when needed)."""
        needed = top - self.base
        if needed > self.values.shape[0]:
            values = np.zeros((needed,) + self.plane + (self.classes,), dtype=np.float32)
            weights = np.zeros((needed,) + self.plane, dtype=np.float32)
            for rows, relative in self._parts(self.base, self.top):
                z = np.arange(self.base + relative.start, self.base + relative.stop) % needed
                values[z] = self.values[rows]
                weights[z] = self.weights[rows]
            self.values, self.weights = values, weights
        self.top = max(self.top, top)

    def add(self, z: slice, y: slice, x: slice, probabilities: np.ndarray, weights: np.ndarray) -> None:
        for rows, relative in self._parts(z.start, z.stop):
            self.values[rows, y, x] += probabilities[relative]
            self.weights[rows, y, x] += weights[relative]

    def pop(self, stop: int) -> np.ndarray:
        """Blended probabilities of rows ``[base, stop)``; they leave the accumulator."""
        result = np.empty((stop - self.base,) + self.plane + (self.classes,), dtype=np.float32)
        for rows, relative in self._parts(self.base, stop):
            np.divide(self.values[rows], self.weights[rows][..., None], out=result[relative])
            self.values[rows] = 0.0
            self.weights[rows] = 0.0
        self.base = stop
        self.top = max(self.top, stop)
        return result


def _flush(accumulator: _RowAccumulator, stop: int, sink: RowConsumer) -> None:
    """Hand rows ``[base, stop)`` to ``sink`` in pieces of about ``_FLUSH_BYTES``."""
    row_bytes = max(1, accumulator.values[0].nbytes)
    step = max(1, _FLUSH_BYTES // row_bytes)
    while accumulator.base < stop:
        first = accumulator.base
        sink(first, accumulator.pop(min(stop, first + step)))


def sliding_window_3d(
    volume: np.ndarray,
    predict: PredictFn,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 1,
    *,
    tta: bool = False,
    divisible_by: int = 1,
    num_classes: int | None = None,
    importance_map: np.ndarray | None = None,
    consumer: RowConsumer | None = None,
    progress: WindowProgress | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> np.ndarray | None:
    """Predict a volume with 3D sliding windows, streaming finished z rows to ``consumer``.

    Memory: besides the input, only the accumulators for the z range that the current window
    row covers are held (``pz × y × x × (K + 1)`` float32); finished rows are normalised and handed
    on in small pieces as soon as no later window reaches them.

    Args:
        volume: ``(z, y, x, C)`` float32 normalised image (any strides).
        predict: network, ``(N, pz, py, px, C)`` float32 → ``(N, pz, py, px, K)`` probabilities.
        patch_size: ``(pz, py, px)``.
        overlap: window overlap fraction in [0, 1).
        batch_size: windows per ``predict`` call.
        tta: average with the predictions of the input flipped along z, y and x (4 calls).
        divisible_by: the patch size must be a multiple of it.
        num_classes: expected K (checked); taken from the first output when None.
        importance_map: ``(pz, py, px)`` blending weights; Gaussian σ = patch/8 by default.
        consumer: called as ``consumer(z0, probs)`` with blended float32 probabilities of rows
            ``z0 .. z0 + len(probs)`` (``(n, y, x, K)``), in increasing, gap-free z order. When
            None, the rows are collected and returned as one ``(z, y, x, K)`` array (small inputs
            and tests only: that array is classes × volume float32).
        progress: called as ``progress(windows_done, windows_total)`` after each batch.
        should_cancel: checked before each batch; True raises :class:`errors.CancelledError`.

    Returns:
        None with a consumer, else the ``(z, y, x, K)`` float32 probabilities.
    """
    _check_common(volume, 3, overlap, batch_size, "volume")
    patch = _check_patch(patch_size, 3, divisible_by)
    weights = gaussian_importance_map(patch) if importance_map is None else np.asarray(importance_map, np.float32)
    if weights.shape != patch:
        raise ValueError(f"importance_map shape {weights.shape} differs from patch_size {patch}")
    depth, height, width, channels = volume.shape
    starts = window_grid((depth, height, width), patch, overlap)  # z-major order
    crops = [tuple(_crop(s, p, n) for s, p, n in zip(start, patch, (depth, height, width))) for start in starts]
    total = len(crops)

    collected: list[np.ndarray] = []
    sink: RowConsumer = consumer if consumer is not None else (lambda z0, rows: collected.append(rows))
    network = _Predictor(predict, 3, tta, num_classes)
    accumulator: _RowAccumulator | None = None
    batch_buffer = np.zeros((min(batch_size, total),) + patch + (channels,), dtype=np.float32)
    done = 0
    for indices in _batches(total, int(batch_size)):
        _check_cancel(should_cancel)
        batch = batch_buffer[: len(indices)]
        for b, n in enumerate(indices):
            (az, wz), (ay, wy), (ax, wx) = crops[n]
            if batch.shape[1:4] != (wz.stop - wz.start, wy.stop - wy.start, wx.stop - wx.start):
                batch[b] = 0.0
            batch[b, wz, wy, wx] = volume[az, ay, ax]
        probabilities = network(batch)
        if accumulator is None:
            accumulator = _RowAccumulator(min(depth, patch[0]), (height, width), probabilities.shape[-1])
        probabilities *= weights[None, ..., None]
        for b, n in enumerate(indices):
            (az, wz), (ay, wy), (ax, wx) = crops[n]
            if az.start > accumulator.base:  # every window reaching above az.start is done
                _flush(accumulator, az.start, sink)
            accumulator.ensure(az.stop)
            accumulator.add(az, ay, ax, probabilities[b, wz, wy, wx], weights[wz, wy, wx])
        del probabilities  # free before the next batch is predicted
        done += len(indices)
        if done == total:
            _flush(accumulator, depth, sink)
        if progress is not None:
            progress(done, total)
    if consumer is not None:
        return None
    return np.concatenate(collected, axis=0)
