"""The correct → export → fine-tune loop never loses a finished training (issue #14).

- ``fine_tune_plan``: steps scale with the corrected cases, early stopping only with a patient to
  hold out, the estimate stays within 5 minutes for 1-5 cases of the shipped models, ``--max-steps``
  and ``--freeze-encoder`` win; ``medsegai train --init`` applies the same plan.
- An ONNX graph that disagrees with Keras gives a folder with ``model.keras`` only (``model.json``
  says why, one warning line, exit 0, ``--backend auto`` runs TensorFlow); ``--no-onnx`` writes none.
- A failure after training keeps the run; ``--resume`` writes the folder without training again.
- Two new brain cases imported from an nnU-Net folder, 20 steps of the default recipe: a model
  folder, and no TensorFlow C++/absl lines on stderr.
- ``medsegai dataset check`` lists the voxels the user corrected per case.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from MedSegAILib import cli
from MedSegAILib.data.dataset import add_case
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.io.imageio import read_volume
from MedSegAILib.model.modelcard import ModelCard, find_model
from medsegai_training.finetune import KEEP_PARENT, TIME_BUDGET_S, fine_tune_plan

TINY = {
    "model_id": "test-loop",
    "name": "Test loop model",
    "model": {"builder": "unet_2d", "base_filters": 4, "depth": 2, "norm": "instance"},
    "spatial": {"mode": "2d", "axis": "axial", "patch_size": [32, 32], "target_spacing": [4.0, 4.0, None],
                "divisible_by": 4},
    "channels": [{"name": "T1post", "normalization": {"method": "zscore", "nonzero": True}}],
    "labels": [{"name": "tumor", "value": 1}],
    "epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "augmentation": {"enabled": False}, "seed": 3,
    "early_stopping_patience": None,
}


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def _studies(shared_data: Path) -> list[Path]:
    return [s for s in sorted((shared_data / "mr-brain-tumor").glob("PGBM-*/*")) if (s / "T1post.nrrd").is_file()]


@pytest.fixture(scope="module")
def brain_studies(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every NRRD brain study with T1post as a one-channel dataset (patient key = PGBM-xxx)."""
    root = tmp_path_factory.mktemp("loop") / "brain"
    for study in _studies(shared_data):
        image = read_volume(study / "T1post.nrrd")
        label = image.with_array(read_volume(study / "MaskTumor.nrrd").array)
        add_case(root, [image], label, ["T1post"], {"tumor": 1}, patient_key=study.parent.name)
    return root


