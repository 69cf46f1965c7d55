"""MedSegAILib.slicer_bridge.mrml: volume/segmentation nodes <-> Volume, on slicer-core's real MRML scene.

Geometry must survive exactly (IJKToRAS vs. LPS), including an oblique and a left-right-flipped
volume; Slicer's own NRRD reader and labelmap exporter are used as independent references.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from MedSegAILib.slicer_bridge import mrml  # noqa: E402
from MedSegAILib.core.errors import MedSegAIInputError  # noqa: E402
from MedSegAILib.core.image import Volume  # noqa: E402

LIVER_TERMINOLOGY = {
    "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
    "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"},
}
LABELS = [
    {"name": "liver", "value": 1, "color": [0.86, 0.55, 0.47], "terminology": LIVER_TERMINOLOGY},
    {"name": "bone", "value": 2, "color": [0.95, 0.84, 0.57]},
]


def _rotation(degrees_xyz: tuple[float, float, float]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", degrees_xyz, degrees=True).as_matrix()


@pytest.fixture(scope="module")
def ct(ct_small: Path) -> Volume:
    return Volume.from_sitk(sitk.ReadImage(str(ct_small)))


def _variants(ct: Volume) -> dict[str, Volume]:
    flipped = Volume(ct.array, ct.spacing, ct.origin, ct.direction @ np.diag([-1.0, 1.0, 1.0]))
    oblique = Volume(ct.array, ct.spacing, (12.25, -40.5, 3.75), _rotation((17.0, -8.0, 29.0)))
    return {"axis-aligned": ct, "left-right-flipped": flipped, "oblique": oblique}


def _ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.mark.parametrize("variant", ["axis-aligned", "left-right-flipped", "oblique"])
def test_volume_round_trip_is_exact(scene, ct: Volume, variant: str) -> None:
    volume = _variants(ct)[variant]
    node = mrml.add_volume_node(scene, volume, "CT")
    assert np.array_equal(_ijk_to_ras(node), volume.ijk_to_ras_matrix())
    back = mrml.volume_from_node(node)
    assert back.array.dtype == volume.array.dtype
    assert np.array_equal(back.array, volume.array)
    assert back.spacing == volume.spacing
    assert back.origin == volume.origin
    assert np.array_equal(back.direction, volume.direction)
    assert back.metadata == {}
    back.array[0, 0, 0] += 1  # a copy, not a view of the node's voxels
    assert mrml.volume_from_node(node).array[0, 0, 0] == volume.array[0, 0, 0]
    view = mrml.volume_from_node(node, copy=False)  # the engine run's input: the node's own voxels, read-only
    assert np.shares_memory(view.array, slicer.util.arrayFromVolume(node)) and not view.array.flags.writeable
    assert np.array_equal(view.array, volume.array) and view.same_grid(back)


@pytest.mark.parametrize("variant", ["left-right-flipped", "oblique"])
def test_volume_from_node_matches_slicer_nrrd_reader(scene, ct: Volume, variant: str, tmp_path: Path) -> None:
    """Slicer's own reader (RAS) and SimpleITK (LPS) must agree through volume_from_node."""
    volume = _variants(ct)[variant]
    path = tmp_path / "volume.nrrd"
    sitk.WriteImage(volume.to_sitk(), str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read by Slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    back = mrml.volume_from_node(node)
    reference = Volume.from_sitk(sitk.ReadImage(str(path)))
    # Slicer's reader may reorder/flip index axes; every voxel must still sit at the same LPS point.
    k, j, i = np.meshgrid(*[np.arange(n) for n in back.shape], indexing="ij")
    index = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    physical = back.index_to_physical_matrix() @ index
    reference_index = np.linalg.inv(reference.index_to_physical_matrix()) @ physical
    rounded = np.rint(reference_index[:3]).astype(int)
    np.testing.assert_allclose(reference_index[:3], rounded, atol=1e-6)
    ri, rj, rk = rounded
    assert np.array_equal(back.array.ravel(), reference.array[rk, rj, ri])
    assert np.array_equal(_ijk_to_ras(node)[:3] @ index, np.diag([-1.0, -1.0, 1.0]) @ physical[:3]) or np.allclose(
        _ijk_to_ras(node)[:3] @ index, np.diag([-1.0, -1.0, 1.0]) @ physical[:3], atol=1e-9)


@pytest.mark.parametrize("variant", ["axis-aligned", "left-right-flipped", "oblique"])
def test_segmentation_round_trip(scene, ct: Volume, variant: str) -> None:
    volume = _variants(ct)[variant]
    node = mrml.add_volume_node(scene, volume, "CT")
    labels = volume.with_array(((volume.array > 100).astype(np.uint8) + (volume.array > 300)).astype(np.uint8))
    assert set(np.unique(labels.array)) == {0, 1, 2}
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT MedSegAI")
    ids = mrml.update_segmentation_node(segmentation, labels, LABELS, node)

    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 2
    assert [seg.GetSegment(i).GetName() for i in ids] == ["liver", "bone"]
    np.testing.assert_allclose(seg.GetSegment(ids[1]).GetColor(), LABELS[1]["color"])
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is node

    back = mrml.labels_from_segmentation_node(segmentation, node, LABELS)
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, labels.array)
    assert back.spacing == volume.spacing and back.origin == volume.origin
    assert np.array_equal(back.direction, volume.direction)

    # Slicer's own exporter (independent path) gives the same voxels on the input grid.
    import vtk

    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    segment_ids = vtk.vtkStringArray()
    for segment_id in ids:
        segment_ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation, segment_ids, labelmap_node, node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    exported = mrml.volume_from_node(labelmap_node)
    assert np.array_equal(exported.array, labels.array)
    assert exported.same_grid(volume, tolerance=1e-9)


