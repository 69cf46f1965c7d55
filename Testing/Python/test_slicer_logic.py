"""MedSegAILib.slicer_bridge.slicer_logic on slicer-core's real MRML scene, with the real engine process.

Round trip (volume nodes in, segmentation node out) on the shared CT (also oblique and
left-right-flipped) and on a two-channel brain MR study; labels equal what `medsegai segment`
writes; cancel leaves no nodes, files or process; bad input gives one clear message and leaves
the scene unchanged; model import never overwrites; fine-tuning registers a new version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from MedSegAILib.slicer_bridge import engine_process, mrml, slicer_logic  # noqa: E402
from MedSegAILib.model import store as model_store  # noqa: E402
from MedSegAILib.core.errors import MedSegAIInputError, ModelFolderError  # noqa: E402
from MedSegAILib.core.image import Volume  # noqa: E402

THRESHOLD_HU = 300.5  # the analytic model's threshold (Testing/Python/analytic_models.py)
ENGINE_TIMEOUT = 300


@pytest.fixture(autouse=True)
def _quiet_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "1")


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def ct(ct_small: Path) -> Volume:
    return Volume.from_sitk(sitk.ReadImage(str(ct_small)))


def _rotation(degrees_xyz: tuple[float, float, float]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", degrees_xyz, degrees=True).as_matrix()


def _cpu_onnx() -> slicer_logic.EngineOptions:
    return slicer_logic.EngineOptions(device="cpu", backend="onnx")


def _assert_bone_segmentation(result: slicer_logic.SceneResult, node, volume: Volume) -> None:
    segmentation = result.segmentation_node
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1
    segment = seg.GetSegment(result.segment_ids[0])
    assert segment.GetName() == "bone"
    np.testing.assert_allclose(segment.GetColor(), [0.945, 0.839, 0.569])
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is node
    exported = mrml.labels_from_segmentation_node(segmentation, node, result.card)
    expected = (volume.array > THRESHOLD_HU).astype(np.uint8)
    assert expected.any()
    assert np.array_equal(exported.array, expected)
    assert exported.spacing == volume.spacing and exported.origin == volume.origin
    assert np.array_equal(exported.direction, volume.direction)
    assert np.array_equal(result.labels.array, expected)


def test_round_trip_on_shared_ct_equals_command_line(scene, ct: Volume, ct_small: Path, analytic_model_dir: Path, tmp_path: Path) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    before = scene.GetNumberOfNodes()
    events: list[engine_process.ProgressEvent] = []
    result = slicer_logic.run_segmentation_blocking([node], str(analytic_model_dir), options=_cpu_onnx(),
                                                    progress=events.append, timeout=ENGINE_TIMEOUT)
    _assert_bone_segmentation(result, node, ct)
    assert result.segmentation_node.GetName() == "CT MedSegAI"
    assert json.loads(result.segmentation_node.GetAttribute(slicer_logic.SOURCE_MODEL_ATTRIBUTE))["id"] == "analytic-bone-2d"

    # progress: every stage seen, fraction never goes back, ends at 1
    stages = [event.stage for event in events]
    assert {"read", "model", "write"} <= set(stages)
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)

    # the measurements table holds the engine's numbers
    table = result.table_node.GetTable()
    assert table.GetNumberOfRows() == 1
    voxels = int(np.count_nonzero(ct.array > THRESHOLD_HU))
    assert table.GetValueByName(0, "Voxels").ToInt() == voxels
    assert table.GetValueByName(0, "Volume (mL)").ToDouble() == pytest.approx(voxels * np.prod(ct.spacing) / 1000)
    assert table.GetValueByName(0, "Max diameter (mm)").ToDouble() > 0

    # same labels as `medsegai segment` on the same file
    output = tmp_path / "cli-labels.nrrd"
    completed = subprocess.run(
        [sys.executable, "-m", "MedSegAILib.cli", "segment", str(ct_small), "-o", str(output), "--model", str(analytic_model_dir),
         "--device", "cpu", "--backend", "onnx", "--progress", "none"],
        capture_output=True, text=True, timeout=ENGINE_TIMEOUT, env=engine_process.engine_environment())
    assert completed.returncode == 0, completed.stderr
    cli_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert np.array_equal(cli_labels, result.labels.array)

    # nodes added: segmentation (+ its display node) and the table; nothing else
    added = {scene.GetNthNode(i).GetClassName() for i in range(before, scene.GetNumberOfNodes())}
    assert {"vtkMRMLSegmentationNode", "vtkMRMLTableNode"} <= added


@pytest.mark.parametrize("variant", ["oblique", "left-right-flipped"])
def test_round_trip_keeps_oblique_and_flipped_geometry(scene, ct: Volume, analytic_model_dir: Path, variant: str) -> None:
    if variant == "oblique":
        volume = Volume(ct.array, ct.spacing, (31.5, -12.25, 80.0), _rotation((12.0, -7.0, 21.0)))
    else:
        volume = Volume(ct.array, ct.spacing, ct.origin, ct.direction @ np.diag([-1.0, 1.0, 1.0]))
    node = mrml.add_volume_node(scene, volume, variant)
    options = slicer_logic.EngineOptions(device="cpu", backend="onnx", uncertainty=True)
    result = slicer_logic.run_segmentation_blocking([node], str(analytic_model_dir), options=options, timeout=ENGINE_TIMEOUT)
    _assert_bone_segmentation(result, node, volume)
    # the uncertainty map comes back as a Volume on the input's exact grid (integer HU sit >= 0.5 HU
    # from the threshold, where the ramp of slope 20 is certain: p = 4.5e-5, map value 0)
    assert result.uncertainty is not None and result.uncertainty.same_grid(volume)
    assert result.uncertainty.array.dtype == np.uint8 and not result.uncertainty.array.any()
    assert "mean_uncertainty" in result.measurements[0]


def test_output_goes_into_a_given_segmentation_node_and_the_study(scene, ct: Volume, analytic_model_dir: Path) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Anonymous"), "Study")
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, study)
    else:
        hierarchy.CreateItem(study, node)
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    assert slicer_logic.segments_to_be_replaced(target, str(analytic_model_dir)) == []
    assert slicer_logic.segments_to_be_replaced(None, str(analytic_model_dir)) == []
    result = slicer_logic.run_segmentation_blocking([node], str(analytic_model_dir), output_segmentation_node=target,
                                                    options=_cpu_onnx(), timeout=ENGINE_TIMEOUT)
    assert result.segmentation_node is target and target.GetName() == "my segmentation"
    assert slicer_logic.segments_to_be_replaced(target, str(analytic_model_dir)) == ["bone"]
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(target)) == study
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(result.table_node)) == study


@pytest.mark.slow
def test_round_trip_on_multichannel_brain_study(scene, shared_data: Path, tmp_path: Path) -> None:
    from analytic_models import threshold_model_folder

    study = shared_data / "mr-brain-tumor" / "PGBM-001" / "1991-11-19"
    model = threshold_model_folder(tmp_path / "brain-model", mode="2d", backends=("onnx",), model_id="analytic-brain",
                                   channels=("T1post", "FLAIR"))
    t1 = Volume.from_sitk(sitk.ReadImage(str(study / "T1post.nrrd")))
    flair = Volume.from_sitk(sitk.ReadImage(str(study / "FLAIR.nrrd")))
    assert t1.same_grid(flair)
    t1_node = mrml.add_volume_node(scene, t1, "T1post")
    flair_node = mrml.add_volume_node(scene, flair, "FLAIR")
    result = slicer_logic.run_segmentation_blocking([t1_node, flair_node], str(model), options=_cpu_onnx(), timeout=ENGINE_TIMEOUT)
    exported = mrml.labels_from_segmentation_node(result.segmentation_node, t1_node, result.card)
    expected = (t1.array > THRESHOLD_HU).astype(np.uint8)
    assert expected.any() and np.array_equal(exported.array, expected)
    assert exported.same_grid(t1, tolerance=1e-9)
    assert result.segmentation_node.GetName() == "T1post MedSegAI"

    # A FLAIR on another (coarser) grid is resampled onto the T1post grid by the engine.
    coarse = Volume(flair.array[:, ::2, ::2].copy(), (flair.spacing[0] * 2, flair.spacing[1] * 2, flair.spacing[2]),
                    flair.origin, flair.direction)
    coarse_node = mrml.add_volume_node(scene, coarse, "FLAIR coarse")
    again = slicer_logic.run_segmentation_blocking([t1_node, coarse_node], str(model), options=_cpu_onnx(), timeout=ENGINE_TIMEOUT)
    assert again.labels.same_grid(t1, tolerance=1e-9)
    assert np.array_equal(mrml.labels_from_segmentation_node(again.segmentation_node, t1_node, again.card).array, expected)


def test_cancel_leaves_no_nodes_files_or_process(scene, shared_data: Path, analytic_model_dir: Path, tmp_path: Path) -> None:
    big = Volume.from_sitk(sitk.ReadImage(str(shared_data / "ct-abdomen" / "example_ct.nii.gz")))
    node = mrml.add_volume_node(scene, big, "CT")
    before = scene.GetNumberOfNodes()
    options = slicer_logic.EngineOptions(device="cpu", backend="onnx", overlap=0.9, batch_size=1)
    run = slicer_logic.SegmentationRun([node], str(analytic_model_dir), options=options, temp_root=tmp_path).start()
    temp_dir = run.temp_dir
    assert temp_dir is not None and temp_dir.is_dir()
    deadline = time.monotonic() + ENGINE_TIMEOUT
    seen_model = False
    while not seen_model and run.running and time.monotonic() < deadline:
        seen_model = any(event.stage == "model" for event in run.poll())
        time.sleep(0.02)
    assert seen_model and run.running, "the engine should be mid-way through the model stage"
    pid = run.process.pid
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started <= 0.1  # the Qt thread does not wait
    assert run.wait_stopped(2.0), "the engine tree must be gone within 2 s"
    assert time.monotonic() - started <= 2.0
    assert not run.running and run.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert run.state == "cancelled"
    assert not temp_dir.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MedSegAIInputError, match="cancelled"):
        run.finish(scene)
    assert scene.GetNumberOfNodes() == before


# --------------------------------------------------------------------------------------------
# Bad input from the panel's point of view: one clear message, scene unchanged
# --------------------------------------------------------------------------------------------


def _expect_input_error(scene, volume_nodes, model, match: str, options=None) -> str:
    before = scene.GetNumberOfNodes()
    with pytest.raises(MedSegAIInputError, match=match) as info:
        slicer_logic.run_segmentation_blocking(volume_nodes, model, options=options or _cpu_onnx(), timeout=ENGINE_TIMEOUT)
    assert scene.GetNumberOfNodes() == before
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_no_volume(scene, analytic_model_dir: Path) -> None:
    message = _expect_input_error(scene, [None], str(analytic_model_dir), "No input volume is selected")
    assert "CT" in message


def test_2d_volume(scene, ct: Volume, analytic_model_dir: Path) -> None:
    flat = mrml.add_volume_node(scene, Volume(ct.array[12:13].copy(), ct.spacing, ct.origin, ct.direction), "one slice")
    _expect_input_error(scene, [flat], str(analytic_model_dir), "is 2D")


def test_4d_volume(scene, analytic_model_dir: Path) -> None:
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(20, 20, 10)
    image.AllocateScalars(vtk.VTK_FLOAT, 4)  # 4 time points per voxel, as a 4D series is loaded
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "perfusion")
    node.SetAndObserveImageData(image)
    _expect_input_error(scene, [node], str(analytic_model_dir), "4 values per voxel")


def test_missing_channel_for_multichannel_model(scene, ct: Volume, tmp_path: Path) -> None:
    from analytic_models import threshold_model_folder

    model = threshold_model_folder(tmp_path / "two", backends=("onnx",), model_id="two-channel", channels=("T1post", "FLAIR"))
    node = mrml.add_volume_node(scene, ct, "T1")
    message = _expect_input_error(scene, [node, None], str(model), "needs 2 input volumes")
    assert "FLAIR" in message
    _expect_input_error(scene, [node], str(model), "select a volume for FLAIR")


def test_invalid_model_folder(scene, ct: Volume, analytic_model_dir: Path, tmp_path: Path) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    broken = tmp_path / "broken"
    broken.mkdir()
    card = json.loads((analytic_model_dir / "model.json").read_text())
    card["labels"][0]["value"] = 0
    (broken / "model.json").write_text(json.dumps(card))
    (broken / "model.onnx").write_bytes((analytic_model_dir / "model.onnx").read_bytes())
    message = _expect_input_error(scene, [node], str(broken), "invalid model.json")
    assert "labels" in message
    _expect_input_error(scene, [node], str(tmp_path / "nowhere"), "does not exist")
    _expect_input_error(scene, [node], "", "No model is selected")


def test_engine_that_crashes(scene, ct: Volume, analytic_model_dir: Path, tmp_path: Path) -> None:
    node = mrml.add_volume_node(scene, ct, "CT")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.json").write_text((analytic_model_dir / "model.json").read_text())
    (corrupt / "model.keras").write_bytes(b"not a keras file")
    (corrupt / "model.onnx").write_bytes(b"\x08\x01garbage that is not an onnx graph")
    message = _expect_input_error(scene, [node], str(corrupt), ".")
    assert not message.lower().startswith("error:")
    # a Python that dies from a signal (a native crash in the engine)
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\necho 'Fatal Python error: Segmentation fault' >&2\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    options = slicer_logic.EngineOptions(device="cpu", backend="onnx", python_executable=str(crashing))
    message = _expect_input_error(scene, [node], str(analytic_model_dir), "signal 11", options=options)
    assert "Segmentation fault" in message
    missing = slicer_logic.EngineOptions(python_executable=str(tmp_path / "no-python"))
    _expect_input_error(scene, [node], str(analytic_model_dir), "does not exist or is not executable", options=missing)


def test_error_message_uses_the_engines_error_line() -> None:
    process = engine_process.EngineProcess()
    process.returncode = 2
    process._stderr_tail.extend(["some warning", "error: input file x.nrrd is truncated; export it again.", ""])
    assert process.error_message() == "Input file x.nrrd is truncated; export it again."


def test_engine_options_become_cli_arguments() -> None:
    options = slicer_logic.EngineOptions(device="gpu", backend="tensorflow", overlap=0.25, tta=True, batch_size=8,
                                         largest_component=False, fill_holes=True, min_island_mm3=50.0)
    assert options.cli_arguments() == ["--device", "gpu", "--backend", "tensorflow", "--overlap", "0.25", "--tta",
                                       "--batch-size", "8", "--no-largest-component", "--fill-holes", "--min-island-mm3", "50.0"]
    assert slicer_logic.EngineOptions(postprocessing=False).cli_arguments()[-1] == "--no-postprocessing"
    from MedSegAILib.cli import build_parser

    parsed = build_parser().parse_args(["segment", "a.nrrd", "-o", "b.nrrd", *options.cli_arguments()])
    assert (parsed.device, parsed.backend, parsed.overlap, parsed.tta, parsed.batch_size) == ("gpu", "tensorflow", 0.25, True, 8)
    assert (parsed.largest_component, parsed.fill_holes, parsed.min_island_mm3) == (False, True, 50.0)
    with pytest.raises(ValueError, match="overlap"):
        slicer_logic.EngineOptions(overlap=1.0).cli_arguments()
    with pytest.raises(ValueError, match="device"):
        slicer_logic.EngineOptions(device="tpu").validate()


# --------------------------------------------------------------------------------------------
# Model import
# --------------------------------------------------------------------------------------------


def _copy_model(source: Path, target: Path, version: str | None = None) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    if version:
        card = json.loads((target / "model.json").read_text())
        card["version"] = version
        (target / "model.json").write_text(json.dumps(card))
    return target


def test_import_model_folder_and_zip_never_overwrite(analytic_model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    card = model_store.import_model(analytic_model_dir, store)
    assert card.folder == (store / "analytic-bone-2d-1.0.0").resolve()
    assert (card.folder / "model.onnx").read_bytes() == (analytic_model_dir / "model.onnx").read_bytes()
    stamp = (card.folder / "model.json").stat().st_mtime_ns
    with pytest.raises(ModelFolderError, match="already installed"):
        model_store.import_model(analytic_model_dir, store)
    assert (card.folder / "model.json").stat().st_mtime_ns == stamp

    newer = _copy_model(analytic_model_dir, tmp_path / "src" / "analytic", version="1.1.0")
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in newer.iterdir():
            zf.write(path, f"analytic/{path.name}")
    second = model_store.import_model(archive, store)
    assert second.version == "1.1.0" and second.folder.name == "analytic-bone-2d-1.1.0"
    assert sorted(p.name for p in store.iterdir()) == ["analytic-bone-2d-1.0.0", "analytic-bone-2d-1.1.0"]


def test_import_refuses_unsafe_or_invalid_archives(analytic_model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    traversal = tmp_path / "evil.zip"
    with zipfile.ZipFile(traversal, "w") as zf:
        zf.writestr("model.json", (analytic_model_dir / "model.json").read_text())
        zf.writestr("../../outside.txt", "should never be written")
    with pytest.raises(ModelFolderError, match="unsafe path"):
        model_store.import_model(traversal, store)
    assert not (tmp_path / "outside.txt").exists() and not (store.parent / "outside.txt").exists()

    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("model.onnx")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ModelFolderError, match="link"):
        model_store.import_model(link, store)

    invalid = _copy_model(analytic_model_dir, tmp_path / "invalid")
    (invalid / "model.json").write_text("{\"id\": \"x\"}")
    with pytest.raises(ModelFolderError, match="invalid model.json"):
        model_store.import_model(invalid, store)
    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello")
    with pytest.raises(ModelFolderError, match="neither a folder nor a .zip"):
        model_store.import_model(not_zip, store)
    assert [p for p in store.iterdir()] == []  # no staging leftovers


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


def test_fine_tune_refuses_a_folder_without_dataset(analytic_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MedSegAIInputError, match="not a MedSegAI dataset"):
        slicer_logic.start_fine_tune(tmp_path, str(analytic_model_dir), store_dir=tmp_path / "store")
    with pytest.raises(MedSegAIInputError, match="not a MedSegAI dataset"):
        slicer_logic.start_fine_tune("", str(analytic_model_dir), store_dir=tmp_path / "store")


@pytest.mark.slow
def test_fine_tune_registers_a_new_version(ct: Volume, tmp_path: Path) -> None:
    """Train a tiny parent with the CLI, then fine-tune it through the Slicer logic (two short trainings)."""
    from MedSegAILib.data import dataset

    dataset_dir = tmp_path / "dataset"
    labels = ct.with_array((ct.array > THRESHOLD_HU).astype(np.uint8))
    for patient in ("a", "b", "c"):
        dataset.add_case(dataset_dir, [ct], labels, ["CT"], {"background": 0, "bone": 1}, patient_key=patient)
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "model_id": "tiny-bone", "name": "Tiny bone", "version": "1.0.0",
        "model": {"builder": "unet_2d", "base_filters": 4, "depth": 2},
        "spatial": {"mode": "2d", "axis": "axial", "patch_size": [64, 64], "divisible_by": 4},
        "channels": [{"name": "CT", "modality": "CT", "normalization": {"method": "ct", "clip": [-200, 1000]}}],
    }))
    parent = tmp_path / "parent"
    completed = subprocess.run(
        [sys.executable, "-m", "MedSegAILib.cli", "train", str(dataset_dir), "-o", str(parent), "--config", str(recipe),
         "--epochs", "1", "--max-steps", "1", "--progress", "none"],
        capture_output=True, text=True, timeout=900, env=engine_process.engine_environment())
    assert completed.returncode == 0, completed.stderr[-2000:]

    store = tmp_path / "store"
    parent_card = model_store.import_model(parent, store)
    run = slicer_logic.start_fine_tune(dataset_dir, str(parent_card.folder), store_dir=store,
                                       extra_arguments=["--epochs", "1", "--max-steps", "1"])
    assert run.running
    events: list[engine_process.ProgressEvent] = []
    run.wait(timeout=900, progress=events.append)
    new = run.finish()
    assert new.id == parent_card.id and new.version != parent_card.version
    assert new.folder.parent == store.resolve() and new.folder.name == f"{new.id}-{new.version}"
    assert (parent_card.folder / "model.json").read_text() == (parent / "model.json").read_text()  # older version stays
    assert sorted(p.name for p in store.iterdir()) == sorted([parent_card.folder.name, new.folder.name])  # no staging left
    train_events = [event for event in events if event.stage == "train"]
    assert train_events and "dice" in train_events[-1].message.lower()
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_case_report_of_the_corrected_segmentation(scene, ct: Volume, analytic_model_dir: Path, tmp_path: Path) -> None:
    """The panel's report button: the PDF describes the segmentation as edited, without patient data."""
    pypdf = pytest.importorskip("pypdf")
    node = mrml.add_volume_node(scene, ct, "CT")
    result = slicer_logic.run_segmentation_blocking([node], str(analytic_model_dir), options=_cpu_onnx(), timeout=ENGINE_TIMEOUT)
    edited = np.asarray(result.labels.array).copy()
    edited[: edited.shape[0] // 2] = 0  # erase the lower half, as with Segment Editor's eraser
    image = mrml._oriented_image_from_node_geometry(node, edited)  # noqa: SLF001
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, result.segmentation_node, result.segment_ids[0], slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    before = scene.GetNumberOfNodes()
    path = slicer_logic.write_case_report(tmp_path / "case.pdf", result.segmentation_node, [node], str(analytic_model_dir))
    reader = pypdf.PdfReader(str(path))
    text = reader.pages[0].extract_text()
    assert len(reader.pages) == 1 and result.card.name in text
    edited_ml = np.count_nonzero(edited) * float(np.prod(ct.spacing)) / 1000.0
    assert f"{edited_ml:.1f}" in text, (edited_ml, text[:2000])
    assert scene.GetNumberOfNodes() == before
    with pytest.raises(MedSegAIInputError):
        slicer_logic.write_case_report(tmp_path / "case.pdf", result.segmentation_node, [node], str(analytic_model_dir))
    with pytest.raises(MedSegAIInputError, match="No segmentation"):
        slicer_logic.write_case_report(tmp_path / "other.pdf", None, [node], str(analytic_model_dir))
