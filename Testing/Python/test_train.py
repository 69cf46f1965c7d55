"""End-to-end training (medsegai_training.trainer / ``medsegai train``) on the real brain-tumour studies.

A tiny 2D U-Net learns the contrast-enhancing tumour from two patients (PGBM-003, PGBM-006) and is
validated on the third (PGBM-001); the exported folder segments PGBM-001's DICOM study, which no
step of training saw. Also: an existing output folder is refused, an interrupted run resumes
without losing epochs (and ends with the weights of an uninterrupted run), ``--init`` fine-tunes
from a parent that stays byte-identical, and a bad dataset is refused before training starts.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from MedSegAILib import cli
from MedSegAILib.data.dataset import add_case, load_dataset
from MedSegAILib.core.errors import CancelledError, MedSegAIInputError
from MedSegAILib.io.imageio import read_volume
from MedSegAILib.model.modelcard import ModelCard
from medsegai_training.cli_train import EpochBarReporter
from medsegai_training.config import config_from_dict, load_config
from medsegai_training.trainer import train

RECIPE = {
    "model_id": "test-brain-tumor",
    "name": "Test brain tumour (T1post)",
    "version": "0.1.0",
    "license": "CC BY 3.0 (training data: TCIA Brain-Tumor-Progression)",
    "citation": "Schmainda KM, Prah M. Data From Brain-Tumor-Progression. TCIA 2018. DOI 10.7937/K9/TCIA.2018.15quzvnb",
    "notice": "Trained on TCIA Brain-Tumor-Progression (CC BY).",
    "model": {"builder": "unet_2d", "base_filters": 12, "depth": 3, "norm": "instance"},
    "spatial": {"mode": "2d", "axis": "axial", "patch_size": [64, 64], "target_spacing": [2.0, 2.0, None],
                "divisible_by": 8},
    "channels": [{"name": "T1post", "modality": "MR", "normalization": {"method": "zscore", "nonzero": True}}],
    "labels": [{"name": "tumor", "value": 1, "source": [1], "color": [0.9, 0.2, 0.2]}],
    "postprocessing": {"method": "argmax", "largest_component": False, "fill_holes": False},
    "epochs": 8,
    "steps_per_epoch": 40,
    "batch_size": 8,
    "foreground_fraction": 0.5,
    "optimizer": {"learning_rate": 0.003},
    "augmentation": {"enabled": False},
    "seed": 1,
}

TINY = {
    "model": {"builder": "unet_2d", "base_filters": 4, "depth": 2, "norm": "instance"},
    "spatial": {"mode": "2d", "axis": "axial", "patch_size": [32, 32], "target_spacing": [4.0, 4.0, None],
                "divisible_by": 4},
    "channels": [{"name": "T1post", "normalization": {"method": "zscore", "nonzero": True}}],
    "epochs": 3, "steps_per_epoch": 3, "batch_size": 4, "augmentation": {"enabled": False}, "seed": 2,
    "early_stopping_patience": None,
}


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def brain_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The NRRD studies with T1post as a dataset (patient key = PGBM-xxx); returns (folder, case -> patient)."""
    root = tmp_path_factory.mktemp("train") / "brain"
    owners = {}
    for study in sorted((shared_data / "mr-brain-tumor").glob("PGBM-*/*")):
        if not (study / "T1post.nrrd").is_file():
            continue
        image = read_volume(study / "T1post.nrrd")
        label = image.with_array(read_volume(study / "MaskTumor.nrrd").array)
        case_id = add_case(root, [image], label, ["T1post"], {"tumor": 1}, patient_key=study.parent.name)
        owners[case_id] = study.parent.name
    return root, owners


