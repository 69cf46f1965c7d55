"""Exporting Keras models to model folders: ONNX vs Keras on real CT slices, safe reload, no overwrite."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")
onnx = pytest.importorskip("onnx")

from MedSegAILib.core.errors import MedSegAIInputError, ModelFolderError  # noqa: E402
from MedSegAILib.io.imageio import read_volume  # noqa: E402
from MedSegAILib.model.modelcard import ModelCard, validate_model_dict  # noqa: E402
from MedSegAILib.inference.preprocessing import normalize  # noqa: E402
from medsegai_training.export import ONNX_TOLERANCE, export_model_folder, load_keras_model  # noqa: E402
from medsegai_training.models import build_model, resolve_config  # noqa: E402

CT_NORMALIZATION = {"method": "ct", "clip": [-200, 300]}

CONFIGS = {
    "unet_2d": {
        "builder": "unet_2d",
        "base_filters": 4,
        "depth": 2,
        "num_classes": 3,
        "attention": "cbam",
        "residual": True,
        "norm": "instance",
    },
    "dense_unet_2d": {
        "builder": "dense_unet_2d",
        "base_filters": 8,
        "depth": 2,
        "growth_rate": 4,
        "layers_per_block": 2,
        "num_classes": 3,
    },
    "vgg16_unet_2d": {"builder": "vgg16_unet_2d", "depth": 2, "num_classes": 3, "decoder_filters": [8, 8]},
    "unet_3d": {"builder": "unet_3d", "base_filters": 4, "depth": 2, "num_classes": 3},
}


@pytest.fixture(scope="module")
def ct_array(ct_small: Path) -> np.ndarray:
    """The real abdomen CT (30, 101, 122) (z, y, x), normalised like the card says."""
    return normalize(read_volume(ct_small).array, CT_NORMALIZATION)


def _batch(ct: np.ndarray, mode: str) -> np.ndarray:
    if mode == "3d":
        return np.ascontiguousarray(ct[8:16, 8:40, 16:64][None, ..., None])  # (1, 8, 32, 48, 1)
    return np.ascontiguousarray(ct[10:14, 8:72, 16:112, None])  # (4, 64, 96, 1) axial slices


def _card(config: dict[str, Any]) -> dict[str, Any]:
    mode = "3d" if config["builder"] == "unet_3d" else "2d"
    return {
        "schema_version": 1,
        "id": f"test-{config['builder'].replace('_', '-')}",
        "name": f"Test {config['builder']}",
        "version": "0.1.0",
        "description": "tiny untrained test network",
        "license": "Apache-2.0",
        "channels": [{"name": "CT", "modality": "CT", "normalization": CT_NORMALIZATION}],
        "labels": [
            {"name": "liver", "value": 1, "color": [0.86, 0.55, 0.47]},
            {"name": "spleen", "value": 2, "color": [0.62, 0.31, 0.64]},
        ],
        "spatial": {
            "mode": mode,
            **({"axis": "axial"} if mode == "2d" else {}),
            "orientation": "LPS",
            "patch_size": [16, 64, 64] if mode == "3d" else [64, 64],
            "divisible_by": 4,
        },
        "files": {"keras": "model.keras"},
        "architecture": {"builder": config["builder"], "config": resolve_config(config)},
        "provenance": {"note": "test"},
    }


def _make_decisive(model: keras.Model) -> None:
    """Scale the head so that untrained outputs are not near-uniform (labels then mean something)."""
    head = model.get_layer("head_conv")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 20.0, bias])


@pytest.mark.parametrize("builder", sorted(CONFIGS))
def test_export_validates_and_onnx_matches_keras_on_real_ct(builder: str, tmp_path: Path, ct_array: np.ndarray) -> None:
    keras.utils.set_random_seed(1)
    config = CONFIGS[builder]
    model = build_model(config)
    _make_decisive(model)
    card = _card(config)
    mode = card["spatial"]["mode"]
    batch = _batch(ct_array, mode)
    out = export_model_folder(model, card, tmp_path / "model", batch, extra_files={"NOTICE": "test notice\n"})

    assert out == tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == ["NOTICE", "model.json", "model.keras", "model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind
    written = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert validate_model_dict(written) == []
    assert written["files"] == {"keras": "model.keras", "onnx": "model.onnx"}
    assert written == card  # the caller's card was completed in place
    diff = written["provenance"]["onnx_max_abs_diff"]
    assert 0.0 <= diff <= ONNX_TOLERANCE
    assert written["provenance"]["note"] == "test"
    assert written["architecture"]["config"]["builder"] == builder
    loaded_card = ModelCard.from_folder(out)
    assert loaded_card.num_classes == 3

    reloaded = load_keras_model(out)  # safe mode
    keras_probs = np.asarray(reloaded(batch, training=False))
    np.testing.assert_allclose(keras_probs, np.asarray(model(batch, training=False)), atol=1e-5)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image"
    assert inp.shape[-1] == 1 and all(isinstance(d, str) or d is None for d in inp.shape[:-1])  # dynamic axes
    assert session.get_outputs()[0].name == "probabilities"
    nodes = onnx.load(str(out / "model.onnx")).graph.node
    ops = {node.op_type for node in nodes}
    assert "Softmax" not in ops and "Pad" not in ops  # simplify_onnx rewrote the slow patterns
    if mode == "2d":  # no Concat feeds a Conv alone any more (skip connections: split convolutions)
        users = {name: [n.op_type for n in nodes if name in n.input] for node in nodes for name in node.output}
        assert all(users[node.output[0]] != ["Conv"] for node in nodes if node.op_type == "Concat")
    assert written["provenance"]["onnx_simplified"] >= 2
    onnx_probs = session.run(None, {"image": batch})[0]
    assert onnx_probs.shape == batch.shape[:-1] + (3,) and onnx_probs.dtype == np.float32
    assert np.max(np.abs(onnx_probs - keras_probs)) <= ONNX_TOLERANCE
    labels = keras_probs.argmax(-1)
    assert len(np.unique(labels)) >= 2  # a decisive network, so label agreement below is meaningful
    margin = np.sort(keras_probs, axis=-1)
    clear = (margin[..., -1] - margin[..., -2]) > 2 * ONNX_TOLERANCE
    np.testing.assert_array_equal(onnx_probs.argmax(-1)[clear], labels[clear])

    # the dynamic spatial axes work for another window size too
    other = np.ascontiguousarray(np.concatenate([batch, batch[..., :16, :]], axis=-2))  # x + 16 voxels
    np.testing.assert_allclose(
        session.run(None, {"image": other})[0], np.asarray(reloaded(other, training=False)), atol=ONNX_TOLERANCE
    )


def test_exported_folder_runs_through_engine_backends(tmp_path: Path, ct_array: np.ndarray) -> None:
    from MedSegAILib.model.backends import load_predictor

    keras.utils.set_random_seed(2)
    config = CONFIGS["unet_2d"]
    model = build_model(config)
    _make_decisive(model)
    batch = _batch(ct_array, "2d")
    out = export_model_folder(model, _card(config), tmp_path / "m", batch)
    card = ModelCard.from_folder(out)
    onnx_probs = load_predictor(card, backend="onnx", device="cpu").predict(batch)
    tf_probs = load_predictor(card, backend="tensorflow", device="cpu").predict(batch)
    assert np.max(np.abs(onnx_probs - tf_probs)) <= ONNX_TOLERANCE


def test_existing_folder_is_refused_and_left_untouched(tmp_path: Path, ct_array: np.ndarray) -> None:
    config = CONFIGS["unet_2d"]
    model = build_model(config)
    target = tmp_path / "existing"
    target.mkdir()
    (target / "model.json").write_text("{}", encoding="utf-8")
    card = _card(config)
    before = copy.deepcopy(card)
    with pytest.raises(MedSegAIInputError, match="already exists"):
        export_model_folder(model, card, target, _batch(ct_array, "2d"))
    assert (target / "model.json").read_text(encoding="utf-8") == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert card == before


def test_invalid_card_or_batch_writes_nothing(tmp_path: Path, ct_array: np.ndarray) -> None:
    config = CONFIGS["unet_2d"]
    model = build_model(config)
    batch = _batch(ct_array, "2d")
    bad = _card(config)
    bad["labels"][0]["color"] = [2, 0, 0]
    with pytest.raises(ModelFolderError, match="labels/0/color"):
        export_model_folder(model, bad, tmp_path / "a", batch)
    one_label = _card(config)
    one_label["labels"] = one_label["labels"][:1]
    with pytest.raises(ValueError, match="3 classes"):
        export_model_folder(model, one_label, tmp_path / "b", batch)
    with pytest.raises(ValueError, match="channels"):
        export_model_folder(model, _card(config), tmp_path / "c", np.repeat(batch, 2, axis=-1))
    with pytest.raises(ValueError, match="dimensions"):
        export_model_folder(model, _card(config), tmp_path / "d", batch[0])
    with pytest.raises(TypeError):
        export_model_folder(model, _card(config), tmp_path / "e", batch.tolist())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_mixed_precision_model_is_exported_as_float32_without_onnx(tmp_path: Path, ct_array: np.ndarray) -> None:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model(dict(CONFIGS["dense_unet_2d"], attention="cbam"))
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("head_conv").compute_dtype == "float16"
    card = _card(CONFIGS["dense_unet_2d"])
    batch = _batch(ct_array, "2d")
    out = export_model_folder(model, card, tmp_path / "fp32", batch, onnx=False)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.keras"]
    assert card["files"] == {"keras": "model.keras"} and "onnx_max_abs_diff" not in card["provenance"]
    reloaded = load_keras_model(out / "model.keras")
    assert {layer.dtype_policy.name for layer in reloaded.layers} == {"float32"}
    # float16 and float32 inference of the same weights agree to float16 precision
    np.testing.assert_allclose(np.asarray(reloaded(batch)), np.asarray(model(batch)), atol=2e-2)


def _assert_onnx_matches_keras(path: Path, model: keras.Model, ct_array: np.ndarray) -> None:
    """The exported graph gives Keras' probabilities on real CT windows of two sizes."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (_batch(ct_array, "2d"), np.ascontiguousarray(ct_array[:2, :36, :52, None])):
        expected = np.asarray(model(batch, training=False))
        got = session.run(None, {"image": batch})[0]
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) <= ONNX_TOLERANCE