def test_terminology_string_is_what_slicer_parses() -> None:
    text = mrml.terminology_string(LIVER_TERMINOLOGY)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, entry)
    assert entry.GetCategoryObject().GetCodeValue() == "123037004"
    assert entry.GetCategoryObject().GetCodingSchemeDesignator() == "SCT"
    assert entry.GetTypeObject().GetCodeMeaning() == "Liver"
    expected = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        mrml.DEFAULT_TERMINOLOGY_CONTEXT, "123037004", "SCT", "Anatomical Structure", "10200004", "SCT", "Liver",
        "", "", "", "", "", "", "", "", "", "")
    assert text == expected


def test_segment_terminology_tag_is_set(scene, ct: Volume) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = mrml.update_segmentation_node(segmentation, ct.with_array((ct.array > 100).astype(np.uint8)), LABELS[:1], node)
    segment = segmentation.GetSegmentation().GetSegment(ids[0])
    tag = segment.GetTerminology() if hasattr(segment, "GetTerminology") else None
    if tag is None:
        import vtk

        holder = vtk.reference("")
        segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), holder)
        tag = str(holder)
    assert "SCT^10200004^Liver" in tag


def test_update_replaces_label_segments_and_keeps_others(scene, ct: Volume) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg = segmentation.GetSegmentation()
    notes = slicer.vtkSegment()
    notes.SetName("my notes")
    notes.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(),
                            mrml._oriented_image_from_node_geometry(node))
    user_id = "my notes"
    assert seg.AddSegment(notes, user_id)
    first = mrml.update_segmentation_node(segmentation, ct.with_array((ct.array > 100).astype(np.uint8)), LABELS, node)
    second_labels = ct.with_array((ct.array > 500).astype(np.uint8) * 2)
    second = mrml.update_segmentation_node(segmentation, second_labels, LABELS, node)
    assert first == second  # segment ids kept
    assert seg.GetNumberOfSegments() == 3 and seg.GetSegment(user_id) is not None
    back = mrml.labels_from_segmentation_node(segmentation, node, LABELS)
    assert np.array_equal(back.array, second_labels.array)


def test_edit_through_mrml_api_is_exported(scene, ct: Volume) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = ct.with_array((ct.array > 300).astype(np.uint8))
    ids = mrml.update_segmentation_node(segmentation, labels, LABELS[:1], node)
    # Erase one slab of the segment, as a user would with the Segment Editor's eraser.
    edited = labels.array.copy()
    edited[10:14] = 0
    image = mrml._oriented_image_from_node_geometry(node, edited)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation, ids[0], slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    back = mrml.labels_from_segmentation_node(segmentation, node, LABELS[:1])
    assert np.array_equal(back.array, edited)
    assert np.count_nonzero(back.array != labels.array) == np.count_nonzero(labels.array[10:14])


def test_labels_not_on_reference_grid_are_refused(scene, ct: Volume) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    shifted = Volume((ct.array > 0).astype(np.uint8), ct.spacing, (ct.origin[0] + 5, ct.origin[1], ct.origin[2]), ct.direction)
    with pytest.raises(MedSegAIInputError, match="not on the grid"):
        mrml.update_segmentation_node(segmentation, shifted, LABELS, node)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0
    with pytest.raises(ValueError, match="values"):
        mrml.update_segmentation_node(segmentation, ct.with_array(np.full(ct.shape, 7, np.uint8)), LABELS, node)


def test_refuses_missing_2d_vector_and_empty_nodes(scene, ct: Volume) -> None:
    with pytest.raises(MedSegAIInputError, match="No volume is selected for T1post"):
        mrml.volume_from_node(None, "T1post")
    flat = mrml.add_volume_node(scene, Volume(ct.array[:1].copy(), ct.spacing, ct.origin, ct.direction), "flat")
    with pytest.raises(MedSegAIInputError, match="is 2D"):
        mrml.volume_from_node(flat)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(MedSegAIInputError, match="has no voxels"):
        mrml.volume_from_node(empty)
    import vtk

    rgb = vtk.vtkImageData()
    rgb.SetDimensions(4, 5, 6)
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    vector.SetAndObserveImageData(rgb)
    with pytest.raises(MedSegAIInputError, match="3 values per voxel"):
        mrml.volume_from_node(vector)
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    with pytest.raises(MedSegAIInputError, match="not a scalar volume"):
        mrml.volume_from_node(model)