@pytest.fixture(scope="module")
def trained(brain_dataset: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Train through the CLI with --progress json; returns (model folder, JSON progress output)."""
    root, owners = brain_dataset
    recipe = dict(RECIPE, validation_cases=[c for c, p in owners.items() if p == "PGBM-001"])
    work = tmp_path_factory.mktemp("model")
    (work / "recipe.json").write_text(json.dumps(recipe))
    output = work / "brain-model"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["train", str(root), "-o", str(output), "--config", str(work / "recipe.json"),
                         "--progress", "json"])
    assert code == 0, stderr.getvalue()
    return output, stdout.getvalue()


@pytest.mark.slow
def test_training_beats_an_empty_prediction_and_exports_a_usable_model(
    trained: tuple[Path, str], brain_dataset: tuple[Path, dict[str, str]], new_file_mode: int
) -> None:
    output, progress = trained
    card = ModelCard.from_folder(output)  # validates model.json and finds both weight files
    assert card.weights_path("keras") and card.weights_path("onnx")
    assert card.channel_names == ["T1post"] and [lab.name for lab in card.labels] == ["tumor"]
    assert card.labels[0].color == (0.9, 0.2, 0.2)
    assert card.spatial.mode == "2d" and card.spatial.patch_size == (64, 64)
    assert card.spatial.target_spacing == (2.0, 2.0, None) and card.spatial.divisible_by == 8
    raw = card.raw
    assert raw["channels"][0]["normalization"] == {"method": "zscore", "nonzero": True}
    assert raw["license"].startswith("CC BY") and "Schmainda" in raw["provenance"]["citation"]
    assert (output / "NOTICE").read_text().startswith("Trained on TCIA")
    assert raw["provenance"]["onnx_max_abs_diff"] <= 1e-4

    # Validation on the held-out patient PGBM-001: an empty prediction scores 0 on a study that has
    # a tumour; the tiny network must do clearly better within 320 steps.
    validation = raw["metrics"]["validation"]
    root, owners = brain_dataset
    assert [owners[c] for c in validation["cases"]] == ["PGBM-001"] and not validation["validation_is_train"]
    assert validation["dice"]["tumor"] == validation["mean_dice"] >= 0.15
    training = raw["training"]
    assert {owners[c] for c in training["split"]["train_cases"]} == {"PGBM-003", "PGBM-006"}
    assert training["epochs_run"] >= training["best_epoch"] >= 1 and training["steps_per_epoch"] == 40
    assert len(training["git"]["commit"]) == 40 and training["date"].startswith("20")
    assert "path" not in training["dataset"] and training["dataset"]["patients"] == 3

    # progress: one JSON object per epoch from the "train" stage
    records = [json.loads(line) for line in progress.splitlines() if line.strip()]
    epochs = [r for r in records if r["stage"] == "train"]
    assert [r["done"] for r in epochs] == list(range(1, training["epochs_run"] + 1))
    assert all(r["total"] == 8 and "loss" in r["message"] and "val dice" in r["message"] for r in epochs)

    # history and TensorBoard logs in the output folder
    with open(output / "training" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(training["epochs_run"]))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert max(float(r["val_dice"]) for r in rows) == pytest.approx(validation["mean_dice"], abs=1e-5)
    assert list((output / "training" / "logs" / "validation").glob("events.out.tfevents.*"))
    run = json.loads((output / "training" / "run.json").read_text())
    assert run["status"] == "finished" and "path" not in run["dataset"]  # no local paths left behind
    assert not (output / "training" / "backup").exists() and not (output / "training" / "best.keras").exists()
    modes = {str(p.relative_to(output)): p.stat().st_mode & 0o777 for p in output.rglob("*") if p.is_file()}
    assert modes and all(mode == new_file_mode for mode in modes.values()), modes  # not temp files' 0600


@pytest.mark.slow
def test_exported_model_segments_an_unseen_dicom_study(trained: tuple[Path, str], brain_dicom_study: Path, tmp_path: Path) -> None:
    """PGBM-001's DICOM study was never read during training; segment it through ``medsegai segment``."""
    output, _ = trained
    result = tmp_path / "tumor.nrrd"
    code = cli.main(["segment", str(brain_dicom_study / "dicom" / "T1post"), "-o", str(result), "--model", str(output),
                     "--progress", "none"])
    assert code == 0
    labels = read_volume(result)
    reference = read_volume(brain_dicom_study / "dicom" / "MaskTumor")
    image = read_volume(brain_dicom_study / "dicom" / "T1post")
    assert labels.same_grid(image)
    predicted, truth = np.asarray(labels.array) == 1, np.asarray(reference.array) > 0
    dice = 2 * np.logical_and(predicted, truth).sum() / (predicted.sum() + truth.sum())
    # An empty or a mis-registered (flipped/shifted) prediction scores ~0 on this small tumour.
    assert dice >= 0.1, f"Dice {dice:.3f} on the unseen study"


@pytest.mark.slow
def test_existing_output_is_refused(trained: tuple[Path, str], brain_dataset: tuple[Path, dict[str, str]]) -> None:
    output, _ = trained
    before = _tree_digest(output)
    root, _ = brain_dataset
    with pytest.raises(MedSegAIInputError, match="already exists"):
        train(root, output, config=TINY)
    with pytest.raises(MedSegAIInputError, match="already finished"):
        train(root, output, resume=True)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert cli.main(["train", str(root), "-o", str(output), "--epochs", "1"]) == 2
    assert stderr.getvalue().startswith("error: output folder") and "--resume" in stderr.getvalue()
    assert _tree_digest(output) == before


@pytest.mark.slow
def test_interrupted_run_resumes_without_losing_epochs(brain_dataset: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root, _ = brain_dataset
    seen: list[tuple[str, int]] = []

    def progress(stage: str, done: int, total: int, message: str = "") -> None:
        seen.append((stage, done))

    def cancel_after_first_epoch() -> bool:
        return ("train", 1) in seen

    interrupted = tmp_path / "interrupted"
    with pytest.raises(CancelledError):
        train(root, interrupted, config=TINY, progress=progress, should_cancel=cancel_after_first_epoch)
    run = json.loads((interrupted / "training" / "run.json").read_text())
    assert run["status"] == "running" and run["state"]["epochs_done"] == 1
    assert (interrupted / "training" / "best.keras").stat().st_mode & 0o077  # the checkpoint is not left owner-only
    assert not (interrupted / "model.json").exists()
    with pytest.raises(MedSegAIInputError, match="different settings"):
        train(root, interrupted, config=dict(TINY, epochs=5), resume=True)

    seen.clear()
    assert train(root, interrupted, resume=True, progress=progress) == interrupted.absolute()
    assert [d for s, d in seen if s == "train"] == [2, 3]  # continues after the finished epoch
    with open(interrupted / "training" / "history.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
    card = json.loads((interrupted / "model.json").read_text())
    assert card["training"]["epochs_run"] == 3

    straight = train(root, tmp_path / "straight", config=TINY)
    from medsegai_training.export import load_keras_model

    resumed_weights = load_keras_model(interrupted).get_weights()
    straight_weights = load_keras_model(straight).get_weights()
    for a, b in zip(resumed_weights, straight_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_finetune_names_its_parent_and_leaves_it_byte_identical(
    trained: tuple[Path, str], shared_data: Path, tmp_path: Path
) -> None:
    parent, _ = trained
    before = _tree_digest(parent)
    parent_card = json.loads((parent / "model.json").read_text())
    # A "corrected" case as the Slicer export writes it: the tumour mask plus a new label.
    study = shared_data / "mr-brain-tumor" / "PGBM-003" / "1995-03-29"
    image = read_volume(study / "T1post.nrrd")
    tumour = np.asarray(read_volume(study / "MaskTumor.nrrd").array) > 0
    label = np.zeros(image.shape, np.uint8)
    label[np.asarray(image.array) > np.percentile(image.array, 90)] = 2
    label[tumour] = 1
    corrected = tmp_path / "corrected"
    add_case(corrected, [image], image.with_array(label), ["T1post"], {"tumor": 1, "bright": 2},
             patient_key="PGBM-003", source_model={"id": parent_card["id"], "version": parent_card["version"]},
             changed_voxels=int((label == 2).sum()))
    assert load_dataset(corrected).cases[0].source_model["id"] == "test-brain-tumor"

    child = tmp_path / "child"
    recipe = tmp_path / "finetune.json"
    recipe.write_text(json.dumps({"steps_per_epoch": 3, "batch_size": 4, "augmentation": {"enabled": False}}))
    code = cli.main(["train", str(corrected), "-o", str(child), "--init", str(parent), "--config", str(recipe),
                     "--epochs", "1", "--freeze-encoder", "--progress", "none"])
    assert code == 0
    assert _tree_digest(parent) == before  # the parent folder is only read

    card = json.loads((child / "model.json").read_text())
    assert card["provenance"]["parent"]["id"] == "test-brain-tumor"
    assert card["provenance"]["parent"]["version"] == "0.1.0"
    assert card["id"] == "test-brain-tumor" and card["version"] == "0.1.1"
    assert [(lab["name"], lab["value"]) for lab in card["labels"]] == [("tumor", 1), ("bright", 2)]
    assert card["labels"][0]["color"] == [0.9, 0.2, 0.2]  # kept from the parent
    assert card["spatial"]["target_spacing"] == [2.0, 2.0, None]  # inherited
    assert card["architecture"]["config"]["num_classes"] == 3
    run = json.loads((child / "training" / "run.json").read_text())
    assert run["adaptation"]["head_copied_labels"] == ["tumor"] and run["adaptation"]["head_new_labels"] == ["bright"]
    ModelCard.from_folder(child)

    from medsegai_training.export import load_keras_model

    old, new = load_keras_model(parent), load_keras_model(child)
    encoder = [layer.name for layer in new.layers if layer.name.startswith("enc_") and layer.weights]
    assert encoder
    for name in encoder:  # --freeze-encoder: the encoder is exactly the parent's
        for a, b in zip(old.get_layer(name).get_weights(), new.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bad_dataset_is_refused_before_training(brain_dataset: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    import shutil

    root, _ = brain_dataset
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "labels" / "case_0002.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    output = tmp_path / "never"
    with pytest.raises(MedSegAIInputError, match="case_0002"):
        train(broken, output, config=TINY)
    assert not output.exists()


# ----------------------------------------------------------------------------------------------
# configuration and command line (fast)
# ----------------------------------------------------------------------------------------------


def test_recipe_errors_name_the_key(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"epochs": 2, "learning_rate": 0.1}))
    with pytest.raises(MedSegAIInputError, match="unknown keys \\['learning_rate'\\]"):
        load_config(recipe)
    recipe.write_text("{not json")
    with pytest.raises(MedSegAIInputError, match="not valid JSON"):
        load_config(recipe)
    bad = [
        ({"model": {"builder": "resnet"}}, "model.builder"),
        ({"model": {"builder": "unet_3d"}, "spatial": {"mode": "2d"}}, "model.builder"),
        ({"spatial": {"mode": "2d", "patch_size": [100, 96], "divisible_by": 16}}, "divisible by 16"),
        ({"foreground_fraction": 0.2}, "foreground_fraction"),
        ({"fold": 1}, "'fold'"),
        ({"folds": 5, "fold": 5}, "'fold'"),
        ({"labels": [{"name": "a", "value": 2}]}, "values \\[2\\] must be 1..1"),
        ({"labels": [{"name": "a", "source": [5]}, {"name": "b", "source": [5]}]}, "twice"),
        ({"channels": [{"name": "CT", "normalization": {"method": "percentile", "fit": True}}]}, "fit"),
        ({"model_id": "Bad Id"}, "model_id"),
        ({"schedule": {"name": "exponential"}}, "schedule.name"),
        ({"mixed_precision": "yes"}, "mixed_precision"),
    ]
    for recipe_dict, message in bad:
        with pytest.raises(MedSegAIInputError, match=message):
            config_from_dict(recipe_dict)


def test_config_defaults_plan_and_round_trip() -> None:
    config = config_from_dict({"model": {"builder": "unet_3d"}, "epochs": 10, "steps_per_epoch": 50, "max_steps": 120})
    assert config.spatial["mode"] == "3d" and len(config.spatial["patch_size"]) == 3
    assert config.plan() == (2, 50)  # a hard cap: never more than max_steps batches
    assert config_from_dict({"max_steps": 7, "steps_per_epoch": 50}).plan() == (1, 7)
    assert config_from_dict(config.to_dict()).to_dict() == config.to_dict()
    labels = config_from_dict({"labels": [{"name": "liver", "source": 5}]}).labels
    assert labels == [{"name": "liver", "source": [5], "value": 1}]
    assert config_from_dict({}).augmentation_config()["enabled"] is True  # the package default
    assert config_from_dict({"augmentation": {"enabled": False}}).augmentation_config() == {"enabled": False}


def test_yaml_recipe_needs_pyyaml_or_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 3\nseed: 4\n")
    import importlib.util

    if importlib.util.find_spec("yaml") is None:
        with pytest.raises(MedSegAIInputError, match="PyYAML"):
            load_config(recipe)
    else:
        assert load_config(recipe).epochs == 3 and load_config(recipe).seed == 4


def test_cli_refuses_bad_options_before_training(tmp_path: Path, brain_dicom_study: Path) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert cli.main(["train", str(tmp_path), "-o", str(tmp_path / "m")]) == 2
        assert cli.main(["train", str(tmp_path), "-o", str(tmp_path / "m"), "--fold", "1"]) == 2
        assert cli.main(["train", str(tmp_path), "-o", str(tmp_path / "m"), "--freeze-encoder"]) == 2
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "no dataset.json" in lines[0] and "--folds" in lines[1] and "--init" in lines[2]
    assert not (tmp_path / "m").exists()


def test_epoch_bar_reporter_prints_one_line_per_epoch() -> None:
    stream = io.StringIO()
    report = EpochBarReporter(stream, width=10)
    report("preprocess", 1, 2, "case case_0001")
    report("preprocess", 2, 2, "case case_0002")
    report("train", 1, 4, "loss 0.5000 val dice 0.1000")
    report("train", 2, 4, "loss 0.4000 val dice 0.3000")
    lines = [line for line in stream.getvalue().split("\n") if line.startswith("epoch")]
    assert len(lines) == 2
    assert lines[0].startswith("epoch    1/4    [##........]") and "val dice 0.1000" in lines[0]
    assert lines[1].startswith("epoch    2/4    [#####.....]")


@pytest.mark.slow
def test_segment_gives_the_same_dice_as_evaluate(
    trained: tuple[Path, str], brain_dataset: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """`medsegai segment` on a held-out study reproduces the Dice that `medsegai evaluate` reports."""
    output, _ = trained
    root, owners = brain_dataset
    case_id = sorted(c for c, p in owners.items() if p == "PGBM-001")[0]
    report = tmp_path / "report"
    assert cli.main(["evaluate", "--model", str(output), str(root), "--cases", case_id, "-o", str(report)]) == 0
    with open(report / "metrics.csv", newline="") as f:
        evaluated = float(next(r for r in csv.DictReader(f) if r["case"] == case_id and r["label"] == "tumor")["dice"])

    case = load_dataset(root).case(case_id)
    result = tmp_path / "tumor.nrrd"
    assert cli.main(["segment", str(case.images[0]), "-o", str(result), "--model", str(output),
                     "--progress", "none"]) == 0
    predicted = np.asarray(read_volume(result).array) == 1
    truth = np.asarray(read_volume(case.label).array) == 1
    dice = 2 * np.logical_and(predicted, truth).sum() / (predicted.sum() + truth.sum())
    assert evaluated > 0.1
    assert dice == pytest.approx(evaluated, abs=1e-5)