def test_simplify_keeps_conv_transposes_that_need_cropping(tmp_path: Path, ct_array: np.ndarray) -> None:
    from medsegai_training.export import export_onnx

    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    x = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up_k3")(x)  # needs TF's cropping
    x = keras.layers.Conv2DTranspose(3, 2, strides=2, name="up_k2")(x)  # exact size: Slice/Pad bypassed
    outputs = keras.layers.Activation("softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    changes = export_onnx(model, tmp_path / "m.onnx")
    assert any("up_k2" in c for c in changes) and not any("up_k3" in c for c in changes)
    assert any("Softmax" in c for c in changes)
    _assert_onnx_matches_keras(tmp_path / "m.onnx", model, ct_array)


def test_simplify_splits_a_concat_that_only_feeds_a_conv(tmp_path: Path, ct_array: np.ndarray) -> None:
    from medsegai_training.export import export_onnx

    keras.utils.set_random_seed(4)
    inputs = keras.Input((None, None, 1))
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    b = keras.layers.Conv2D(5, 3, padding="same", activation="relu")(inputs)
    skip = keras.layers.Concatenate(name="skip")([a, b])  # feeds one Conv only: split
    x = keras.layers.Conv2D(6, 3, padding="same", name="after_skip")(skip)
    shared = keras.layers.Concatenate(name="shared")([x, a])  # feeds two layers: kept
    x = keras.layers.Add()([keras.layers.Conv2D(4, 1)(shared), keras.layers.Conv2D(4, 3, padding="same")(shared)])
    outputs = keras.layers.Activation("softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    changes = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert sum("split" in c for c in changes) == 1
    assert sum(node.op_type == "Concat" for node in graph.node) == 1  # "shared" is left as it was
    _assert_onnx_matches_keras(tmp_path / "m.onnx", model, ct_array)