def test_place_in_study_puts_segmentation_under_the_inputs_study(scene, ct: Volume) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient A")
    study = hierarchy.CreateStudyItem(patient, "Study 1")
    item = hierarchy.GetItemByDataNode(node)  # Slicer creates it automatically; slicer-core does not
    if item:
        hierarchy.SetItemParent(item, study)
    else:
        hierarchy.CreateItem(study, node)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert mrml.place_in_study(segmentation, node) == study
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    loose = mrml.add_volume_node(scene, ct, "loose")
    table = mrml.measurements_table_node(scene, [])
    assert mrml.place_in_study(table, loose) == hierarchy.GetSceneItemID()


def test_measurements_table(scene) -> None:
    rows = [
        {"name": "liver", "value": 1, "voxels": 1000, "volume_ml": 27.0, "max_diameter_mm": 81.5},
        {"name": "bone", "value": 2, "voxel_count": 0, "volume_ml": 0.0, "max_diameter_mm": 0.0},
    ]
    table_node = mrml.measurements_table_node(scene, rows, "CT measurements")
    table = table_node.GetTable()
    assert table.GetNumberOfRows() == 2
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    assert names == [title for title, _, _ in mrml.MEASUREMENT_COLUMNS]
    assert table.GetValueByName(0, "Segment").ToString() == "liver"
    assert table.GetValueByName(0, "Volume (mL)").ToDouble() == pytest.approx(27.0)
    assert table.GetValueByName(0, "Max diameter (mm)").ToDouble() == pytest.approx(81.5)
    assert table.GetValueByName(0, "Voxels").ToInt() == 1000
    assert table.GetValueByName(1, "Label value").ToInt() == 2
    same = mrml.measurements_table_node(scene, rows[:1], table_node=table_node)
    assert same is table_node and table.GetNumberOfRows() == 1


def test_label_entries_forms() -> None:
    entries = mrml.label_entries({"background": 0, "kidney": 2, "liver": 1})
    assert [(e.name, e.value) for e in entries] == [("liver", 1), ("kidney", 2)]
    assert all(len(e.color) == 3 and all(0 <= c <= 1 for c in e.color) for e in entries)
    with pytest.raises(ValueError):
        mrml.label_entries([{"name": "a", "value": 1}, {"name": "b", "value": 1}])
    with pytest.raises(ValueError):
        mrml.label_entries([{"name": "a", "value": 300}])
    with pytest.raises(TypeError):
        mrml.label_entries(5)


@pytest.mark.parametrize("transform", ["translated", "rotated"])
def test_reference_geometry_equals_the_input_under_a_parent_transform(scene, ct: Volume, transform: str) -> None:
    """Segment Editor and DICOM SEG export use the reference geometry: it must be the input's own grid.

    Slicer converts a reference geometry set under another parent transform into the node's frame;
    with the input under a 100 mm translation (or a rotation) that shifted the geometry before.
    """
    import vtk

    small = Volume(np.ascontiguousarray(ct.array[:8]), ct.spacing, ct.origin, ct.direction)
    volume_node = mrml.add_volume_node(scene, small, "CT")
    matrix = vtk.vtkMatrix4x4()
    if transform == "translated":
        matrix.SetElement(0, 3, 100.0)
        matrix.SetElement(2, 3, -35.0)
    else:
        rotation = _rotation((10.0, -20.0, 30.0))
        for row in range(3):
            for column in range(3):
                matrix.SetElement(row, column, rotation[row, column])
        matrix.SetElement(1, 3, 42.0)
    transform_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform_node.SetMatrixTransformToParent(matrix)
    volume_node.SetAndObserveTransformNodeID(transform_node.GetID())

    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = small.with_array((small.array > 200).astype(np.uint8))
    mrml.update_segmentation_node(segmentation_node, labels, LABELS, volume_node)

    assert segmentation_node.GetTransformNodeID() == transform_node.GetID()
    geometry = slicer.vtkOrientedImageData()
    reference = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(reference, geometry)
    geometry_matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(geometry_matrix)
    as_array = np.array([[geometry_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(as_array, _ijk_to_ras(volume_node), atol=1e-6)
    extent = geometry.GetExtent()
    assert [extent[1] + 1, extent[3] + 1, extent[5] + 1] == list(small.array.shape[::-1])
    exported = mrml.labels_from_segmentation_node(segmentation_node, volume_node, LABELS)
    assert np.array_equal(exported.array, labels.array)
