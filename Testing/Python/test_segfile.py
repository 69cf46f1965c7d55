"""segfile: .seg.nrrd read back by slicerio and by 3D Slicer's own storage node (slicer-core)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicerio

from MedSegAILib.io import imageio, segfile
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume

ANATOMY = {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"}
LABELS = [
    {"name": "liver", "value": 1, "color": [0.86, 0.55, 0.47],
     "terminology": {"category": ANATOMY, "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}}},
    {"name": "spleen", "value": 2, "color": [0.62, 0.36, 0.71]},
    {"name": "right kidney", "value": 3, "color": [0.73, 0.45, 0.27],
     "terminology": {"category": ANATOMY, "type": {"scheme": "SCT", "code": "64033007", "meaning": "Kidney"},
                     "type_modifier": {"scheme": "SCT", "code": "24028007", "meaning": "Right"}}},
    {"name": "pancreas", "value": 7, "color": [0.9, 0.8, 0.3]},
]  # fmt: skip
TOTALSEG = {1: 5, 2: 1, 3: 2}  # our value -> TotalSegmentator value in example_seg.nii.gz (pancreas left empty)


@pytest.fixture(scope="module")
def labels(ct_small_labels: Path) -> Volume:
    source = imageio.read_volume(ct_small_labels)
    array = np.zeros(source.shape, np.uint8)
    for ours, theirs in TOTALSEG.items():
        array[source.array == theirs] = ours
    return source.with_array(array)


def _oblique(labels: Volume) -> Volume:
    angle = np.deg2rad(25.0)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])
    return Volume(labels.array, (0.8, 1.1, 3.3), (12.0, -40.5, 88.25), rotation @ np.diag([-1.0, 1.0, -1.0]))


def test_slicerio_reads_names_colours_values_terminology(tmp_path: Path, labels: Volume) -> None:
    path = segfile.write_segmentation(tmp_path / "out.seg.nrrd", labels, LABELS)
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["liver", "spleen", "right kidney", "pancreas"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 3, 7]
    assert all(s["layer"] == 0 for s in seg["segments"])
    for segment, label in zip(seg["segments"], LABELS):
        assert segment["color"] == pytest.approx(label["color"])
    liver = slicerio.segment_from_name(seg, "liver")["terminology"]
    assert liver["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert liver["type"] == ["SCT", "10200004", "Liver"]
    kidney = slicerio.segment_from_name(seg, "right kidney")["terminology"]
    assert kidney["typeModifier"] == ["SCT", "24028007", "Right"]
    assert "terminology" not in slicerio.segment_from_name(seg, "spleen")
    voxels = seg["voxels"]  # (i, j, k)
    np.testing.assert_array_equal(voxels.transpose(2, 1, 0), labels.array)
    np.testing.assert_allclose(seg["ijkToLPS"], labels.index_to_physical_matrix(), atol=1e-9)
    assert not slicerio.segment_mask(seg, "pancreas").any()
    assert int(slicerio.segment_mask(seg, "liver").sum()) == int((labels.array == 1).sum()) > 1000


def test_oblique_flipped_geometry_kept(tmp_path: Path, labels: Volume) -> None:
    oblique = _oblique(labels)
    path = segfile.write_segmentation(tmp_path / "oblique.seg.nrrd", oblique, LABELS)
    written = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(written["ijkToLPS"], oblique.index_to_physical_matrix(), atol=1e-9)
    back, entries = segfile.read_segmentation_labels(path)
    assert back.same_grid(oblique, tolerance=1e-9)
    np.testing.assert_array_equal(back.array, oblique.array)
    context = segfile.DEFAULT_TERMINOLOGY_CONTEXT
    assert entries[0] == {**LABELS[0], "terminology": {**LABELS[0]["terminology"], "context": context}}
    assert [(e["name"], e["value"]) for e in entries] == [(e["name"], e["value"]) for e in LABELS]


def _slicer_segment_masks(path: Path) -> tuple[dict[str, tuple], dict[str, np.ndarray], np.ndarray]:
    """Load ``path`` with Slicer's vtkMRMLSegmentationStorageNode.

    Returns per-segment (colour, label value), per-segment (mask (z, y, x), offset), and IJKToRAS.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    segmentation = node.GetSegmentation()
    info, masks, matrix = {}, {}, None
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetNthSegment(index)
        image = slicer.vtkOrientedImageData()
        node.GetBinaryLabelmapRepresentation(segment_id, image)
        vtk_matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(vtk_matrix)
        matrix = np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        i0, i1, j0, j1, k0, k1 = image.GetExtent()
        mask = None
        if i1 >= i0:
            scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
            mask = scalars.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1) != 0
        masks[segment.GetName()] = (mask, (k0, j0, i0))
        info[segment.GetName()] = (tuple(segment.GetColor()), segment.GetLabelValue())
    return info, masks, matrix


