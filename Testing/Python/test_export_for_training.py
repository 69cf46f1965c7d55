"""Export for training from the Slicer layer: edit the AI segmentation through the MRML API, export,
re-read the dataset files. Uses the brain DICOM study, whose headers carry the patient's name and id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from MedSegAILib.data import dataset  # noqa: E402
from MedSegAILib.slicer_bridge import mrml, slicer_logic  # noqa: E402
from MedSegAILib.core.errors import MedSegAIInputError  # noqa: E402
from MedSegAILib.io.imageio import read_volume  # noqa: E402

THRESHOLD = 300.5


@pytest.fixture(scope="module")
def patient(brain_dicom_study: Path) -> dict[str, str]:
    """The identifying values in the study's DICOM headers (must never reach the dataset)."""
    import pydicom

    header = pydicom.dcmread(next((brain_dicom_study / "dicom" / "T1post").glob("*.dcm")), stop_before_pixels=True)
    values = {"name": str(header.PatientName), "id": str(header.PatientID),
              "birth": str(header.get("PatientBirthDate", "")), "study date": str(header.get("StudyDate", ""))}
    assert values["name"] and values["id"]
    return values


@pytest.fixture(scope="module")
def brain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from analytic_models import threshold_model_folder

    return threshold_model_folder(tmp_path_factory.mktemp("models") / "brain", mode="2d", backends=("onnx",),
                                  model_id="analytic-brain", channels=("T1post", "FLAIR"))


@pytest.fixture()
def loaded_study(brain_dicom_study: Path, patient: dict[str, str]):
    """The study in a scene as Slicer's DICOM module loads it: patient/study items carry DICOM fields."""
    scene = slicer.vtkMRMLScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient_item = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), patient["name"])
    hierarchy.SetItemAttribute(patient_item, "DICOM.PatientName", patient["name"])
    hierarchy.SetItemAttribute(patient_item, "DICOM.PatientID", patient["id"])
    hierarchy.SetItemAttribute(patient_item, "DICOM.PatientBirthDate", patient["birth"])
    study_item = hierarchy.CreateStudyItem(patient_item, f"MR {patient['study date']}")
    nodes = []
    for series in ("T1post", "FLAIR"):
        volume = read_volume(brain_dicom_study / "dicom" / series)
        node = mrml.add_volume_node(scene, volume, f"{patient['name']} {series}")  # a name carrying the patient name
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, study_item)
        else:
            hierarchy.CreateItem(study_item, node)
        nodes.append(node)
    return scene, nodes


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_edit_export_and_reread(loaded_study, brain_model: Path, patient: dict[str, str], tmp_path: Path) -> None:
    scene, (t1_node, flair_node) = loaded_study
    result = slicer_logic.run_segmentation_blocking([t1_node, flair_node], str(brain_model),
                                                    options=slicer_logic.EngineOptions(device="cpu", backend="onnx"), timeout=300)
    t1 = mrml.volume_from_node(t1_node)
    ai = (t1.array > THRESHOLD).astype(np.uint8)
    assert np.array_equal(result.labels.array, ai) and ai.sum() > 1000

    # The user erases one slab and paints a box, through the MRML API (as Segment Editor does).
    edited = ai.copy()
    edited[8:10] = 0
    edited[12, 100:120, 100:130] = 1
    expected_changes = int(np.count_nonzero(edited != ai))
    assert expected_changes > 0
    segmentation = result.segmentation_node
    image = mrml._oriented_image_from_node_geometry(t1_node, edited)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation, result.segment_ids[0], slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)

    dataset_dir = tmp_path / "dataset"
    nodes_before = scene.GetNumberOfNodes()
    case_id = slicer_logic.export_for_training(scene, segmentation, [t1_node, flair_node], dataset_dir, result.card, result.labels)
    assert scene.GetNumberOfNodes() == nodes_before
    assert slicer_logic.dataset_case_count(dataset_dir) == 1

    info = dataset.load_dataset(dataset_dir)
    assert info.channels == ["T1post", "FLAIR"] and info.labels == {"background": 0, "bone": 1}
    case = info.case(case_id)
    assert case.changed_voxels == expected_changes
    assert slicer_logic.dataset_case_changed_voxels(dataset_dir, case_id) == expected_changes
    assert case.source_model == {"id": "analytic-brain", "version": "1.0.0"}
    images, label = dataset.read_case(info, case)
    assert np.array_equal(label.array, edited)
    assert label.same_grid(t1, tolerance=1e-9)
    np.testing.assert_allclose(label.origin, t1.origin, atol=1e-9)
    np.testing.assert_allclose(label.direction, t1.direction, atol=1e-12)
    assert np.array_equal(images[0].array, t1.array)
    assert np.array_equal(images[1].array, mrml.volume_from_node(flair_node).array)

    # No patient name, id, birth date or study date in any file name or content.
    secrets = [value for value in (patient["name"], patient["id"], patient["birth"], patient["study date"]) if value]
    for path in dataset_dir.rglob("*"):
        for value in secrets:
            assert value not in str(path.relative_to(dataset_dir))
            if path.is_file():
                assert value.encode() not in path.read_bytes(), f"{value!r} found in {path}"
    patient_key = json.loads((dataset_dir / "dataset.json").read_text())["cases"][0]["patient"]
    assert patient_key.startswith("p_") and patient["id"] not in patient_key

    # A second export is a new case of the same patient; the first stays byte for byte.
    first = _digest(dataset_dir / "images") | _digest(dataset_dir / "labels")
    second_id = slicer_logic.export_for_training(scene, segmentation, [t1_node, flair_node], dataset_dir, result.card, result.labels)
    assert second_id != case_id
    info = dataset.load_dataset(dataset_dir)
    assert [c.id for c in info.cases] == [case_id, second_id]
    assert info.case(second_id).patient == info.case(case_id).patient
    after = _digest(dataset_dir / "images") | _digest(dataset_dir / "labels")
    assert {k: v for k, v in after.items() if k in first} == first
    assert slicer_logic.dataset_case_count(dataset_dir) == 2


