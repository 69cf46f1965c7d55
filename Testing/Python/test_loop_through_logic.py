"""The whole loop through the Slicer Logic on slicer-core: segment, edit, export, fine-tune, segment again.

A user segments a CT with a model that draws bone above 300 HU, corrects it in Segment Editor
(paints the 100-300 HU tissue the model leaves out, erases the densest bone above 600 HU), exports the case
and clicks Fine-tune. The new version is registered, listed and selected, and segmenting again with
it agrees better with the user's edits than the first labels did.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from MedSegAILib.slicer_bridge import engine_process, mrml, slicer_logic  # noqa: E402
from MedSegAILib.model import store as model_store  # noqa: E402
from MedSegAILib.core.image import Volume  # noqa: E402
from MedSegAILib.model.modelcard import list_models  # noqa: E402
from medsegai_training.finetune import MIN_STEPS, TIME_BUDGET_S  # noqa: E402

FIRST_THRESHOLD_HU = 300.0
EDITED_RANGE_HU = (100.0, 600.0)
TIMEOUT = 900


def _dice(first: np.ndarray, second: np.ndarray) -> float:
    first, second = first.astype(bool), second.astype(bool)
    total = int(first.sum()) + int(second.sum())
    return 2.0 * int(np.logical_and(first, second).sum()) / total if total else 1.0


@pytest.fixture(scope="module")
def ct(ct_small: Path) -> Volume:
    return Volume.from_sitk(sitk.ReadImage(str(ct_small)))


@pytest.fixture(scope="module")
def parent_model(ct: Volume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small bone model (> 300 HU) trained with the command line, as a shipped model would be."""
    from MedSegAILib.data import dataset

    root = tmp_path_factory.mktemp("parent")
    labels = ct.with_array((ct.array > FIRST_THRESHOLD_HU).astype(np.uint8))
    for patient in ("a", "b"):
        dataset.add_case(root / "dataset", [ct], labels, ["CT"], {"background": 0, "bone": 1}, patient_key=patient)
    recipe = root / "recipe.json"
    recipe.write_text(json.dumps({
        "model_id": "loop-bone", "name": "Loop bone", "version": "1.0.0",
        "model": {"builder": "unet_2d", "base_filters": 8, "depth": 2},
        "spatial": {"mode": "2d", "axis": "axial", "patch_size": [64, 64], "divisible_by": 4},
        "channels": [{"name": "CT", "modality": "CT", "normalization": {"method": "ct", "clip": [-200, 1500]}}],
        "epochs": 6, "steps_per_epoch": 20, "batch_size": 8, "seed": 1,
    }))
    completed = subprocess.run(
        [sys.executable, "-m", "MedSegAILib.cli", "train", str(root / "dataset"), "-o", str(root / "model"),
         "--config", str(recipe), "--progress", "none"],
        capture_output=True, text=True, timeout=TIMEOUT, env=engine_process.engine_environment(), check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return root / "model"


def _edit_as_segment_editor(segmentation_node, segment_id: str, volume_node, edited: np.ndarray) -> None:
    """Replace the segment's voxels the way Segment Editor's paint and erase effects do (MRML API)."""
    image = mrml._oriented_image_from_node_geometry(volume_node, edited.astype(np.uint8))  # noqa: SLF001
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)


@pytest.mark.slow
def test_segment_edit_export_fine_tune_segment_again(ct: Volume, parent_model: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "models"
    monkeypatch.setenv("MEDSEGAI_USER_MODELS", str(store))
    parent = model_store.import_model(parent_model, store)
    scene = slicer.vtkMRMLScene()
    node = mrml.add_volume_node(scene, ct, "CT")
    options = slicer_logic.EngineOptions(device="cpu", postprocessing=False)

    first = slicer_logic.run_segmentation_blocking([node], str(parent.folder), options=options, timeout=TIMEOUT,
                                                   temp_root=tmp_path)
    first_labels = np.asarray(first.labels.array) == 1
    low, high = EDITED_RANGE_HU
    edited = (ct.array > low) & (ct.array <= high)
    added = np.count_nonzero(edited & ~first_labels)
    erased = np.count_nonzero(first_labels & ~edited)
    assert added > 1000 and erased > 50, (added, erased)  # the edit both paints and erases
    _edit_as_segment_editor(first.segmentation_node, first.segment_ids[0], node, edited)

    dataset_dir = tmp_path / "dataset"
    case_id = slicer_logic.export_for_training(scene, first.segmentation_node, [node], dataset_dir, first.card,
                                               original_labels=first.labels)
    changed = slicer_logic.dataset_case_changed_voxels(dataset_dir, case_id)
    assert changed == np.count_nonzero(edited != first_labels)

    plan = slicer_logic.fine_tune_plan(dataset_dir, str(parent.folder))
    # within 5 minutes, unless the parent's own record (trained on this shared, loaded machine) is so
    # slow that even the fewest steps do not fit
    assert plan.cases == 1 and (plan.estimated_seconds <= TIME_BUDGET_S or plan.steps == MIN_STEPS)
    # A short run: 200 steps at a learning rate for this tiny network (the default plan is sized for
    # the shipped models); everything else comes from the plan, as in the panel.
    recipe = tmp_path / "fine-tune.json"
    recipe.write_text(json.dumps({"optimizer": {"learning_rate": 1e-3}}))
    run = slicer_logic.start_fine_tune(dataset_dir, str(parent.folder), store_dir=store,
                                       extra_arguments=["--max-steps", "200", "--config", str(recipe)])
    assert run.wait(timeout=TIMEOUT) == 0, "\n".join(list(run.log_lines)[-20:])
    new = run.finish()
    assert new.id == parent.id and new.version != parent.version
    assert {(card.id, card.version) for card in list_models()} >= {(parent.id, parent.version), (new.id, new.version)}

    second = slicer_logic.run_segmentation_blocking([node], str(new.folder), options=options, timeout=TIMEOUT,
                                                    temp_root=tmp_path)
    assert json.loads(second.segmentation_node.GetAttribute(slicer_logic.SOURCE_MODEL_ATTRIBUTE))["version"] == new.version
    before, after = _dice(first_labels, edited), _dice(np.asarray(second.labels.array) == 1, edited)
    print(f"Dice with the user's edits: first labels {before:.3f}, after fine-tuning {after:.3f}")
    assert after >= before + 0.05, f"Dice with the user's edits: first {before:.3f}, after fine-tuning {after:.3f}"
