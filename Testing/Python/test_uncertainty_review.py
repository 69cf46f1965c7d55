"""uncertainty_review on slicer-core's real MRML: the uncertainty overlay, "Next uncertain region", reset.

The map is made here (bands of known values on the boundaries of real TotalSegmentator organs of
the small CT, and one blob in fat), so the regions and the segments they concern are known. Where
the views land is checked independently of rank_regions' own RAS: the slice centre is mapped back
through the input node's RASToIJK and must fall on an uncertain voxel of the region's segment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from MedSegAILib import mrml  # noqa: E402
from MedSegAILib.errors import MedSegAIInputError  # noqa: E402
from MedSegAILib.image import Volume  # noqa: E402
from MedSegAILib.uncertainty import uncertain_level  # noqa: E402
from MedSegAILib.uncertainty_review import UncertaintyReview  # noqa: E402
from scipy import ndimage  # noqa: E402

LIVER, SPLEEN, KIDNEY_RIGHT = 5, 1, 2
VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


def _rotation(degrees_xyz: tuple[float, float, float]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", degrees_xyz, degrees=True).as_matrix()


@pytest.fixture(scope="module")
def ct(ct_small: Path) -> Volume:
    return Volume.from_sitk(sitk.ReadImage(str(ct_small)))


@pytest.fixture(scope="module")
def case(ct: Volume, ct_small_label_map: np.ndarray, total_ct_label_names: dict[int, str]):
    """(labels array, labels spec, uncertainty array): the boundaries of liver and spleen, and a blob
    in the background far from both, uncertain."""
    assert ct_small_label_map.shape == ct.array.shape
    kept = (LIVER, SPLEEN, KIDNEY_RIGHT)
    labels = np.where(np.isin(ct_small_label_map, kept), ct_small_label_map, 0).astype(np.uint8)
    spec = [{"name": total_ct_label_names[value], "value": value} for value in kept]
    uncertainty = np.zeros(labels.shape, dtype=np.uint8)
    for value, level in ((LIVER, 230), (SPLEEN, 170)):
        mask = labels == value
        uncertainty[ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)] = level
    far = ndimage.distance_transform_cdt(labels == 0, metric="chessboard")
    far[[0, -1]] = far[:, [0, -1]] = far[:, :, [0, -1]] = 0  # a blob inside the image
    z, y, x = np.unravel_index(np.argmax(far), far.shape)
    assert far[z, y, x] > 4
    uncertainty[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 255  # 27 voxels concerning no segment
    uncertainty[ndimage.binary_dilation(labels > 0, iterations=3) & (uncertainty == 0) & (labels == 0)] = 20  # below threshold
    return labels, spec, uncertainty


def _scene_with_slice_views():
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for layout, orientation in VIEWS:
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode", layout)
        node.SetLayoutName(layout)
        assert node.SetOrientation(orientation)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(layout)
    return scene


def _matrix(node, getter: str) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    getattr(node, getter)(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _loaded(ct: Volume, case, variant: str):
    labels, spec, uncertainty = case
    volume = {
        "axis-aligned": ct,
        "left-right-flipped": Volume(ct.array, ct.spacing, ct.origin, ct.direction @ np.diag([-1.0, 1.0, 1.0])),
        "oblique": Volume(ct.array, ct.spacing, (12.25, -40.5, 3.75), _rotation((17.0, -8.0, 29.0))),
    }[variant]
    scene = _scene_with_slice_views()
    node = mrml.add_volume_node(scene, volume, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT MedSegAI")
    ids = mrml.update_segmentation_node(segmentation, volume.with_array(labels), spec, node)
    review = UncertaintyReview()
    regions = review.load(volume.with_array(uncertainty), node, segmentation, spec, volume.with_array(labels))
    return scene, node, segmentation, dict(zip(sorted(entry["value"] for entry in spec), ids)), review, regions


@pytest.mark.parametrize("variant", ["axis-aligned", "left-right-flipped", "oblique"])
def test_map_node_has_the_inputs_geometry_and_views_land_on_the_region(ct: Volume, case, variant: str) -> None:
    labels, spec, uncertainty = case
    scene, node, segmentation, segment_of, review, regions = _loaded(ct, case, variant)
    map_node = review.volume_node
    assert map_node.IsA("vtkMRMLScalarVolumeNode") and map_node is not node
    assert np.array_equal(_matrix(map_node, "GetIJKToRASMatrix"), _matrix(node, "GetIJKToRASMatrix"))
    assert np.array_equal(slicer.util.arrayFromVolume(map_node), uncertainty)
    display = map_node.GetDisplayNode()
    assert display.GetColorNode().GetAttribute(mrml.UNCERTAINTY_ATTRIBUTE) == "color"
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == 1.0
    assert display.GetColorNode().GetNumberOfColors() == 256

    # the map's regions: two organ boundaries and the blob (nothing from the sub-threshold shell), by volume
    assert [(r.rank, r.label, r.voxel_count) for r in regions] == [
        (0, LIVER, np.count_nonzero(uncertainty == 230)), (1, SPLEEN, np.count_nonzero(uncertainty == 170)), (2, 0, 27)]
    assert review.threshold_used == uncertain_level(4) > 20  # three labels and background; the shell stays below
    assert sum(r.voxel_count for r in regions) == int(np.count_nonzero(uncertainty >= review.threshold_used))

    assert review.counter_text() == f"{len(regions)} uncertain regions"
    assert review.show(True, 0.4) == len(VIEWS)
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(len(VIEWS))]
    assert all(c.GetForegroundVolumeID() == map_node.GetID() and c.GetForegroundOpacity() == pytest.approx(0.4)
               for c in composites)

    ras_to_ijk = np.linalg.inv(_matrix(node, "GetIJKToRASMatrix"))
    for step in (1, 2, 3):
        region = review.next_region()
        assert region is regions[step - 1] and review.visits.visited == set(range(step))
        assert review.counter_text().startswith(f"region {step} of {len(regions)}")
        for index in range(len(VIEWS)):
            slice_node = scene.GetNthNodeByClass(index, "vtkMRMLSliceNode")
            slice_to_ras = slice_node.GetSliceToRAS()
            centre = np.array([slice_to_ras.GetElement(row, 3) for row in range(3)])
            np.testing.assert_allclose(centre, region.centre_ras, atol=1e-6)
            i, j, k = (ras_to_ijk @ np.append(centre, 1.0))[:3]
            np.testing.assert_allclose((i, j, k), np.rint((i, j, k)), atol=1e-6)  # on a voxel centre
            z, y, x = (int(round(v)) for v in (k, j, i))
            assert uncertainty[z, y, x] >= review.threshold_used
        editor = scene.GetSingletonNode(mrml.SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        assert editor.GetSegmentationNode() is segmentation and editor.GetSourceVolumeNode() is node
        assert editor.GetSelectedSegmentID() == segment_of.get(region.label)  # the blob: no segment
    assert review.next_region() is None and review.counter_text() == "region 3 of 3 (all visited)"
    assert review.show(False, 0.4) == len(VIEWS) and not any(c.GetForegroundVolumeID() for c in composites)


def test_order_is_deterministic_and_a_new_segmentation_resets_the_list(ct: Volume, case) -> None:
    labels, spec, uncertainty = case
    scene, node, segmentation, segment_of, review, regions = _loaded(ct, case, "axis-aligned")
    again = UncertaintyReview().load(ct.with_array(uncertainty.copy()), node, segmentation, spec, ct.with_array(labels.copy()))
    assert again == regions
    map_node = review.volume_node
    review.next_region()
    review.next_region()
    assert review.counter_text() == f"region 2 of {len(regions)}"

    # a new Segment run: its map replaces the old in the same node, the list starts over
    class Result:
        segmentation_node = segmentation
        card = spec

    Result.labels = ct.with_array(labels)
    changed = uncertainty.copy()
    changed[labels == LIVER] = 0
    changed[ndimage.binary_erosion(labels == LIVER, iterations=2)] = 255
    Result.uncertainty = ct.with_array(changed)
    nodes_before = scene.GetNumberOfNodes()
    fresh = review.load_result(Result)
    assert review.volume_node is map_node and scene.GetNumberOfNodes() == nodes_before
    assert np.array_equal(slicer.util.arrayFromVolume(map_node), changed)
    assert review.visits.visited == set() and review.visits.current is None
    assert review.counter_text() == f"{len(fresh)} uncertain regions" and fresh != regions
    assert fresh[0].label == LIVER and review.next_region() is fresh[0]

    # every region visited: Next says so and changes nothing
    while review.next_region() is not None:
        pass
    assert review.counter_text().endswith("(all visited)") and len(review.visits.visited) == len(fresh)

    # a run without a map removes the stale one: nothing from the earlier run stays on screen
    Result.uncertainty = None
    assert review.load_result(Result) == [] and not review.has_map
    assert map_node.GetScene() is None and review.counter_text() == "no uncertainty map"


def test_a_map_off_the_inputs_grid_is_refused(ct: Volume, case) -> None:
    labels, spec, uncertainty = case
    scene, node, segmentation, _, _, _ = _loaded(ct, case, "axis-aligned")
    shifted = Volume(uncertainty, ct.spacing, tuple(o + 1.5 for o in ct.origin), ct.direction)
    before = scene.GetNumberOfNodes()
    with pytest.raises(MedSegAIInputError, match="not on the grid"):
        UncertaintyReview().load(shifted, node, segmentation, spec, ct.with_array(labels))
    assert scene.GetNumberOfNodes() == before
