"""Reorientation, intensity normalisation and resampling, on synthetic and real CT data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from MedSegAILib.core.image import Volume
from MedSegAILib.inference.preprocessing import (
    intensity_statistics,
    normalize,
    reorient_to_canonical,
    resample_axis_aligned,
    source_coordinates,
    target_grid,
)
from scipy import ndimage


def rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def signed_permutations() -> list[np.ndarray]:
    result = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            for column, row in enumerate(perm):
                matrix[row, column] = signs[column]
            result.append(matrix)
    return result


DIRECTIONS = signed_permutations() + [
    rotation(2, 25.0) @ np.diag([-1.0, 1.0, 1.0]),
    rotation(0, 30.0) @ signed_permutations()[9],
    rotation(1, -40.0) @ rotation(2, 20.0) @ signed_permutations()[30],
]


def physical(origin: np.ndarray, direction: np.ndarray, spacing: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return origin + direction @ (spacing * ijk)


@pytest.mark.parametrize("direction", DIRECTIONS, ids=[f"d{i}" for i in range(len(DIRECTIONS))])
def test_reorientation_round_trip_and_geometry(direction: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 1000, size=(5, 6, 7)).astype(np.int16)
    spacing = np.array([0.7, 0.9, 2.5])
    origin = np.array([10.0, -20.0, 30.0])
    view, reo = reorient_to_canonical(array, direction, spacing, origin)
    assert np.shares_memory(view, array)  # a view, not a copy
    assert view.shape == reo.shape
    # canonical axes point to L, P, S as closely as possible: the diagonal dominates and is positive
    canonical = reo.direction
    assert np.all(np.diag(canonical) > 0)
    assert np.all(np.argmax(np.abs(canonical), axis=0) == [0, 1, 2])
    # exact mapping back, for labels (z, y, x) and for probabilities (K, z, y, x) / (z, y, x, K)
    np.testing.assert_array_equal(reo.to_original(view), array)
    stacked = np.stack([view, view + 1, view * 2])
    np.testing.assert_array_equal(reo.to_original(stacked, spatial_axis=1), np.stack([array, array + 1, array * 2]))
    last = np.stack([view, view - 3], axis=-1)
    np.testing.assert_array_equal(reo.to_original(last), np.stack([array, array - 3], axis=-1))
    np.testing.assert_array_equal(reo.to_canonical(array), view)
    # same physical point for every voxel: canonical (i, j, k) and the original voxel it shows
    for k, j, i in [(0, 0, 0), (1, 2, 3), tuple(n - 1 for n in view.shape), (4, 0, 2)]:
        if k >= view.shape[0] or j >= view.shape[1] or i >= view.shape[2]:
            continue
        point = physical(np.array(reo.origin), canonical, np.array(reo.spacing), np.array([i, j, k], float))
        original_ijk = np.linalg.solve(direction @ np.diag(spacing), point - origin)
        oi, oj, ok = np.round(original_ijk).astype(int)
        np.testing.assert_allclose(original_ijk, [oi, oj, ok], atol=1e-6)
        assert view[k, j, i] == array[ok, oj, oi]


def test_reorientation_of_a_sagittal_acquisition() -> None:
    """Index axes (i, j, k) point to (P, -S, R): canonical x comes from k reversed, etc."""
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    view, reo = reorient_to_canonical(array, direction, (1.0, 2.0, 3.0), (10.0, 20.0, 30.0))
    assert reo.perm == (1, 2, 0) and reo.flip == (True, False, True)
    assert view.shape == (3, 4, 2)
    assert reo.spacing == (3.0, 1.0, 2.0)
    np.testing.assert_allclose(reo.direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(reo.origin, (7.0, 20.0, 26.0))


def test_reorientation_of_the_real_ct_matches_simpleitk(ct_small) -> None:
    image = sitk.ReadImage(str(ct_small))
    volume = Volume.from_sitk(image)
    view, reo = reorient_to_canonical(volume)
    reference = sitk.DICOMOrient(image, "LPS")
    assert np.shares_memory(view, volume.array)
    np.testing.assert_array_equal(view, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(reo.origin, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(reo.direction.reshape(-1), reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(reo.spacing, reference.GetSpacing())
    np.testing.assert_array_equal(reo.to_original(view), volume.array)
    # the same CT stored with permuted + flipped axes (a "sagittal" acquisition) maps back exactly
    permuted = sitk.PermuteAxes(image, [2, 0, 1])
    flipped = sitk.Flip(permuted, [True, False, True])
    other = Volume.from_sitk(flipped)
    view2, reo2 = reorient_to_canonical(other)
    np.testing.assert_array_equal(view2, view)
    np.testing.assert_allclose(reo2.origin, reo.origin, atol=1e-4)
    np.testing.assert_array_equal(reo2.to_original(view2), other.array)


def test_reorientation_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="3D"):
        reorient_to_canonical(np.zeros((2, 2)), np.eye(3))
    with pytest.raises(ValueError, match="invertible"):
        reorient_to_canonical(np.zeros((2, 2, 2)), np.zeros((3, 3)))
    _, reo = reorient_to_canonical(np.zeros((2, 3, 4)), np.eye(3))
    with pytest.raises(ValueError, match="shape"):
        reo.to_original(np.zeros((4, 3, 2)))


# ---------------------------------------------------------------------------- normalisation


def test_ct_normalisation_values() -> None:
    hu = np.array([-1000, -200, 50, 300, 2000], dtype=np.int16)
    scaled = normalize(hu, {"method": "ct", "clip": [-200, 300]})
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [0.0, 0.0, 0.5, 1.0, 1.0])
    standard = normalize(hu, {"method": "ct", "clip": [-200, 300], "mean": 50.0, "std": 125.0})
    np.testing.assert_allclose(standard, [-2.0, -2.0, 0.0, 2.0, 2.0])
    assert hu[0] == -1000  # input untouched


def test_zscore_normalisation_fixed_per_image_and_nonzero() -> None:
    values = np.array([0, 0, 2, 4, 6], dtype=np.float64)
    fixed = normalize(values, {"method": "zscore", "mean": 2.0, "std": 2.0})
    np.testing.assert_allclose(fixed, [-1, -1, 0, 1, 2])
    per_image = normalize(values, {"method": "zscore"})
    np.testing.assert_allclose(per_image, (values - values.mean()) / values.std(), rtol=1e-6)
    nonzero = normalize(values, {"method": "zscore", "nonzero": True})
    np.testing.assert_allclose(nonzero, [0, 0, -np.sqrt(1.5), 0, np.sqrt(1.5)], rtol=1e-6)
    stats = intensity_statistics(values, {"method": "zscore", "nonzero": True})
    assert stats == pytest.approx({"mean": 4.0, "std": np.sqrt(8 / 3)})
    # slabs normalised with whole-image statistics agree with the whole image
    slab = normalize(values[2:4], {"method": "zscore", "nonzero": True}, stats)
    np.testing.assert_allclose(slab, nonzero[2:4], rtol=1e-6)


def test_zscore_foreground_ignores_air_whatever_the_field_of_view() -> None:
    rng = np.random.default_rng(0)
    tissue = rng.normal(500.0, 50.0, size=(4, 20, 20))

    def scan(air_rows: int) -> np.ndarray:
        """The same head with more or less noisy air around it (a larger field of view)."""
        air = np.abs(rng.normal(0.0, 5.0, size=(4, air_rows, 20)))
        return np.concatenate([air, tissue, air], axis=1)

    spec = {"method": "zscore", "foreground": 0.1}
    small, large = scan(5), scan(60)
    inside_small = normalize(small, spec)[:, 5:25]
    inside_large = normalize(large, spec)[:, 60:80]
    np.testing.assert_allclose(inside_small, inside_large, atol=1e-3)
    np.testing.assert_allclose(inside_small, (tissue - tissue.mean()) / tissue.std(), atol=1e-3)
    # the non-zero z-score shifts the same tissue with the amount of air
    nonzero = {"method": "zscore", "nonzero": True}
    shifted = normalize(small, nonzero)[:, 5:25].mean() - normalize(large, nonzero)[:, 60:80].mean()
    assert abs(shifted) > 0.5
    with pytest.raises(ValueError, match="foreground must be a fraction"):
        normalize(small, {"method": "zscore", "foreground": 1.5})


def test_percentile_normalisation_and_none() -> None:
    values = np.arange(101, dtype=np.int32)
    result = normalize(values, {"method": "percentile", "lower": 10, "upper": 90})
    np.testing.assert_allclose(result[[0, 10, 50, 90, 100]], [0, 0, 0.5, 1, 1], atol=1e-6)
    assert intensity_statistics(values, {"method": "percentile", "lower": 10, "upper": 90}) == {"low": 10.0, "high": 90.0}
    plain = normalize(values, {"method": "none"})
    assert plain.dtype == np.float32 and not np.shares_memory(plain, values)
    np.testing.assert_array_equal(plain, values)


def test_statistics_of_a_large_volume_use_a_subsample_close_to_the_truth(ct_small) -> None:
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_small)))
    big = np.tile(array, (4, 3, 3))  # ~4.4 M voxels > subsample size
    stats = intensity_statistics(big, {"method": "zscore"})
    assert stats["mean"] == pytest.approx(float(big.mean()), abs=0.01 * float(big.std()))
    assert stats["std"] == pytest.approx(float(big.std()), rel=0.01)
    assert intensity_statistics(big, {"method": "ct", "clip": [-100, 100]}) == {}


def test_normalisation_rejects_bad_specs() -> None:
    with pytest.raises(ValueError, match="method"):
        normalize(np.zeros(3), {"method": "minmax"})
    with pytest.raises(ValueError, match="clip"):
        normalize(np.zeros(3), {"method": "ct", "clip": [300, -200]})
    with pytest.raises(TypeError, match="dict"):
        normalize(np.zeros(3), "ct")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- resampling


def test_target_grid_keeps_physical_extent() -> None:
    shape, spacing = target_grid((30, 101, 122), (3.0, 3.0, 3.0), (1.5, 2.0, None))
    assert shape == (30, 152, 244)
    assert spacing[2] == 3.0
    for n_in, s_in, n_out, s_out in zip((122, 101, 30), (3.0, 3.0, 3.0), shape[::-1], spacing):
        assert n_out * s_out == pytest.approx(n_in * s_in)
    assert target_grid((4, 5, 6), (1, 1, 1), None) == ((4, 5, 6), (1.0, 1.0, 1.0))
    assert target_grid((1, 1, 1), (1, 1, 1), (50, 50, 50))[0] == (1, 1, 1)
    with pytest.raises(ValueError, match="target spacing"):
        target_grid((4, 5, 6), (1, 1, 1), (1, 0, 1))


def test_source_coordinates_map_voxel_centres() -> None:
    np.testing.assert_allclose(source_coordinates(4, 2), [0.5, 2.5])
    np.testing.assert_allclose(source_coordinates(2, 4), [-0.25, 0.25, 0.75, 1.25])
    np.testing.assert_allclose(source_coordinates(5, 5), np.arange(5))


def test_linear_resampling_reproduces_a_linear_ramp_and_matches_scipy() -> None:
    z, y, x = np.meshgrid(np.arange(12.0), np.arange(20.0), np.arange(16.0), indexing="ij")
    ramp = (2 * z + 0.5 * y - x).astype(np.float32)
    out_shape = (7, 33, 9)
    result = resample_axis_aligned(ramp, out_shape, order=1)
    assert result.shape == out_shape and result.dtype == np.float32
    # interior voxels (no edge clamping) are exact for a linear function
    uz, uy, ux = (source_coordinates(n, m) for n, m in zip(ramp.shape, out_shape))
    expected = 2 * uz[:, None, None] + 0.5 * uy[None, :, None] - ux[None, None, :]
    inside = np.ix_(
        (uz >= 0) & (uz <= 11), (uy >= 0) & (uy <= 19), (ux >= 0) & (ux <= 15)
    )
    np.testing.assert_allclose(result[inside], expected[inside], atol=1e-4)
    reference = ndimage.zoom(ramp, np.divide(out_shape, ramp.shape), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(result, reference, atol=1e-4)


def test_resampling_selected_axes_of_probabilities_and_nearest_labels(ct_small_labels) -> None:
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_small_labels)))
    up = resample_axis_aligned(labels, (60, 202, 244), order=0)
    assert up.dtype == labels.dtype and up.shape == (60, 202, 244)
    np.testing.assert_array_equal(up[::2, ::2, ::2], labels)  # exact factor 2: each voxel copied
    np.testing.assert_array_equal(resample_axis_aligned(up, labels.shape, order=0), labels)
    assert set(np.unique(up)) == set(np.unique(labels))
    probabilities = np.random.default_rng(0).random((3, 10, 12, 4)).astype(np.float32)
    resampled = resample_axis_aligned(probabilities, (25, 7), order=1, axes=(1, 2))
    assert resampled.shape == (3, 25, 7, 4)
    summed = resample_axis_aligned(probabilities.sum(-1), (25, 7), 1, (1, 2))
    np.testing.assert_allclose(resampled.sum(axis=-1), summed, rtol=1e-5)
    assert resample_axis_aligned(probabilities, (10, 12), order=1, axes=(1, 2)) is probabilities
    with pytest.raises(ValueError, match="order"):
        resample_axis_aligned(probabilities, (5, 5), order=3, axes=(1, 2))