def test_export_refuses_bad_requests(loaded_study, brain_model: Path, tmp_path: Path) -> None:
    from MedSegAILib.model.modelcard import ModelCard

    scene, (t1_node, flair_node) = loaded_study
    card = ModelCard.from_folder(brain_model)
    t1 = mrml.volume_from_node(t1_node)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    mrml.update_segmentation_node(segmentation, t1.with_array((t1.array > THRESHOLD).astype(np.uint8)), card, t1_node)
    dataset_dir = tmp_path / "dataset"
    with pytest.raises(MedSegAIInputError, match="No dataset folder"):
        slicer_logic.export_for_training(scene, segmentation, [t1_node, flair_node], "", card)
    with pytest.raises(MedSegAIInputError, match="needs 2 image"):
        slicer_logic.export_for_training(scene, segmentation, [t1_node], dataset_dir, card)
    with pytest.raises(MedSegAIInputError, match="No segmentation"):
        slicer_logic.export_for_training(scene, None, [t1_node, flair_node], dataset_dir, card)
    segment = segmentation.GetSegmentation().GetNthSegment(0)
    segment.SetName("renamed by the user")
    with pytest.raises(MedSegAIInputError, match="named like the model's labels"):
        slicer_logic.export_for_training(scene, segmentation, [t1_node, flair_node], dataset_dir, card)
    assert not dataset_dir.exists() or slicer_logic.dataset_case_count(dataset_dir) == 0
    segment.SetName("bone")
    case_id = slicer_logic.export_for_training(scene, segmentation, [t1_node, flair_node], dataset_dir, card)
    assert dataset.load_dataset(dataset_dir).case(case_id).changed_voxels is None  # no AI result to compare with


def test_extra_channel_on_another_grid_is_resampled(loaded_study, brain_model: Path, tmp_path: Path) -> None:
    from MedSegAILib.core.image import Volume
    from MedSegAILib.model.modelcard import ModelCard

    scene, (t1_node, flair_node) = loaded_study
    card = ModelCard.from_folder(brain_model)
    t1 = mrml.volume_from_node(t1_node)
    flair = mrml.volume_from_node(flair_node)
    half = Volume(flair.array[:, ::2, ::2].copy(), (flair.spacing[0] * 2, flair.spacing[1] * 2, flair.spacing[2]),
                  flair.origin, flair.direction)
    coarse_node = mrml.add_volume_node(scene, half, "FLAIR coarse")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.update_segmentation_node(segmentation, t1.with_array((t1.array > THRESHOLD).astype(np.uint8)), card, t1_node)
    case_id = slicer_logic.export_for_training(scene, segmentation, [t1_node, coarse_node], tmp_path / "d", card)
    images, label = dataset.read_case(dataset.load_dataset(tmp_path / "d"), case_id)
    assert images[1].same_grid(t1, tolerance=1e-9) and label.same_grid(t1, tolerance=1e-9)
    # Voxel centres shared by both grids (every second one) keep their value exactly.
    assert np.allclose(images[1].array[:, ::2, ::2], half.array, rtol=1e-5, atol=1e-3)
    assert np.abs(images[1].array[:, 1:-1:2, 1:-1:2]).sum() > 0