def _subset(dataset: Path, keep: int, target: Path) -> Path:
    """A copy of ``dataset`` listing only its first ``keep`` cases."""
    shutil.copytree(dataset, target)
    data = json.loads((target / "dataset.json").read_text(encoding="utf-8"))
    data["cases"] = data["cases"][:keep]
    (target / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    return target


def test_fine_tune_plan_scales_with_the_cases_and_fits_five_minutes(brain_studies: Path, tmp_path: Path) -> None:
    one = _subset(brain_studies, 1, tmp_path / "one")
    many = brain_studies  # 4 studies of 3 patients
    card = find_model("mr-brain-tumor")
    single, several = fine_tune_plan(one, card), fine_tune_plan(many, card)
    assert (single.cases, single.patients) == (1, 1) and (several.cases, several.patients) == (4, 3)
    assert 60 <= single.steps < several.steps
    assert single.early_stopping_patience is None and single.validation == "training cases"
    assert several.early_stopping_patience and several.validation == "held-out patient"
    assert single.epochs * single.steps_per_epoch == single.steps
    assert single.patch_size == (160, 160)  # the parent's training window, not its 256 inference window
    for model in ("mr-brain-tumor", "ct-abdomen-organs"):
        for dataset in (one, many):
            assert fine_tune_plan(dataset, find_model(model)).estimated_seconds <= TIME_BUDGET_S
    capped = fine_tune_plan(many, card, max_steps=40, freeze_encoder=True)
    assert capped.steps == 40 and capped.freeze_encoder
    with pytest.raises(ValueError, match="max_steps"):
        fine_tune_plan(many, card, max_steps=0)

    code, out, err = _run_cli(["train", str(one), "-o", str(tmp_path / "m"), "--init", "mr-brain-tumor", "--plan"])
    assert code == 0, err
    shown = json.loads(out)
    assert shown["steps"] == single.steps and "min" in shown["summary"]
    assert not (tmp_path / "m").exists()

    from medsegai_training.trainer import resolve_config

    config = resolve_config(None, parent=card, dataset=one)
    assert config.plan() == (single.epochs, single.steps_per_epoch)
    assert config.spatial["patch_size"] == [160, 160] and config.early_stopping_patience is None
    explicit = resolve_config({"epochs": 3}, parent=card, dataset=one, freeze_encoder=True)
    assert explicit.epochs == 3 and explicit.freeze_encoder
    # the blend back into the parent's weights; a recipe's own keys win
    assert single.keep_parent == config.keep_parent == KEEP_PARENT and 0.0 <= KEEP_PARENT < 1.0
    own = resolve_config({"keep_parent": 0.0, "foreground_fraction": 0.5}, parent=card, dataset=one)
    assert own.keep_parent == 0.0 and own.foreground_fraction == 0.5
    with pytest.raises(MedSegAIInputError, match="keep_parent"):
        resolve_config({"keep_parent": 1.0}, parent=card, dataset=one)


def test_blend_weights_mixes_the_parent_back_in() -> None:
    from medsegai_training.trainer import blend_weights

    class Weights:  # the two methods of keras.Model that blend_weights uses (no TensorFlow import)
        def __init__(self, value: float) -> None:
            self.weights = [np.full((3, 2), value, np.float32), np.full((2,), value, np.float32)]

        def get_weights(self) -> list[np.ndarray]:
            return [w.copy() for w in self.weights]

        def set_weights(self, weights: list[np.ndarray]) -> None:
            self.weights = [np.asarray(w) for w in weights]

    def tiny(value: float) -> Weights:
        return Weights(value)

    parent, tuned = tiny(1.0), tiny(3.0)
    blend_weights(tuned, parent.get_weights(), 0.25)
    assert all(np.allclose(w, 0.25 * 1.0 + 0.75 * 3.0) and w.dtype == np.float32 for w in tuned.get_weights())
    blend_weights(tuned, parent.get_weights(), 0.0)
    assert all(np.allclose(w, 2.5) for w in tuned.get_weights())
    with pytest.raises(ValueError, match="keep_parent"):
        blend_weights(tuned, parent.get_weights(), 1.0)
    with pytest.raises(ValueError, match="do not match"):
        blend_weights(tuned, parent.get_weights()[:1], 0.5)


def _one_patient_dataset(brain_studies: Path, tmp_path: Path) -> Path:
    return _subset(brain_studies, 2, tmp_path / "ds")


@pytest.mark.slow
def test_onnx_that_disagrees_still_gives_a_usable_folder(
    brain_studies: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, brain_dicom_study: Path
) -> None:
    from medsegai_training import export

    real = export._onnx_predict

    def drifting(path: Path, batch: np.ndarray) -> np.ndarray:  # a converter that gets the labels wrong
        probabilities = real(path, batch)
        return np.ascontiguousarray(probabilities[..., ::-1])

    monkeypatch.setattr(export, "_onnx_predict", drifting)
    dataset = _one_patient_dataset(brain_studies, tmp_path)
    (tmp_path / "recipe.json").write_text(json.dumps(TINY))
    output = tmp_path / "model"
    code, _, err = _run_cli(["train", str(dataset), "-o", str(output), "--config", str(tmp_path / "recipe.json"),
                             "--progress", "none"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "model.onnx" in warnings[0] and "same label" in warnings[0]
    assert sorted(p.name for p in output.iterdir() if p.is_file()) == ["model.json", "model.keras"]
    card = ModelCard.from_folder(output)
    assert card.files == {"keras": "model.keras"} and "disagree" in card.raw["provenance"]["onnx_skipped"]
    assert card.raw["provenance"]["onnx_label_agreement"] < 0.9999

    from MedSegAILib.model.backends import load_predictor

    assert load_predictor(card, backend="auto").name == "tensorflow"
    seg = tmp_path / "seg.nrrd"
    code, _, err = _run_cli(["segment", str(brain_dicom_study / "dicom" / "T1post"), "-o", str(seg), "--model",
                             str(output), "--progress", "none"])
    assert code == 0, err
    labels = read_volume(seg)
    assert labels.array.shape == read_volume(brain_dicom_study / "dicom" / "T1post").array.shape

    monkeypatch.setattr(export, "_onnx_predict", real)
    plain = tmp_path / "plain"
    code, _, err = _run_cli(["train", str(dataset), "-o", str(plain), "--config", str(tmp_path / "recipe.json"),
                             "--progress", "none", "--no-onnx"])
    assert code == 0, err
    assert not (plain / "model.onnx").exists() and "warning:" not in err
    assert ModelCard.from_folder(plain).files == {"keras": "model.keras"}


@pytest.mark.slow
def test_a_failure_after_training_is_finished_by_resume_without_training_again(
    brain_studies: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medsegai_training import trainer

    dataset = _one_patient_dataset(brain_studies, tmp_path)
    (tmp_path / "recipe.json").write_text(json.dumps(TINY))
    output = tmp_path / "model"
    argv = ["train", str(dataset), "-o", str(output), "--config", str(tmp_path / "recipe.json"), "--progress", "none"]

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "_export_into", broken)
    code, _, err = _run_cli(argv)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and "best.keras" in lines[0] and "disk full" in lines[0]
    assert (output / "training" / "best.keras").is_file() and not (output / "model.json").exists()
    history = (output / "training" / "history.csv").read_text()

    monkeypatch.undo()
    code, _, err = _run_cli([*argv, "--resume"])
    assert code == 0, err
    assert (output / "training" / "history.csv").read_text() == history  # no epoch trained again
    card = ModelCard.from_folder(output)
    assert card.weights_path("keras") and card.raw["training"]["epochs_run"] == 2
    with (output / "training" / "history.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2


@pytest.mark.slow
def test_two_new_cases_twenty_steps_end_with_a_model_folder_and_quiet_output(shared_data: Path, tmp_path: Path) -> None:
    """The report's hold-out run: nnU-Net import of two unseen brain MRIs, default recipe, 20 steps."""
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for name in ("brain1", "brain2"):
        shutil.copy(shared_data / "radiomics-cases" / f"{name}_image.nrrd", raw / "imagesTr" / f"{name}_0000.nrrd")
        shutil.copy(shared_data / "radiomics-cases" / f"{name}_label.nrrd", raw / "labelsTr" / f"{name}.nrrd")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "tumor": 1},
                                                  "numTraining": 2, "file_ending": ".nrrd"}))
    env = dict(os.environ, MEDSEGAI_THREADS="1")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, env.get("PYTHONPATH", "")])

    def medsegai(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "MedSegAILib.cli", *args], capture_output=True, text=True, env=env)

    dataset, output = tmp_path / "ds", tmp_path / "M"
    assert medsegai("dataset", "import-nnunet", str(raw), str(dataset)).returncode == 0
    result = medsegai("train", str(dataset), "-o", str(output), "--max-steps", "20", "--progress", "none")
    assert result.returncode == 0, result.stderr
    card = ModelCard.from_folder(output)
    assert card.weights_path("keras") is not None and card.channel_names == ["MR"]
    for noise in ("cpu_feature_guard", "oneDNN", "absl", "I0000", "W0000", "tensorflow/core"):
        assert noise not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("wrote model folder")


