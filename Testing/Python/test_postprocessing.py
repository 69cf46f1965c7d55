"""Post-processing on the real CT label map (TotalSegmentator labels) with injected islands and holes."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.inference.postprocessing import (
    _largest_component,
    postprocess,
    postprocess_in_place,
)
from scipy import ndimage

SPACING = (3.0, 3.0, 3.0)  # example_seg.nii.gz voxel size: 27 mm³ per voxel
LIVER, SPLEEN, AORTA, STOMACH = 5, 1, 52, 6


@pytest.fixture(scope="module")
def labels(ct_small_label_map) -> np.ndarray:
    return ct_small_label_map


@pytest.fixture(scope="module")
def names(total_ct_label_names) -> dict[int, str]:
    assert total_ct_label_names[LIVER] == "liver" and total_ct_label_names[SPLEEN] == "spleen"
    return total_ct_label_names


@pytest.fixture(scope="module")
def far_background(labels: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices at least 4 voxels away from any label, sorted for determinism."""
    distance = ndimage.distance_transform_edt(labels == 0)
    points = np.argwhere(distance > 4)
    assert len(points) > 100
    return points


def pick(points: np.ndarray, count: int, min_gap: int = 6) -> list[tuple[int, int, int]]:
    chosen: list[np.ndarray] = []
    for point in points[:: max(1, len(points) // 5000)]:
        if all(np.abs(point - other).max() >= min_gap for other in chosen):
            chosen.append(point)
        if len(chosen) == count:
            return [tuple(int(v) for v in p) for p in chosen]
    raise AssertionError("not enough separated background voxels")


def test_largest_component_removes_only_the_listed_labels_islands(labels, names, far_background) -> None:
    liver_spot, spleen_spot = pick(far_background, 2)
    injected = labels.copy()
    z, y, x = liver_spot
    injected[z : z + 2, y : y + 2, x : x + 2] = LIVER
    injected[spleen_spot] = SPLEEN
    result = postprocess(injected, SPACING, {"largest_component": ["liver"]}, names)
    expected = labels.copy()
    expected[spleen_spot] = SPLEEN  # spleen was not listed: its island stays
    np.testing.assert_array_equal(result, expected)
    assert injected[liver_spot] == LIVER  # the input is not modified
    # with every label listed, the result is the clean map's own largest components
    everything = postprocess(injected, SPACING, {"largest_component": True}, names)
    np.testing.assert_array_equal(everything, postprocess(labels, SPACING, {"largest_component": True}, names))
    assert everything[liver_spot] == 0 and everything[spleen_spot] == 0


def test_fill_holes_fills_background_only(labels, names) -> None:
    liver = labels == LIVER
    inner = np.argwhere(ndimage.binary_erosion(liver, iterations=3))
    z, y, x = inner[len(inner) // 2]
    punched = labels.copy()
    punched[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = 0
    punched[z, y, x] = AORTA  # another label inside the hole is kept
    result = postprocess(punched, SPACING, {"fill_holes": ["liver"]}, names)
    expected = labels.copy()
    expected[z, y, x] = AORTA
    original_holes = ndimage.binary_fill_holes(liver) & ~liver & (labels == 0)
    expected[original_holes] = LIVER
    np.testing.assert_array_equal(result, expected)
    assert result[z - 1, y - 1, x - 1] == LIVER


def test_fill_holes_in_bounding_boxes_equals_whole_volume_reference(labels, names) -> None:
    result = postprocess(labels, SPACING, {"fill_holes": True}, names)
    reference = labels.copy()
    for value in sorted(names):
        mask = reference == value
        if mask.any():
            reference[ndimage.binary_fill_holes(mask) & (reference == 0)] = value
    np.testing.assert_array_equal(result, reference)


def test_min_island_removes_small_components_of_every_label(labels, names, far_background) -> None:
    config = {"min_island_mm3": 100.0}  # 1 voxel = 27 mm³ goes, 8 voxels = 216 mm³ stays
    baseline = postprocess(labels, SPACING, config, names)
    assert np.array_equal(baseline[labels == LIVER], labels[labels == LIVER])
    spots = pick(far_background, 4)
    injected = labels.copy()
    for spot, value in zip(spots[:3], (LIVER, SPLEEN, STOMACH)):
        injected[spot] = value
    z, y, x = spots[3]
    injected[z : z + 2, y : y + 2, x : x + 2] = SPLEEN
    result = postprocess(injected, SPACING, config, names)
    expected = baseline.copy()
    expected[z : z + 2, y : y + 2, x : x + 2] = SPLEEN
    np.testing.assert_array_equal(result, expected)
    # with a bigger threshold the 8-voxel island goes too
    bigger = postprocess(injected, SPACING, {"min_island_mm3": 300.0}, names)
    assert not bigger[z : z + 2, y : y + 2, x : x + 2].any()


def test_empty_config_changes_nothing_and_bad_options_are_reported(labels, names) -> None:
    np.testing.assert_array_equal(postprocess(labels, SPACING, {}, names), labels)
    np.testing.assert_array_equal(postprocess(labels, SPACING, None, names), labels)
    np.testing.assert_array_equal(postprocess(labels, SPACING, {"method": "argmax", "thresholds": {}}, names), labels)
    with pytest.raises(MedSegAIInputError, match="unknown label"):
        postprocess(labels, SPACING, {"largest_component": ["livr"]}, names)
    with pytest.raises(MedSegAIInputError, match="unknown post-processing"):
        postprocess(labels, SPACING, {"dilate": 2}, names)
    with pytest.raises(MedSegAIInputError, match="min_island_mm3"):
        postprocess(labels, SPACING, {"min_island_mm3": -1}, names)
    with pytest.raises(TypeError, match="uint8"):
        postprocess(labels.astype(np.int32), SPACING, {}, names)
    with pytest.raises(ValueError, match="spacing"):
        postprocess(labels, (3.0, 0.0, 3.0), {}, names)


def _reference_largest(mask: np.ndarray) -> np.ndarray:
    """The plain definition: label the whole mask, keep the biggest (first in C order on ties)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == np.argmax(sizes)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(1, 11), st.integers(1, 11), st.integers(1, 11)),
    density=st.floats(0.02, 0.6),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_screened_largest_component_equals_plain_labelling(shape, density, seed) -> None:
    mask = np.random.default_rng(seed).random(shape) < density
    found = _largest_component(mask)
    reference = _reference_largest(mask)
    if not mask.any():
        assert found is None
        return
    box, component, size = found
    result = np.zeros(shape, dtype=bool)
    result[box] = component
    np.testing.assert_array_equal(result, reference)
    assert size == int(reference.sum())


def test_largest_component_ties_keep_the_first_in_c_order() -> None:
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[3, 4:6, 4:6] = True  # 4 voxels, last in C order
    mask[0, 0:2, 0:2] = True  # 4 voxels, first in C order
    mask[1, 0, 5] = True
    box, component, size = _largest_component(mask)
    result = np.zeros(mask.shape, dtype=bool)
    result[box] = component
    assert size == 4 and result[0, 0:2, 0:2].all() and result.sum() == 4


def test_in_place_on_a_reoriented_view_equals_postprocess(labels, names) -> None:
    config = {"largest_component": True, "fill_holes": ["liver", "spleen"]}
    expected = postprocess(labels, SPACING, config, names)
    work = np.ascontiguousarray(labels.transpose(2, 0, 1)[::-1, :, ::-1])
    view = work[::-1, :, ::-1].transpose(1, 2, 0)  # the original layout, as a strided view
    postprocess_in_place(view, SPACING, config, names, boxes=ndimage.find_objects(view))
    np.testing.assert_array_equal(view, expected)
    flipped = labels[::-1, ::-1].copy()
    postprocess_in_place(flipped, SPACING, config, names)
    np.testing.assert_array_equal(flipped[::-1, ::-1], expected)


def _fill_holes_split_and_whole(labels: np.ndarray, config: dict, names: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """Holes filled by one search per box, and by two half-box searches joined at the seam."""
    from unittest import mock

    from MedSegAILib.inference import postprocessing

    with mock.patch.dict("os.environ", {"MEDSEGAI_THREADS": "1"}):
        whole = postprocess(labels, SPACING, config, names)
    with mock.patch.dict("os.environ", {"MEDSEGAI_THREADS": "2"}), mock.patch.object(postprocessing, "_SPLIT_VOXELS", 0):
        split = postprocess(labels, SPACING, config, names)
    return whole, split


def test_holes_searched_in_two_halves_equal_one_search(labels, names) -> None:
    injected = labels.copy()
    liver = np.argwhere(labels == LIVER)
    middle = liver[len(liver) // 2]
    injected[middle[0] - 1 : middle[0] + 1, middle[1] - 1 : middle[1] + 2, middle[2] - 1 : middle[2] + 2] = 0  # across a seam
    whole, split = _fill_holes_split_and_whole(injected, {"fill_holes": True}, names)
    np.testing.assert_array_equal(split, whole)
    assert (whole[tuple(middle)] == LIVER) and not np.array_equal(whole, injected)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(2, 10), st.integers(1, 10), st.integers(1, 10)),
    density=st.floats(0.3, 0.95),
    seed=st.integers(0, 2**31 - 1),
)
def test_split_hole_search_equals_one_search_on_random_maps(shape, density, seed) -> None:
    """Shells of two labels with cavities that cross the seam, open to it, or touch the far faces."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(shape) < density, rng.integers(1, 3, size=shape), 0).astype(np.uint8)
    whole, split = _fill_holes_split_and_whole(labels, {"fill_holes": True}, {1: "a", 2: "b"})
    np.testing.assert_array_equal(split, whole)


def test_split_hole_search_holds_one_labels_components_at_a_time() -> None:
    """Four speckled labels whose boxes span the map: the int32 components of one label (4 bytes per
    voxel) at a time, not of all four (16+), whatever the thread count."""
    import tracemalloc
    from unittest import mock

    from MedSegAILib.inference import postprocessing

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(24, 128, 128)).astype(np.uint8)
    config = {"fill_holes": True}
    with mock.patch.dict("os.environ", {"MEDSEGAI_THREADS": "2"}), mock.patch.object(postprocessing, "_SPLIT_VOXELS", 0):
        tracemalloc.start()
        try:
            postprocess_in_place(labels, SPACING, config, {1: "a", 2: "b", 3: "c", 4: "d"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * labels.size, f"peak {peak / labels.size:.1f} bytes per voxel"


def test_largest_component_of_speckled_labels_holds_one_label_at_a_time() -> None:
    """Speckle (a network with random weights, or far off its training data) puts every label's box
    over the whole map. Labels whose working arrays would exceed ``_PARALLEL_BYTES`` side by side
    then run one at a time: the peak is one label's components and masks, the labels are the same."""
    import tracemalloc
    from unittest import mock

    from MedSegAILib.inference import postprocessing

    rng = np.random.default_rng(0)
    speckle = rng.integers(0, 5, size=(24, 128, 128)).astype(np.uint8)
    config, names = {"largest_component": True}, {1: "a", 2: "b", 3: "c", 4: "d"}
    with mock.patch.dict("os.environ", {"MEDSEGAI_THREADS": "1"}):
        expected = postprocess(speckle, SPACING, config, names)
    labels = speckle.copy()
    budget = 20 * labels.size  # more than one label's ~16 bytes per voxel, less than two labels'
    with mock.patch.dict("os.environ", {"MEDSEGAI_THREADS": "2"}), mock.patch.object(postprocessing, "_PARALLEL_VOXELS", 0), \
            mock.patch.object(postprocessing, "_PARALLEL_BYTES", budget):
        tracemalloc.start()
        try:
            postprocess_in_place(labels, SPACING, config, names)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4} and np.count_nonzero(labels) < np.count_nonzero(speckle)
    assert peak < 24 * labels.size, f"peak {peak / labels.size:.1f} bytes per voxel"
