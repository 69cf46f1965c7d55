"""uncertain_regions: ranking of uncertain regions and the visit state behind "Next uncertain region".

Synthetic maps with known regions placed on the real TotalSegmentator label map of the small CT, so
the label each region concerns is checked against real anatomy.
"""

from __future__ import annotations

import numpy as np
import pytest
from MedSegAILib.report.uncertain_regions import Region, RegionVisits, rank_regions

SPACING = (3.0, 3.0, 3.0)  # (x, y, z) mm, example_seg.nii.gz


def _boxes_map(shape: tuple[int, int, int]) -> tuple[np.ndarray, list[tuple[slice, slice, slice]]]:
    """A map with four separate blocks: 3x3x3 (two of them, equal size), 2x2x2, 4x4x4; and a speck."""
    uncertainty = np.zeros(shape, dtype=np.uint8)
    boxes = [np.s_[2:5, 2:5, 2:5], np.s_[2:5, 2:5, 10:13], np.s_[10:12, 10:12, 10:12], np.s_[14:18, 2:6, 2:6]]
    values = [200, 255, 180, 130]
    for box, value in zip(boxes, values):
        uncertainty[box] = value
    uncertainty[0, 0, 20] = 140  # a one-voxel speck
    uncertainty[7, 7, 7] = 127  # below the threshold
    return uncertainty, boxes


def test_order_volume_then_uncertainty_then_position_and_deterministic() -> None:
    uncertainty, _ = _boxes_map((20, 16, 24))
    regions = rank_regions(uncertainty, None, (1.0, 2.0, 0.5))
    assert [r.voxel_count for r in regions] == [64, 27, 27, 8, 1]
    # the two 27-voxel blocks: the more uncertain (255) first
    assert regions[1].peak_uncertainty == 255 and regions[2].peak_uncertainty == 200
    assert [r.rank for r in regions] == list(range(5))
    assert regions[0].volume_ml == pytest.approx(64 * 1.0 / 1000)
    assert regions[0].bounds_zyx == ((14, 18), (2, 6), (2, 6))
    assert regions[3].centre_zyx in {(z, y, x) for z in (10, 11) for y in (10, 11) for x in (10, 11)}
    assert regions[1].centre_zyx == (3, 3, 11) and regions[1].centre_ijk == (11, 3, 3)
    assert rank_regions(uncertainty, None, (1.0, 2.0, 0.5)) == regions
    # equal size and equal uncertainty: the first in C order goes first
    uncertainty[2:5, 2:5, 10:13] = 200
    tied = rank_regions(uncertainty, None, (1.0, 2.0, 0.5))
    assert tied[1].centre_zyx == (3, 3, 3) and tied[2].centre_zyx == (3, 3, 11)
    assert [r.voxel_count for r in rank_regions(uncertainty, None, SPACING, min_voxels=8, max_regions=3)] == [64, 27, 27]
    assert rank_regions(np.zeros((4, 4, 4), np.uint8), None, SPACING) == []