def test_slicer_storage_node_reads_file(tmp_path: Path, labels: Volume) -> None:
    oblique = _oblique(labels)
    path = segfile.write_segmentation(tmp_path / "slicer.seg.nrrd", oblique, LABELS)
    info, masks, ijk_to_ras = _slicer_segment_masks(path)
    assert list(info) == [label["name"] for label in LABELS]
    for label in LABELS:
        color, value = info[label["name"]]
        assert color == pytest.approx(label["color"], abs=1e-6)
        assert value == label["value"]
        mask, (k0, j0, i0) = masks[label["name"]]
        full = np.zeros(oblique.shape, dtype=bool)
        if mask is not None:
            full[k0 : k0 + mask.shape[0], j0 : j0 + mask.shape[1], i0 : i0 + mask.shape[2]] = mask
        np.testing.assert_array_equal(full, oblique.array == label["value"])
    np.testing.assert_allclose(ijk_to_ras, oblique.ijk_to_ras_matrix(), atol=1e-6)


def test_refuses_existing_and_overwrites_on_request(tmp_path: Path, labels: Volume) -> None:
    target = tmp_path / "seg.seg.nrrd"
    target.write_bytes(b"keep me")
    with pytest.raises(MedSegAIInputError, match="exists; pass --overwrite"):
        segfile.write_segmentation(target, labels, LABELS)
    assert target.read_bytes() == b"keep me"
    segfile.write_segmentation(target, labels, LABELS, overwrite=True)
    assert [s["name"] for s in slicerio.read_segmentation(str(target))["segments"]][0] == "liver"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.seg.nrrd"]


def test_wrong_suffix(tmp_path: Path, labels: Volume) -> None:
    with pytest.raises(MedSegAIInputError, match="end the output name with .seg.nrrd"):
        segfile.write_segmentation(tmp_path / "labels.nrrd", labels, LABELS)


def test_values_missing_from_spec_and_bad_entries(tmp_path: Path, labels: Volume) -> None:
    with pytest.raises(ValueError, match=r"values \[3\]"):
        segfile.write_segmentation(tmp_path / "a.seg.nrrd", labels, LABELS[:2])
    with pytest.raises(ValueError, match="repeat"):
        segfile.write_segmentation(tmp_path / "a.seg.nrrd", labels, LABELS + [{"name": "again", "value": 1}])
    with pytest.raises(ValueError, match="color of 'liver'"):
        segfile.write_segmentation(tmp_path / "a.seg.nrrd", labels, [{**LABELS[0], "color": [1, 2, 3]}] + LABELS[1:])
    assert list(tmp_path.iterdir()) == []


def test_accepts_model_card_like_object(tmp_path: Path, labels: Volume) -> None:
    class Card:
        def __init__(self) -> None:
            self.labels = LABELS

    path = segfile.write_segmentation(tmp_path / "card.seg.nrrd", labels, Card())
    header = slicerio.read_segmentation(str(path), skip_voxels=True)
    assert slicerio.segment_names(header) == [x["name"] for x in LABELS]


def test_header_and_voxels_as_slicerio_writes_them(tmp_path: Path, labels: Volume) -> None:
    """The file equals slicerio's own .seg.nrrd field for field; only the voxel compression differs."""
    import nrrd

    oblique = _oblique(labels)
    ours = segfile.write_segmentation(tmp_path / "ours.seg.nrrd", oblique, LABELS)
    reference = tmp_path / "slicerio.seg.nrrd"
    entries = segfile.label_entries(LABELS)
    slicerio.write_segmentation(str(reference), segfile._segmentation(oblique, entries), compression_level=1, index_order="C")
    our_data, our_header = nrrd.read(str(ours), index_order="C")
    their_data, their_header = nrrd.read(str(reference), index_order="C")
    assert list(our_header) == list(their_header)
    for field, value in their_header.items():
        np.testing.assert_array_equal(our_header[field], value, err_msg=field)
    assert our_header["sizes"].tolist() == list(oblique.shape[::-1])
    assert our_header["encoding"] == "gzip"
    np.testing.assert_array_equal(our_data, their_data)
    np.testing.assert_array_equal(our_data, oblique.array)


def test_many_threads_and_uint16_read_by_slicer(tmp_path: Path, labels: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20 MB uint16 map (label 300) written on 3 threads in several blocks: Slicer and slicerio read it exactly."""
    monkeypatch.setenv("MEDSEGAI_THREADS", "3")
    reps = -(-200 // labels.shape[0])
    array = np.tile(labels.array, (reps, 2, 2))[:200].astype(np.uint16)
    array[array == 3] = 300
    big = Volume(array, labels.spacing, labels.origin, labels.direction)
    assert array.nbytes > 16 << 20  # more than the 4 MiB minimum block several times over
    spec = [dict(LABELS[0]), dict(LABELS[1]), {**LABELS[2], "value": 300}]
    path = segfile.write_segmentation(tmp_path / "big.seg.nrrd", big, spec)
    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), array)
    info, masks, _ = _slicer_segment_masks(path)
    assert info["right kidney"][1] == 300
    mask, (k0, j0, i0) = masks["right kidney"]
    full = np.zeros(array.shape, dtype=bool)
    full[k0 : k0 + mask.shape[0], j0 : j0 + mask.shape[1], i0 : i0 + mask.shape[2]] = mask
    np.testing.assert_array_equal(full, array == 300)
