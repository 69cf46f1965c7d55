"""`medsegai export` (SavedModel, TFLite float/int8) and `segment --backend tflite`, on the shipped models and real cases.

The check cases come from dataset folders built from ../shared/data by
training/recipes/build_datasets.py, as `make models` builds them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedSegAILib.cli import main
from MedSegAILib.model.modelcard import ModelCard

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _build(model_id: str, shared: Path, root: Path) -> Path:
    sys.path.insert(0, str(REPO / "training" / "recipes"))
    try:
        from build_datasets import build_dataset
    finally:
        sys.path.remove(str(REPO / "training" / "recipes"))
    return build_dataset(model_id, shared, root)


@pytest.fixture(scope="module")
def ct_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("ct-abdomen-organs", shared_data, tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def mr_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("mr-brain-tumor", shared_data, tmp_path_factory.mktemp("ds"))


def run_cli(*args: str) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "MedSegAI"), str(REPO / "training")]))
    done = subprocess.run([sys.executable, "-m", "MedSegAILib.cli", *args], capture_output=True, text=True, env=env, timeout=900)
    return done.returncode, done.stdout, done.stderr


def test_tflite_float_export_runs_as_a_backend(ct_dataset, ct_small, tmp_path) -> None:
    out = tmp_path / "ct-tflite"
    assert main(["export", "ct-abdomen-organs", "--format", "tflite", "-o", str(out), "--data", str(ct_dataset),
                 "--cases", "1"]) == 0
    card = ModelCard.from_folder(out)  # a valid model folder: schema, files present
    assert sorted(p.name for p in out.iterdir()) == ["NOTICE", "README.md", "model.json", "model.tflite"]
    assert card.files["tflite"] == "model.tflite"
    assert card.files["signature"]["inputs"]["image"] == {
        "shape": [None, None, None, 1], "dtype": "float32", "layout": "N, y, x, C: normalised intensities, channels CT"}
    assert card.files["signature"]["outputs"]["probabilities"]["shape"] == [None, None, None, 7]
    check = card.raw["metrics"]["deployment"]
    assert check["cases"] == ["case_0001"] and check["voxel_agreement"] >= 0.999
    assert check["dice_float"] > 0.8 and abs(check["dice_change"]) < 0.005
    assert card.raw["metrics"]["cross_validation"]["dice"]["liver"] == pytest.approx(0.9321)  # the card is carried over

    tflite_labels, onnx_labels = tmp_path / "tflite.nrrd", tmp_path / "onnx.nrrd"
    code, _, err = run_cli("segment", str(ct_small), "-o", str(tflite_labels), "--model", str(out),
                           "--backend", "tflite", "--progress", "none")
    assert code == 0, err
    assert err.strip().count("\n") == 0 and "(tflite, cpu)" in err  # one summary line, no native start-up noise
    # the shipped model.onnx was checked against Keras when it was written (max difference <= 1e-4): a cheaper reference
    assert main(["segment", str(ct_small), "-o", str(onnx_labels), "--backend", "onnx", "--precision", "fp32",
                 "--progress", "none"]) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tflite_labels)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(onnx_labels)))
    assert (a == b).mean() >= 0.999 and (a == 1).sum() > 10000  # liver found, same labels


def test_savedmodel_of_the_brain_model_is_tf_serving_layout(mr_dataset, tmp_path) -> None:
    from MedSegAILib.model.backends import import_tensorflow

    out = tmp_path / "brain-serving"
    assert main(["export", "mr-brain-tumor", "--format", "savedmodel", "-o", str(out), "--data", str(mr_dataset),
                 "--cases", "1"]) == 0
    assert (out / "1" / "saved_model.pb").is_file() and (out / "1" / "variables").is_dir()
    card = ModelCard.from_folder(out)
    assert card.files["savedmodel"] == "1" and card.raw["metrics"]["deployment"]["voxel_agreement"] >= 0.999
    readme = (out / "README.md").read_text()
    assert "http://localhost:8501/v1/models/mr-brain-tumor:predict" in readme and '"instances"' in readme
    tf = import_tensorflow()
    serve = tf.saved_model.load(str(out / "1")).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["image"]
    assert spec.shape.as_list() == [None, None, None, 3] and spec.dtype == tf.float32
    assert list(serve.structured_outputs) == ["probabilities"]
    window = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    probabilities = serve(image=tf.constant(window))["probabilities"].numpy()
    assert probabilities.shape == (1, 64, 64, 2)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, atol=1e-5)


def test_bad_export_requests_are_one_line_and_write_nothing(ct_dataset, tmp_path, capsys) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    cases = [
        (["--format", "coreml", "-o", str(tmp_path / "a"), "--data", str(ct_dataset)], "unknown export format"),
        (["--format", "tflite", "-o", str(existing), "--data", str(ct_dataset)], "already exists"),
        (["--format", "tflite", "--quantize", "int8", "-o", str(tmp_path / "b")], "int8 needs calibration data"),
        (["--format", "savedmodel", "--quantize", "int8", "-o", str(tmp_path / "c"), "--data", str(ct_dataset)],
         "--quantize is for --format tflite"),
        (["--format", "tflite", "-o", str(tmp_path / "missing" / "d"), "--data", str(ct_dataset)], "does not exist"),
    ]
    for extra, message in cases:
        assert main(["export", "ct-abdomen-organs", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert (existing / "keep.txt").read_text() == "keep"


def test_int8_dice_change_is_measured_and_bounded(ct_dataset, tmp_path) -> None:
    from medsegai_training import deploy

    out = tmp_path / "ct-int8"
    assert main(["export", "ct-abdomen-organs", "--format", "tflite", "--quantize", "int8", "-o", str(out),
                 "--data", str(ct_dataset), "--cases", "1"]) == 0
    card = ModelCard.from_folder(out)
    check = card.raw["metrics"]["deployment"]
    assert check["quantize"] == "int8" and "windows the engine fed the network" in check["calibration"]
    assert -deploy.MAX_INT8_DICE_DROP <= check["dice_change"] == pytest.approx(check["dice_export"] - check["dice_float"], abs=1e-4)
    size_float = (REPO / "MedSegAI/Resources/Models/ct-abdomen-organs/model.keras").stat().st_size
    assert (out / "model.tflite").stat().st_size < 0.4 * size_float  # 8-bit weights



def test_int8_refusal_rule() -> None:
    from medsegai_training.deploy import MAX_INT8_DICE_DROP, check_int8

    from MedSegAILib.core.errors import MedSegAIInputError

    check = {"cases": ["case_0001", "case_0002"], "dice_float": 0.9, "dice_export": 0.9 - MAX_INT8_DICE_DROP + 1e-6}
    check["dice_change"] = check["dice_export"] - check["dice_float"]
    check_int8(check)  # within the bound
    check.update(dice_export=0.85, dice_change=-0.05)
    with pytest.raises(MedSegAIInputError, match=r"drops by 0\.0500 \(float 0\.9000 -> int8 0\.8500 on 2 case\(s\)\).*--force"):
        check_int8(check)
    check_int8(check, force=True)
    with pytest.raises(MedSegAIInputError, match="none of the model's labels"):
        check_int8({"cases": ["c"], "dice_float": None, "dice_export": None, "dice_change": None})


def test_a_layer_tflite_cannot_hold_is_named(ct_dataset, tmp_path, capsys) -> None:
    import keras
    from analytic_models import threshold_model_folder

    from MedSegAILib.model.backends import import_tensorflow

    tf = import_tensorflow()

    @keras.saving.register_keras_serializable(package="medsegai_test")
    class ErfInvGate(keras.layers.Layer):
        def call(self, x):
            return tf.math.erfinv(tf.clip_by_value(x * 1e-4, -0.5, 0.5)) * 1e4

    folder = threshold_model_folder(tmp_path / "model", backends=("keras",))
    inputs = keras.Input((None, None, 1), name="image")
    conv = keras.layers.Conv2D(2, 1, name="threshold")
    outputs = keras.layers.Softmax(name="probabilities")(conv(ErfInvGate(name="erfinv_gate")(inputs)))
    keras.Model(inputs, outputs).save(folder / "model.keras")
    out = tmp_path / "out"
    assert main(["export", str(folder), "--format", "tflite", "-o", str(out), "--data", str(ct_dataset), "--cases", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the tflite format cannot hold layer 'erfinv_gate' (ErfInvGate")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
