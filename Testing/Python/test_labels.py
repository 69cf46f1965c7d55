"""One label, one terminology: the CLI's .seg.nrrd and the Slicer Logic's segment carry the same entry.

Every shipped label's segment is written both ways, on slicer-core's real MRML: by
:func:`MedSegAILib.io.segfile.write_segmentation` (the CLI's ``-o X.seg.nrrd``) and read back with
Slicer's own ``vtkMRMLSegmentationStorageNode``, and by :func:`MedSegAILib.slicer_bridge.mrml.update_segmentation_node`
(what the panel's Segment fills). The terminology tag strings must be equal, name Slicer's DICOM
master list, and be what Slicer's terminology logic parses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("slicerio")

from MedSegAILib.core import labels  # noqa: E402
from MedSegAILib.slicer_bridge import mrml  # noqa: E402
from MedSegAILib.io import segfile  # noqa: E402
from MedSegAILib.core.image import Volume  # noqa: E402
from MedSegAILib.model.modelcard import list_models  # noqa: E402


def _tag(segment) -> str:
    import vtk

    holder = vtk.reference("")
    segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), holder)
    return str(holder)


def _one_voxel_per_label(card) -> Volume:
    values = [label.value for label in card.labels]
    array = np.zeros((2, 3, max(values) + 1), dtype=np.uint8)
    for value in values:
        array[1, 1, value] = value
    return Volume(array=array, spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 5.0), direction=np.eye(3))


@pytest.mark.parametrize("card", list_models(), ids=lambda card: card.id)
def test_cli_file_and_slicer_segment_carry_the_same_terminology(card, tmp_path: Path) -> None:
    volume = _one_voxel_per_label(card)
    path = segfile.write_segmentation(tmp_path / "labels.seg.nrrd", volume, card)
    scene = slicer.vtkMRMLScene()
    from_file = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(from_file) == 1
    reference = mrml.add_volume_node(scene, volume.with_array(volume.array.astype(np.int16)), "input")
    from_logic = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = mrml.update_segmentation_node(from_logic, volume, card, reference)
    file_segments = from_file.GetSegmentation()
    assert file_segments.GetNumberOfSegments() == len(card.labels) == len(ids)
    for segment_id in ids:
        segment = from_logic.GetSegmentation().GetSegment(segment_id)
        twin = file_segments.GetSegment(file_segments.GetSegmentIdBySegmentName(segment.GetName()))
        logic_tag, file_tag = _tag(segment), _tag(twin)
        assert logic_tag == file_tag, segment.GetName()
        assert logic_tag.startswith(labels.DEFAULT_TERMINOLOGY_CONTEXT + "~")
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(logic_tag, entry)
        label = next(label for label in card.labels if label.name == segment.GetName())
        assert entry.GetTypeObject().GetCodeValue() == label.terminology["type"]["code"]
        assert tuple(twin.GetColor()) == pytest.approx(tuple(segment.GetColor()), abs=1e-6)


def test_one_rule_for_label_values() -> None:
    spec = [{"name": "a", "value": 300}]
    assert [e.value for e in labels.label_entries(spec)] == [300]  # a .seg.nrrd holds uint16
    with pytest.raises(ValueError, match="1..255"):
        mrml.label_entries(spec)  # the scene's labelmaps are uint8
    with pytest.raises(ValueError, match="unique"):
        labels.label_entries({"a": 1, "b": 1})
    entries = labels.label_entries([{"name": "b", "value": 2}, {"name": "a", "value": 1, "color": [1, 0, 0]}])
    assert [(e.name, e.color) for e in entries] == [("a", (1.0, 0.0, 0.0)), ("b", labels.default_color(2))]
