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

from MedSegAILib.slicer_bridge import mrml
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.inference.uncertainty import uncertain_level
from MedSegAILib.slicer_bridge.uncertainty_review import UncertaintyReview
from scipy import ndimage

LIVER, SPLEEN, KIDNEY_RIGHT = 5, 1, 2
VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))
SHELL = uncertain_level(4) - 1  # a shell of uncertainty just below what counts as uncertain


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
    uncertainty[ndimage.binary_dilation(labels > 0, iterations=3) & (uncertainty == 0) & (labels == 0)] = SHELL  # below threshold
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
    uncertainty = case[2]
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
    assert review.threshold_used == uncertain_level(4) > SHELL  # three labels and background; the shell stays below
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
            z, y, x = (round(v) for v in (k, j, i))
            assert uncertainty[z, y, x] >= review.threshold_used
        editor = scene.GetSingletonNode(mrml.SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        assert editor.GetSegmentationNode() is segmentation and editor.GetSourceVolumeNode() is node
        assert editor.GetSelectedSegmentID() == segment_of.get(region.label)  # the blob: no segment
    assert review.next_region() is None and review.counter_text() == "region 3 of 3 (all visited)"
    assert review.show(False, 0.4) == len(VIEWS) and not any(c.GetForegroundVolumeID() for c in composites)


def test_order_is_deterministic_and_a_new_segmentation_resets_the_list(ct: Volume, case) -> None:
    labels, spec, uncertainty = case
    scene, node, segmentation, _, review, regions = _loaded(ct, case, "axis-aligned")
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
    assert map_node.GetName() == "CT uncertainty"
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


# --------------------------------------------------------------------------------------------
# Through the real engine process: Segment with the map, then review; Rank loaded volumes
# --------------------------------------------------------------------------------------------

ENGINE_TIMEOUT = 300


@pytest.fixture(autouse=True)
def _quiet_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MEDSEGAI_THREADS", "1")


def _small_case(near: int, blob: bool = False) -> Volume:
    """Bone (certain) beside voxels exactly at the analytic model's threshold (maximally uncertain)."""
    from analytic_models import THRESHOLD_HU

    array = np.full((6, 24, 24), -1000.0, np.float32)
    array[1:5, 2:10, 2:10] = 1000.0
    array.reshape(-1)[:near] = THRESHOLD_HU
    if blob:
        array[1:4, 10, 2:11] = THRESHOLD_HU  # 27 voxels on the bone's face
        array[1:3, 19:21, 19:21] = THRESHOLD_HU  # 8 voxels far from it
    return Volume(array, (0.9, 0.8, 2.0), (3.0, -4.0, 5.0), _rotation((0.0, 0.0, 90.0)) @ np.diag([1.0, 1.0, -1.0]))


def test_segment_with_uncertainty_then_next_region(analytic_model_dir: Path) -> None:
    from MedSegAILib.slicer_bridge import slicer_logic

    scene = _scene_with_slice_views()
    volume = _small_case(0, blob=True)
    node = mrml.add_volume_node(scene, volume, "small CT")
    options = slicer_logic.EngineOptions(device="cpu", backend="onnx", uncertainty=True)
    result = slicer_logic.run_segmentation_blocking([node], str(analytic_model_dir), options=options, timeout=ENGINE_TIMEOUT)
    review = UncertaintyReview()
    regions = review.load_result(result)
    assert [(r.voxel_count, r.peak_uncertainty) for r in regions] == [(27, 255), (8, 255)]
    assert np.array_equal(_matrix(review.volume_node, "GetIJKToRASMatrix"), _matrix(node, "GetIJKToRASMatrix"))
    assert np.array_equal(slicer.util.arrayFromVolume(review.volume_node), result.uncertainty.array)
    region = review.next_region()
    assert region is regions[0] and region.label == 1 and review.counter_text() == "region 1 of 2"
    editor = scene.GetSingletonNode(mrml.SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
    bone = result.segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("bone")
    assert editor.GetSelectedSegmentID() == bone == result.segment_ids[0]
    slice_to_ras = scene.GetFirstNodeByClass("vtkMRMLSliceNode").GetSliceToRAS()
    i, j, k = (np.linalg.inv(_matrix(node, "GetIJKToRASMatrix")) @ [*(slice_to_ras.GetElement(r, 3) for r in range(3)), 1.0])[:3]
    np.testing.assert_allclose((k, j, i), (2, 10, 6), atol=1e-6)  # the slab's middle voxel, through the node's own geometry
    assert review.next_region() is regions[1] and review.next_region() is None
    assert review.next_region(start_over=True) is regions[0] and review.visits.visited == {0}


def test_rank_loaded_volumes_orders_by_expected_error(analytic_model_dir: Path) -> None:
    from MedSegAILib.slicer_bridge import slicer_logic
    from MedSegAILib.slicer_bridge.uncertainty_review import (
        RankRun,
        rankable_volume_nodes,
        ranking_text,
    )

    scene = slicer.vtkMRMLScene()
    for name, near in (("calm", 0), ("worst", 30), ("some", 6)):
        mrml.add_volume_node(scene, _small_case(near), name)
    mrml.add_volume_node(scene, _small_case(0).with_array(np.zeros((6, 24, 24), np.uint8)), "labels", labelmap=True)
    mrml.set_uncertainty_volume_node(scene, _small_case(0).with_array(np.zeros((6, 24, 24), np.uint8)),
                                     scene.GetFirstNodeByName("calm"))
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    mrml.add_volume_node(scene, Volume(np.ones((1, 24, 24), np.float32)), "2D")
    volumes = rankable_volume_nodes(scene)
    assert [node.GetName() for node in volumes] == ["calm", "worst", "some"]
    before = scene.GetNumberOfNodes()
    options = slicer_logic.EngineOptions(device="cpu", backend="onnx")
    run = RankRun(volumes, str(analytic_model_dir), options).start()
    assert all(name.startswith("case_") for name in run.files)  # no node names reach the engine
    run.wait(timeout=ENGINE_TIMEOUT)
    cases = run.finish()
    assert [case.name for case in cases] == ["worst", "some", "calm"] and [case.rank for case in cases] == [1, 2, 3]
    assert cases[0].score > cases[1].score > cases[2].score == 0.0
    assert ranking_text(cases).splitlines()[1].startswith("1. worst")
    assert scene.GetNumberOfNodes() == before and run.temp_dir is None

    cancelled = RankRun(volumes, str(analytic_model_dir), options).start()
    cancelled.cancel()
    assert cancelled.wait_stopped(10.0)
    with pytest.raises(MedSegAIInputError, match="cancelled"):
        cancelled.finish()
    with pytest.raises(MedSegAIInputError, match="at least 2 volumes"):
        RankRun(volumes[:1], str(analytic_model_dir), options).start()


def test_two_channel_model_reviews_on_the_first_channels_grid(tmp_path: Path) -> None:
    """A two-channel model (as the brain model): the map and the regions lie on the first channel's grid,
    whatever the second channel's grid."""
    from analytic_models import threshold_model_folder
    from MedSegAILib.slicer_bridge import slicer_logic

    model = threshold_model_folder(tmp_path / "two-channel", mode="2d", patch=[16, 16], backends=("onnx",),
                                   model_id="analytic-two-channel", channels=("T1", "FLAIR"))
    scene = _scene_with_slice_views()
    first = _small_case(0, blob=True)
    second = Volume(np.random.default_rng(0).normal(100, 20, (8, 30, 30)).astype(np.float32), (0.7, 0.7, 1.6), (1.0, -6.0, 3.0), _rotation((5.0, 3.0, -10.0)))
    nodes = [mrml.add_volume_node(scene, first, "T1"), mrml.add_volume_node(scene, second, "FLAIR")]
    options = slicer_logic.EngineOptions(device="cpu", backend="onnx", uncertainty=True)
    result = slicer_logic.run_segmentation_blocking(nodes, str(model), options=options, timeout=ENGINE_TIMEOUT)
    review = UncertaintyReview()
    regions = review.load_result(result)
    assert review.reference_volume_node is nodes[0]
    assert np.array_equal(_matrix(review.volume_node, "GetIJKToRASMatrix"), _matrix(nodes[0], "GetIJKToRASMatrix"))
    assert [(r.voxel_count, r.label) for r in regions][:1] == [(27, 1)]
    assert review.next_region() is regions[0] and review.counter_text() == f"region 1 of {len(regions)}"
