"""Sliding-window prediction: window layout, Gaussian blending, identity stitching, streaming."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from MedSegAILib.core.errors import CancelledError, ModelFolderError
from MedSegAILib.inference.sliding_window import (
    _RowAccumulator,
    fitted_patch,
    gaussian_importance_map,
    sliding_window_2d,
    sliding_window_3d,
    window_grid,
    window_starts,
)

OVERLAPS = st.sampled_from([0.0, 0.25, 0.5, 0.75])
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def identity(batch: np.ndarray) -> np.ndarray:
    """A 'network' returning its input: probabilities == image channels."""
    return batch


# ---------------------------------------------------------------------------- window_starts


@given(size=st.integers(1, 600), patch=st.integers(1, 96), overlap=st.floats(0.0, 0.95))
@settings(max_examples=300, deadline=None)
def test_window_starts_properties(size: int, patch: int, overlap: float) -> None:
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0
    if size <= patch:
        assert starts == [0]
        return
    assert starts[-1] == size - patch  # last window ends exactly at the border
    steps = np.diff(starts)
    max_step = max(1, math.floor(patch * (1 - overlap) + 1e-9))
    assert np.all(steps >= 1)
    assert np.all(steps <= max_step)
    # evenly spread: steps differ by at most one voxel, and no more windows than needed
    assert steps.max() - steps.min() <= 1
    assert len(starts) == math.ceil((size - patch) / max_step) + 1


def test_window_starts_examples() -> None:
    assert window_starts(512, 256, 0.5) == [0, 128, 256]
    assert window_starts(300, 256, 0.5) == [0, 44]
    assert window_starts(100, 128, 0.5) == [0]
    assert window_starts(10, 4, 0.0) == [0, 3, 6]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 1.0)
    with pytest.raises(ValueError, match="size"):
        window_starts(0, 4, 0.5)


def test_window_grid_pads_short_axes_symmetrically() -> None:
    grid = window_grid((10, 40), (16, 16), 0.5)
    assert {start[0] for start in grid} == {-3}
    assert sorted({start[1] for start in grid}) == [0, 8, 16, 24]
    assert len(grid) == 4


# ---------------------------------------------------------------------------- importance map


@pytest.mark.parametrize("patch", [(33,), (33, 17), (9, 33, 25)])
def test_gaussian_importance_map_sigma(patch: tuple[int, ...]) -> None:
    weights = gaussian_importance_map(patch)
    assert weights.shape == patch and weights.dtype == np.float32
    centre = tuple(p // 2 for p in patch)
    assert weights[centre] == pytest.approx(1.0)
    assert weights.max() == pytest.approx(1.0)
    assert weights.min() >= 1e-3  # never zero at the borders
    for axis, p in enumerate(patch):
        np.testing.assert_array_equal(weights, np.flip(weights, axis=axis))
        index = list(centre)
        index[axis] = slice(None)
        profile = weights[tuple(index)].astype(np.float64)
        sigma = p / 8.0
        distance = np.arange(p) - (p - 1) / 2.0
        expected = np.maximum(np.exp(-0.5 * (distance / sigma) ** 2), 1e-3)
        np.testing.assert_allclose(profile, expected, rtol=1e-5)
        # one sigma from the centre the weight is exp(-1/2)
        if p % 8 == 1 or p == 33:
            assert profile[p // 2 + round(sigma)] == pytest.approx(np.exp(-0.5 * (round(sigma) / sigma) ** 2), rel=1e-5)


def test_gaussian_importance_map_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        gaussian_importance_map((0, 4))
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_importance_map((4, 4), sigma_scale=0)


# ---------------------------------------------------------------------------- 2D identity


@given(
    slices=st.integers(1, 3),
    height=st.integers(1, 45),
    width=st.integers(1, 45),
    channels=st.integers(1, 2),
    patch=st.tuples(st.sampled_from([8, 12, 16]), st.sampled_from([8, 12, 16])),
    overlap=OVERLAPS,
    batch_size=st.integers(1, 5),
    tta=st.booleans(),
    seed=st.integers(0, 2**16),
)
@FAST
def test_identity_network_2d_reproduces_input(slices, height, width, channels, patch, overlap, batch_size, tta, seed) -> None:
    rng = np.random.default_rng(seed)
    slab = rng.normal(size=(slices, height, width, channels)).astype(np.float32)
    result = sliding_window_2d(slab, identity, patch, overlap, batch_size, tta=tta, divisible_by=4)
    assert result.shape == slab.shape and result.dtype == np.float32
    np.testing.assert_allclose(result, slab, rtol=1e-5, atol=1e-5)


def test_identity_2d_accepts_strided_views_and_reports_progress() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 40, 50, 1)).astype(np.float32)
    view = base[::-1, :, ::-1]
    calls: list[tuple[int, int]] = []
    result = sliding_window_2d(view, identity, (16, 16), 0.5, 3, progress=lambda d, t: calls.append((d, t)))
    np.testing.assert_allclose(result, view, rtol=1e-5, atol=1e-5)
    per_slice = len(window_grid((40, 50), (16, 16), 0.5))
    assert calls[-1] == (4 * per_slice, 4 * per_slice)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == math.ceil(4 * per_slice / 3)


def test_one_window_per_slice_returns_the_network_output_uncopied() -> None:
    """Slices smaller than the patch (one padded window each): the crop of the network's own output.

    Whole slab in one call: a view of that output, no accumulator; in several calls: the same values.
    """
    rng = np.random.default_rng(3)
    slab = rng.normal(size=(5, 13, 11, 2)).astype(np.float32)
    outputs: list[np.ndarray] = []

    def network(batch: np.ndarray) -> np.ndarray:
        outputs.append(batch * 2.0)
        return outputs[-1]

    result = sliding_window_2d(slab, network, (16, 16), 0.5, 5)
    assert len(outputs) == 1 and np.shares_memory(result, outputs[0])
    np.testing.assert_array_equal(result, slab * 2.0)
    outputs.clear()
    split = sliding_window_2d(slab, network, (16, 16), 0.5, 2)
    assert len(outputs) == 3 and not any(np.shares_memory(split, output) for output in outputs)
    np.testing.assert_array_equal(split, slab * 2.0)


def test_fitted_patch_pads_short_axes_to_the_next_multiple_only() -> None:
    assert fitted_patch((202, 244), (256, 256), 16) == (208, 256)  # the default CT model's slices
    assert fitted_patch((300, 100), (256, 256), 16) == (256, 112)  # long axes keep the patch
    assert fitted_patch((256, 1), (256, 256), 16) == (256, 16)
    assert fitted_patch((202, 244), (256, 256), 1) == (256, 256)  # factor not declared: whole patch
    with pytest.raises(ValueError, match="differ in length"):
        fitted_patch((10, 10), (16, 16, 16), 16)
    with pytest.raises(ValueError, match="positive"):
        fitted_patch((0, 10), (16, 16), 16)


def test_fit_window_runs_the_smaller_window_with_the_same_result() -> None:
    """A network without padding-dependent statistics: the fitted window gives the whole patch's values."""
    rng = np.random.default_rng(5)
    slab = rng.normal(size=(3, 37, 70, 2)).astype(np.float32)
    shapes: list[tuple[int, ...]] = []

    def network(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return np.tanh(batch) + 1.0  # position-independent: padding cannot leak into the image

    fitted = sliding_window_2d(slab, network, (64, 64), 0.5, 4, divisible_by=16, fit_window=True)
    assert {s[1:3] for s in shapes} == {(48, 64)}  # 37 → 48 (next multiple of 16); 70 > 64 keeps 64
    shapes.clear()
    whole = sliding_window_2d(slab, network, (64, 64), 0.5, 4, divisible_by=16)
    assert {s[1:3] for s in shapes} == {(64, 64)}  # default: the card's whole patch
    np.testing.assert_allclose(fitted, whole, rtol=1e-6, atol=1e-6)
    shapes.clear()
    sliding_window_2d(slab, network, (64, 64), 0.5, 4, divisible_by=16, fit_window=True,
                      importance_map=gaussian_importance_map((64, 64)))
    assert {s[1:3] for s in shapes} == {(64, 64)}  # weights for the whole patch: the patch is kept


def test_tta_flips_back_predictions() -> None:
    """A network that is not flip-invariant: TTA must flip each prediction back before averaging."""
    ramp = np.tile(np.arange(16, dtype=np.float32), (16, 1))

    def position(batch: np.ndarray) -> np.ndarray:  # output = x coordinate inside the window
        return np.broadcast_to(ramp[None, :, :, None], batch.shape).copy()

    slab = np.zeros((1, 16, 16, 1), dtype=np.float32)
    plain = sliding_window_2d(slab, position, (16, 16), 0.5, 1)
    averaged = sliding_window_2d(slab, position, (16, 16), 0.5, 1, tta=True)
    np.testing.assert_allclose(plain[0, ..., 0], ramp)
    # flipping x then flipping the output back gives 15 - x; mean of (x, x, 15 - x) over 3 calls
    np.testing.assert_allclose(averaged[0, ..., 0], (2 * ramp + (15 - ramp)) / 3, rtol=1e-6)


def test_2d_checks_model_output() -> None:
    slab = np.zeros((2, 20, 20, 1), dtype=np.float32)
    with pytest.raises(ModelFolderError, match="classes"):
        sliding_window_2d(slab, lambda b: np.zeros(b.shape[:-1] + (3,), np.float32), (16, 16), num_classes=2)
    with pytest.raises(ModelFolderError, match="shape"):
        sliding_window_2d(slab, lambda b: np.zeros((len(b), 8, 8, 2), np.float32), (16, 16))
    with pytest.raises(ValueError, match="divisible"):
        sliding_window_2d(slab, identity, (12, 12), divisible_by=8)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_2d(slab, identity, (16, 16), overlap=1.0)


def test_2d_cancellation_between_batches() -> None:
    slab = np.zeros((6, 16, 16, 1), dtype=np.float32)
    calls = []
    polls = iter([False, False, True])
    with pytest.raises(CancelledError):
        sliding_window_2d(slab, lambda b: calls.append(len(b)) or b, (16, 16), 0.5, 2, should_cancel=lambda: next(polls))
    assert calls == [2, 2]


# ---------------------------------------------------------------------------- 3D identity + streaming


@given(
    depth=st.integers(1, 30),
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    patch=st.tuples(st.sampled_from([4, 8]), st.sampled_from([8, 12]), st.sampled_from([8, 12])),
    overlap=OVERLAPS,
    batch_size=st.integers(1, 4),
    tta=st.booleans(),
    seed=st.integers(0, 2**16),
)
@FAST
def test_identity_network_3d_reproduces_input_streaming(depth, height, width, patch, overlap, batch_size, tta, seed) -> None:
    rng = np.random.default_rng(seed)
    volume = rng.normal(size=(depth, height, width, 2)).astype(np.float32)
    pieces: list[tuple[int, np.ndarray]] = []
    returned = sliding_window_3d(
        volume, identity, patch, overlap, batch_size, tta=tta, divisible_by=4, consumer=lambda z0, rows: pieces.append((z0, rows))
    )
    assert returned is None
    # rows arrive in order, without gaps or repeats, each piece no taller than one window
    assert [z0 for z0, _ in pieces] == list(np.cumsum([0] + [len(r) for _, r in pieces[:-1]]))
    assert sum(len(r) for _, r in pieces) == depth
    assert all(len(r) <= max(patch[0], 1) for _, r in pieces)
    stitched = np.concatenate([rows for _, rows in pieces], axis=0)
    np.testing.assert_allclose(stitched, volume, rtol=1e-5, atol=1e-5)
    collected = sliding_window_3d(volume, identity, patch, overlap, batch_size, tta=tta)
    np.testing.assert_allclose(collected, volume, rtol=1e-5, atol=1e-5)


def test_3d_accumulator_stays_one_window_tall() -> None:
    """The open z range never exceeds the patch depth, however tall the volume."""
    volume = np.ones((64, 12, 12, 1), dtype=np.float32)
    tallest = []
    original_ensure = _RowAccumulator.ensure

    def spy(self: _RowAccumulator, top: int) -> None:
        original_ensure(self, top)
        tallest.append(self.values.shape[0])

    _RowAccumulator.ensure = spy  # type: ignore[method-assign]
    try:
        sliding_window_3d(volume, identity, (8, 8, 8), 0.5, 3, consumer=lambda z0, rows: None)
    finally:
        _RowAccumulator.ensure = original_ensure  # type: ignore[method-assign]
    assert max(tallest) == 8


def test_row_accumulator_ring_wraps_and_grows() -> None:
    accumulator = _RowAccumulator(4, (2, 2), 1)
    ones = np.ones((3, 2, 2, 1), np.float32)
    weights = np.ones((3, 2, 2), np.float32)
    accumulator.ensure(3)
    accumulator.add(slice(0, 3), slice(None), slice(None), ones * 2, weights)
    np.testing.assert_array_equal(accumulator.pop(2), np.full((2, 2, 2, 1), 2.0))
    accumulator.ensure(5)  # rows 2..4 wrap around the 4-row ring
    accumulator.add(slice(2, 5), slice(None), slice(None), ones * 4, weights)
    accumulator.ensure(8)  # rows 2..7: the ring must grow, keeping rows 2..4
    accumulator.add(slice(5, 8), slice(None), slice(None), ones * 6, weights)
    result = accumulator.pop(8)
    np.testing.assert_allclose(result[:, 0, 0, 0], [3.0, 4.0, 4.0, 6.0, 6.0, 6.0])


def test_3d_cancellation() -> None:
    volume = np.zeros((32, 8, 8, 1), dtype=np.float32)
    with pytest.raises(CancelledError):
        sliding_window_3d(volume, identity, (8, 8, 8), 0.5, 1, should_cancel=lambda: True)