def test_centre_is_a_region_voxel_and_ras_follows_the_matrix() -> None:
    uncertainty = np.zeros((9, 20, 20), dtype=np.uint8)
    ring = np.zeros((20, 20), dtype=bool)
    yy, xx = np.mgrid[:20, :20]
    ring[(np.hypot(yy - 10, xx - 10) > 6) & (np.hypot(yy - 10, xx - 10) < 8)] = True
    uncertainty[4][ring] = 255
    matrix = np.array([[-0.7, 0, 0, 10.0], [0, -0.8, 0, -5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    (region,) = rank_regions(uncertainty, None, (0.7, 0.8, 2.5), ijk_to_ras=matrix)
    z, y, x = region.centre_zyx
    assert uncertainty[z, y, x] == 255  # on the ring, not its empty centroid
    i, j, k = region.centre_ijk
    assert region.centre_ras == pytest.approx(tuple((matrix @ [i, j, k, 1])[:3]))


def test_region_label_is_the_real_organ_it_touches(ct_small_label_map, total_ct_label_names) -> None:
    labels = ct_small_label_map
    liver = 5
    assert total_ct_label_names[liver] == "liver"
    uncertainty = np.zeros(labels.shape, dtype=np.uint8)
    # an uncertain shell on the liver's boundary, and a blob in the air far from any organ
    liver_mask = labels == liver
    from scipy import ndimage

    boundary = ndimage.binary_dilation(liver_mask) & ~ndimage.binary_erosion(liver_mask)
    uncertainty[boundary] = 220
    far = ndimage.distance_transform_cdt(labels == 0, metric="chessboard")
    z, y, x = (int(v) for v in np.unravel_index(np.argmax(far), far.shape))
    assert far[z, y, x] > 3
    uncertainty[z, y, x] = 250
    # a voxel in the background 3 voxels from the liver (and further from any other organ) concerns the liver
    # through a 3-voxel shell, and nothing without it
    liver_far = ndimage.distance_transform_cdt(~liver_mask, metric="chessboard")
    others_far = ndimage.distance_transform_cdt((labels == 0) | liver_mask, metric="chessboard")
    near = tuple(int(v[0]) for v in np.nonzero((liver_far == 3) & (others_far > 3)))
    uncertainty[near] = 240
    regions = rank_regions(uncertainty, labels, SPACING, margin=3)
    assert regions[0].label == liver
    assert regions[0].voxel_count >= int(boundary.sum()) // 2
    by_centre = {r.centre_zyx: r for r in regions}
    assert by_centre[(z, y, x)].label == 0 and by_centre[near].label == liver
    assert {r.centre_zyx: r for r in rank_regions(uncertainty, labels, SPACING, margin=0)}[near].label == 0


def test_bad_arguments_are_named() -> None:
    good = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        rank_regions(good.astype(np.float32), None, SPACING)
    with pytest.raises(ValueError, match="labels"):
        rank_regions(good, np.zeros((3, 3, 4), np.uint8), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        rank_regions(good, None, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="threshold"):
        rank_regions(good, None, SPACING, threshold=0)


def test_visits_count_next_and_reset() -> None:
    uncertainty, _ = _boxes_map((20, 16, 24))
    regions = rank_regions(uncertainty, None, SPACING)
    visits = RegionVisits(regions)
    assert visits.counter_text() == "5 uncertain regions" and visits.next_index() == 0
    assert visits.visit() is regions[0] and visits.counter_text() == "region 1 of 5"
    assert visits.visit(2) is regions[2] and visits.visited == {0, 2}
    assert visits.visit() is regions[1] and visits.counter_text() == "region 2 of 5"
    assert visits.visit().rank == 3 and visits.visit().rank == 4
    assert visits.counter_text() == "region 5 of 5 (all visited)"
    assert visits.visit() is None and visits.next_index() is None
    with pytest.raises(ValueError, match="out of range"):
        visits.visit(5)
    visits.reset(regions[:2])
    assert visits.visited == set() and visits.current is None and len(visits) == 2
    visits.reset()
    assert visits.counter_text() == "no uncertain regions" and visits.visit() is None
    assert isinstance(regions[0], Region)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_match_a_region_by_region_reference(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Vectorised inside/shell labels (and the large-region path) equal dilating each region on its own."""
    from MedSegAILib.report import uncertain_regions
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    labels = ndimage.zoom(rng.integers(0, 4, (4, 5, 5)), 4, order=0).astype(np.uint8)[:14, :17, :19]
    labels[rng.random(labels.shape) < 0.3] = 0
    uncertainty = (rng.random(labels.shape) < 0.08).astype(np.uint8) * 200
    components, count = ndimage.label(uncertainty >= 128, structure=np.ones((3, 3, 3), bool))

    def reference(component: int, margin: int) -> int:
        region = components == component
        for mask in (region, ndimage.binary_dilation(region, np.ones((3, 3, 3), bool), iterations=margin) if margin else region):
            values = labels[mask]
            values = values[values > 0]
            if values.size:
                found, counts = np.unique(values, return_counts=True)
                return int(found[np.argmax(counts)])
        return 0

    for margin, vector_limit in ((2, 4096), (1, 4096), (0, 4096), (2, 1)):
        monkeypatch.setattr(uncertain_regions, "_VECTOR_SHELL_VOXELS", vector_limit)
        regions = rank_regions(uncertainty, labels, SPACING, margin=margin)
        assert len(regions) == count
        for region in regions:
            z, y, x = region.centre_zyx
            assert region.label == reference(int(components[z, y, x]), margin)