def test_dataset_check_lists_the_corrected_voxels_per_case(shared_data: Path, tmp_path: Path) -> None:
    study = _studies(shared_data)[0]
    image = read_volume(study / "T1post.nrrd")
    label = image.with_array(read_volume(study / "MaskTumor.nrrd").array)
    dataset = tmp_path / "ds"
    add_case(dataset, [image], label, ["T1post"], {"tumor": 1}, patient_key="a",
             source_model={"id": "mr-brain-tumor", "version": "1.2.0"}, changed_voxels=1234)
    add_case(dataset, [image], label, ["T1post"], {"tumor": 1}, patient_key="b")
    code, out, err = _run_cli(["dataset", "check", str(dataset)])
    assert code == 0, err
    lines = out.splitlines()
    first = next(line for line in lines if "case_0001" in line and "corrected" in line)
    assert "1234" in first and "mr-brain-tumor 1.2.0" in first
    second = next(line for line in lines if line.strip().startswith("case_0002"))
    assert "not recorded" in second
    code, out, _ = _run_cli(["dataset", "check", str(dataset), "--json"])
    report = json.loads(out)
    assert report["case_corrections"]["case_0001"] == {"changed_voxels": 1234, "source_model": "mr-brain-tumor 1.2.0"}
    assert report["case_corrections"]["case_0002"]["changed_voxels"] is None
    assert np.count_nonzero(label.array) > 0
