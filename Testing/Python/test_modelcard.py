"""Model folder validation, lookup and backends (safe mode, ONNX vs Keras)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from analytic_models import THRESHOLD_HU, lambda_model_folder, threshold_model_folder
from MedSegAILib.model.backends import load_predictor
from MedSegAILib.core.errors import MedSegAIInputError, ModelFolderError
from MedSegAILib.model.modelcard import ModelCard, find_model, list_models, validate_model_dict


def test_analytic_card_is_valid(analytic_model_dir: Path) -> None:
    card = ModelCard.from_folder(analytic_model_dir)
    assert card.id == "analytic-bone-2d"
    assert card.channel_names == ["CT"]
    assert card.num_classes == 2
    assert card.label_map == {"background": 0, "bone": 1}
    assert card.spatial.patch_size == (64, 64)
    assert card.spatial.target_spacing == (None, None, None)


@pytest.mark.parametrize(
    ("architecture", "free"),
    [
        (None, False),  # an imported ONNX file: nothing known about its normalisation
        ({"builder": "unet_2d", "config": {"norm": "batch"}}, True),
        ({"builder": "unet_2d", "config": {"norm": "none"}}, True),
        ({"builder": "unet_2d", "config": {"norm": "instance"}}, False),
        ({"builder": "unet_2d", "config": {"norm": "group"}}, False),
        ({"builder": "unet_2d", "config": {}}, False),
    ],
)
def test_window_size_free_follows_the_normalisation(analytic_model_dir: Path, architecture, free: bool) -> None:
    data = json.loads((analytic_model_dir / "model.json").read_text())
    data.pop("architecture", None)
    if architecture is not None:
        data["architecture"] = architecture
    assert ModelCard.from_dict(data, analytic_model_dir).window_size_free is free


def test_every_problem_reported_at_once(analytic_model_dir: Path) -> None:
    data = json.loads((analytic_model_dir / "model.json").read_text())
    data["version"] = "one"
    data["labels"][0]["value"] = 0
    data["spatial"]["mode"] = "4d"
    del data["channels"]
    problems = validate_model_dict(data)
    joined = " | ".join(problems)
    assert len(problems) >= 4, problems
    for where in ("version", "labels/0/value", "spatial/mode", "channels"):
        assert where in joined


def test_semantic_rules(analytic_model_dir: Path) -> None:
    data = json.loads((analytic_model_dir / "model.json").read_text())
    data["labels"].append(dict(data["labels"][0], value=3))
    data["spatial"]["patch_size"] = [64, 64, 64]
    problems = " | ".join(validate_model_dict(data))
    assert "unique" in problems and "1..2" in problems and "needs 2 values" in problems


def test_invalid_folder_gives_one_clear_error(tmp_path: Path, analytic_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(analytic_model_dir, broken)
    (broken / "model.json").write_text('{"id": "x"', encoding="utf-8")
    with pytest.raises(ModelFolderError, match="cannot read .*model.json"):
        ModelCard.from_folder(broken)
    card = json.loads((analytic_model_dir / "model.json").read_text())
    card["labels"][0]["color"] = [300, 0, 0]
    (broken / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelFolderError, match="invalid model.json: labels/0/color"):
        ModelCard.from_folder(broken)
    (broken / "model.json").write_text(json.dumps(dict(card, labels=[dict(card["labels"][0], color=[1, 0, 0])])))
    (broken / "model.onnx").unlink()
    with pytest.raises(ModelFolderError, match="not there: model.onnx"):
        ModelCard.from_folder(broken)
    with pytest.raises(ModelFolderError, match="has no model.json"):
        ModelCard.from_folder(tmp_path)


def test_find_model_by_id_picks_highest_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    for version in ("1.0.0", "1.2.0", "1.10.0"):
        folder = threshold_model_folder(store / f"bone-{version}", backends=("onnx",), model_id="bone")
        data = json.loads((folder / "model.json").read_text())
        data["version"] = version
        (folder / "model.json").write_text(json.dumps(data))
    monkeypatch.setenv("MEDSEGAI_MODELS", str(store))
    assert find_model("bone").version == "1.10.0"
    assert {c.version for c in list_models() if c.id == "bone"} == {"1.0.0", "1.2.0", "1.10.0"}
    with pytest.raises(ModelFolderError, match="no installed model has id 'nope'"):
        find_model("nope")
    assert find_model(str(store / "bone-1.0.0")).version == "1.0.0"


def test_keras_safe_mode_refuses_lambda(tmp_path: Path) -> None:
    card = ModelCard.from_folder(lambda_model_folder(tmp_path / "lambda"))
    with pytest.raises(ModelFolderError, match="Lambda"):
        load_predictor(card, backend="tensorflow", device="cpu")


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_onnx_and_keras_backends_agree_with_numpy(mode: str, request: pytest.FixtureRequest, ct_small: Path) -> None:
    import SimpleITK as sitk

    folder = request.getfixturevalue("analytic_model_dir" if mode == "2d" else "analytic_model_3d_dir")
    card = ModelCard.from_folder(folder)
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_small))).astype(np.float32)
    batch = ct[10:14, :, :, None] if mode == "2d" else ct[None, 8:24, :, :, None]
    onnx_probabilities = load_predictor(card, backend="onnx").predict(batch)
    keras_probabilities = load_predictor(card, backend="tensorflow", device="cpu").predict(batch)
    assert onnx_probabilities.shape == batch.shape[:-1] + (2,)
    np.testing.assert_allclose(onnx_probabilities, keras_probabilities, atol=1e-5)
    np.testing.assert_array_equal(onnx_probabilities.argmax(-1) == 1, batch[..., 0] > THRESHOLD_HU)


def test_backend_choice_and_errors(analytic_model_dir: Path, tmp_path: Path) -> None:
    card = ModelCard.from_folder(analytic_model_dir)
    assert load_predictor(card).name == "onnx"
    keras_only = ModelCard.from_folder(threshold_model_folder(tmp_path / "k", backends=("keras",)))
    assert load_predictor(keras_only, device="cpu").name == "tensorflow"
    with pytest.raises(MedSegAIInputError, match="has no model.onnx"):
        load_predictor(keras_only, backend="onnx")
    with pytest.raises(MedSegAIInputError, match="unknown backend"):
        load_predictor(card, backend="torch")
