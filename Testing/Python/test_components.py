"""Streamed connected components (``components.StreamedComponents``) against labelling the finished map.

The reference is the classic post-processing of the whole map (``postprocessing.postprocess_in_place``
without components), itself tested against plain ``ndimage.label`` in test_postprocessing.py. Both
break ties between equally large components by the first voxel in C order of the array they see,
so every comparison runs the reference on the same (moved-axis) view the stream filled.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from MedSegAILib.inference import components as components_module
from MedSegAILib.inference.components import StreamedComponents
from MedSegAILib.inference.postprocessing import component_labels, postprocess_in_place
from scipy import ndimage

SPACING = (3.0, 3.0, 3.0)  # example_seg.nii.gz: 27 mm³ per voxel


@pytest.fixture(scope="module")
def labels(ct_small_label_map) -> np.ndarray:
    """The real TotalSegmentator label map of the small CT, with islands and a hole put in."""
    array = ct_small_label_map.copy()
    liver = 5
    z, y, x = (int(np.median(axis)) for axis in np.nonzero(array == liver))
    array[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = 0  # a hole inside the liver
    array[0, 0, 0] = liver  # an island far from it
    array[-1, -1, -3:] = liver
    return array


@pytest.fixture(scope="module")
def names(total_ct_label_names) -> dict[int, str]:
    return total_ct_label_names


def stream(labels: np.ndarray, axis: int, sizes: list[int], tracked: list[int], num_labels: int) -> tuple[np.ndarray, StreamedComponents]:
    """Write ``labels`` plane by plane along ``axis`` (chunks of ``sizes``, cycled) into a fresh map."""
    target = np.zeros_like(labels)
    view = np.moveaxis(target, axis, 0)
    source = np.moveaxis(labels, axis, 0)
    found = StreamedComponents(view, num_labels, tracked, axes=[axis] + [a for a in range(3) if a != axis])
    first, turn = 0, 0
    while first < len(source):
        stop = min(len(source), first + sizes[turn % len(sizes)])
        view[first:stop] = source[first:stop]
        found.add(first, np.ascontiguousarray(source[first:stop]))
        first, turn = stop, turn + 1
    return target, found


def reference(labels: np.ndarray, axis: int, config: dict, names: dict[int, str]) -> np.ndarray:
    result = labels.copy()
    postprocess_in_place(np.moveaxis(result, axis, 0), SPACING, config, names)
    return result


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_streamed_postprocessing_equals_labelling_the_finished_map(labels, names, axis) -> None:
    num_labels = int(labels.max())
    config = {"largest_component": True, "fill_holes": ["liver", "spleen"], "min_island_mm3": 100}
    tracked = component_labels(config, names, num_labels)
    target, found = stream(labels, axis, [1, 3, 2, 5], tracked, num_labels)
    np.testing.assert_array_equal(target, labels)
    assert found.boxes() == ndimage.find_objects(labels, max_label=num_labels)
    postprocess_in_place(target, SPACING, config, names, components=found)
    expected = reference(labels, axis, config, names)
    np.testing.assert_array_equal(target, expected)
    assert target[0, 0, 0] == 0 and (target == 5).sum() > 1000  # the liver island went, the liver stayed
    assert not found.overflow
    # boxes after pruning hold every voxel of each label
    for value, box in enumerate(found.boxes(), start=1):
        count = int((target == value).sum())
        assert (box is None and count == 0) or int((target[box] == value).sum()) == count


def test_labels_only_boxed_are_left_to_the_caller(labels, names) -> None:
    """Untracked labels are not pruned by the stream; postprocess_in_place does them on the map."""
    num_labels = int(labels.max())
    config = {"largest_component": ["liver", "spleen"]}
    _, found = stream(labels, 0, [4], tracked=[5], num_labels=num_labels)  # spleen (1) not followed
    assert found.prune(0, [1, 5]) == {1}
    target, found = stream(labels, 0, [4], tracked=[5], num_labels=num_labels)
    postprocess_in_place(target, SPACING, config, names, components=found)
    np.testing.assert_array_equal(target, reference(labels, 0, config, names))


@pytest.mark.parametrize("limit", ["_MAX_PIECES_PER_CHUNK", "_MAX_PIECES_PER_LABEL"])
def test_speckle_beyond_the_piece_limit_falls_back_to_the_whole_map(monkeypatch, labels, names, limit) -> None:
    """Past the limits (which bound the stream's memory and time) a label is done on the finished map."""
    monkeypatch.setattr(components_module, limit, 2)
    num_labels = int(labels.max())
    config = {"largest_component": True, "min_island_mm3": 60}
    target, found = stream(labels, 1, [7], component_labels(config, names, num_labels), num_labels)
    postprocess_in_place(target, SPACING, config, names, components=found)
    assert found.overflow  # some labels had more than 2 pieces in a chunk
    np.testing.assert_array_equal(target, reference(labels, 1, config, names))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    density=st.floats(0.05, 0.9),
    axis=st.integers(0, 2),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    min_island=st.sampled_from([0, 27 * 2, 27 * 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_streamed_equals_whole_map_on_random_maps(shape, density, axis, sizes, min_island, seed) -> None:
    """Blobs and speckle of three labels, ties included (small maps have many equal components)."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(shape) < density, rng.integers(1, 4, size=shape), 0).astype(np.uint8)
    names = {1: "a", 2: "b", 3: "c"}
    config = {"largest_component": ["a", "c"], "fill_holes": True, "min_island_mm3": min_island}
    target, found = stream(labels, axis, sizes, component_labels(config, names, 3), 3)
    postprocess_in_place(target, SPACING, config, names, components=found)
    np.testing.assert_array_equal(target, reference(labels, axis, config, names))


def test_bad_use_is_reported() -> None:
    out = np.zeros((4, 5, 6), dtype=np.uint8)
    found = StreamedComponents(out, 2, [1])
    with pytest.raises(ValueError, match="in order"):
        found.add(1, out[1:2].copy())
    with pytest.raises(ValueError, match="rows must be"):
        found.add(0, np.zeros((1, 5, 5), dtype=np.uint8))
    found.add(0, out[:2].copy())
    with pytest.raises(RuntimeError, match="2 of 4 planes"):
        found.prune(0, [1])
    with pytest.raises(ValueError, match="3D uint8"):
        StreamedComponents(out.astype(np.int16), 2)
    with pytest.raises(ValueError, match="permutation"):
        StreamedComponents(out, 2, axes=(0, 0, 1))
    with pytest.raises(ValueError, match="view of labels"):
        postprocess_in_place(np.zeros_like(out), SPACING, {"largest_component": True}, {1: "a", 2: "b"}, components=found)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_label_boxes_on_threads_equal_find_objects(monkeypatch, ct_small_label_map, threads) -> None:
    """The real map stacked to 4.4 M voxels (searched in slabs), with a label only in its last slab."""
    monkeypatch.setenv("MEDSEGAI_THREADS", threads)
    big = np.concatenate([ct_small_label_map] * 12)
    big[-3:, 10:12, 20:23] = 200
    assert big.size >= components_module._PARALLEL_BOX_VOXELS
    assert components_module.label_boxes(big) == ndimage.find_objects(big)
    assert components_module.label_boxes(big, max_label=250) == ndimage.find_objects(big, max_label=250)
    assert components_module.label_boxes(big, max_label=3) == ndimage.find_objects(big, max_label=3)


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 6), st.integers(1, 6)),
    density=st.floats(0.0, 1.0),
    max_label=st.one_of(st.none(), st.integers(0, 6)),
    seed=st.integers(0, 2**16),
)
def test_label_boxes_in_slabs_equal_find_objects_on_random_maps(shape, density, max_label, seed) -> None:
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(shape) < density, rng.integers(1, 5, shape), 0).astype(np.uint8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(components_module, "_PARALLEL_BOX_VOXELS", 0)
        patch.setenv("MEDSEGAI_THREADS", "3")
        found = components_module.label_boxes(labels, max_label)
    expected = ndimage.find_objects(labels) if max_label is None else ndimage.find_objects(labels, max_label=max_label)
    assert found == expected
