"""Keras network builders: shapes, dtypes, CBAM serialisation, VGG16 freezing, fine-tune adaptation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from MedSegAILib.core.errors import MedSegAIInputError, ModelFolderError  # noqa: E402
from medsegai_training.export import load_keras_model  # noqa: E402
from medsegai_training.models import (  # noqa: E402
    CBAM,
    DEFAULT_CONFIGS,
    adapt_from_parent,
    build_model,
    divisible_by,
    freeze_encoder,
    resolve_config,
)

TINY = {
    "unet_2d": {"builder": "unet_2d", "base_filters": 4, "depth": 3, "num_classes": 3},
    "unet_3d": {"builder": "unet_3d", "base_filters": 4, "depth": 2, "num_classes": 3},
    "vgg16_unet_2d": {"builder": "vgg16_unet_2d", "depth": 2, "num_classes": 3, "decoder_filters": [8, 8]},
    "dense_unet_2d": {
        "builder": "dense_unet_2d",
        "base_filters": 8,
        "depth": 2,
        "growth_rate": 4,
        "layers_per_block": 2,
        "num_classes": 3,
    },
}


def _input_shape(builder: str, channels: int = 1) -> tuple[int, ...]:
    # non-square, divisible by 2**depth (8 for depth 3), not by 2**(depth+1) on the last axis
    return (2, 16, 64, 40, channels) if builder == "unet_3d" else (2, 64, 40, channels)


@pytest.mark.parametrize("builder", sorted(TINY))
def test_builder_output_shape_dtype_and_softmax(builder: str) -> None:
    model = build_model(TINY[builder])
    assert model.name == builder
    spatial_dims = 3 if builder == "unet_3d" else 2
    assert tuple(model.inputs[0].shape) == (None,) * (spatial_dims + 1) + (1,)
    x = np.random.default_rng(0).normal(size=_input_shape(builder)).astype("float32")
    y = np.asarray(model(x, training=False))
    assert y.shape == x.shape[:-1] + (3,)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(y >= 0)
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    assert [layer.name for layer in model.layers if layer.name.startswith("enc_")], "encoder layers must be enc_*"


def test_other_spatial_sizes_work_and_divisibility() -> None:
    model = build_model(TINY["unet_2d"])
    assert divisible_by(TINY["unet_2d"]) == 8
    for shape in ((1, 24, 8, 1), (3, 96, 128, 1)):
        assert model(np.zeros(shape, "float32")).shape == shape[:-1] + (3,)


def test_options_residual_instance_norm_dropout_multichannel() -> None:
    cfg = dict(TINY["unet_2d"], residual=True, norm="instance", dropout=0.2, in_channels=2, filter_multiplier=1.5)
    model = build_model(cfg)
    names = {layer.name for layer in model.layers}
    assert {"enc_l0_add", "enc_l0_proj", "enc_l0_drop", "bottleneck_add"} <= names
    assert isinstance(model.get_layer("enc_l0_norm1"), keras.layers.GroupNormalization)
    # filters: 4, round(4*1.5)=6, round(4*2.25)=9, bottleneck round(4*3.375)=14
    assert [model.get_layer(f"enc_l{i}_conv1").filters for i in range(3)] == [4, 6, 9]
    assert model.get_layer("bottleneck_conv1").filters == 14
    y = model(np.ones((1, 32, 16, 2), "float32"), training=False)
    assert y.shape == (1, 32, 16, 3)
    none = build_model(dict(TINY["unet_2d"], norm="none"))
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in none.layers)
    assert none.get_layer("enc_l0_conv1").use_bias


def test_mixed_precision_keeps_float32_output() -> None:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model(dict(TINY["unet_2d"], attention="cbam"))
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("head_conv").compute_dtype == "float16"
    y = model(np.random.default_rng(1).normal(size=(1, 32, 24, 1)).astype("float32"), training=False)
    assert keras.backend.standardize_dtype(y.dtype) == "float32"
    assert np.all(np.isfinite(np.asarray(y)))


def test_config_validation_names_the_bad_key() -> None:
    with pytest.raises(ValueError, match="builder"):
        build_model({"builder": "resnet"})
    with pytest.raises(ValueError, match="depthh"):
        build_model({"builder": "unet_2d", "depthh": 3})
    with pytest.raises(ValueError, match="'norm'"):
        build_model({"builder": "unet_2d", "norm": "layer"})
    with pytest.raises(ValueError, match="'num_classes'"):
        build_model({"builder": "unet_2d", "num_classes": 1})
    with pytest.raises(ValueError, match="'depth'"):
        build_model({"builder": "vgg16_unet_2d", "depth": 5})
    with pytest.raises(TypeError):
        build_model(["unet_2d"])  # type: ignore[arg-type]
    full = resolve_config({"builder": "dense_unet_2d"})
    assert set(full) == set(DEFAULT_CONFIGS["dense_unet_2d"])


@pytest.mark.parametrize("builder", ["unet_2d", "unet_3d", "dense_unet_2d"])
def test_cbam_round_trips_through_keras_file_in_safe_mode(builder: str, tmp_path: Path) -> None:
    model = build_model(dict(TINY[builder], attention="cbam", cbam_reduction=2, cbam_kernel_size=3))
    cbams = [layer for layer in model.layers if isinstance(layer, CBAM)]
    assert len(cbams) >= 3
    assert cbams[0].get_config()["reduction_ratio"] == 2
    assert cbams[0].get_config()["spatial_kernel_size"] == 3
    # give the CBAM weights non-default values so a reload that re-initialises them would show
    rng = np.random.default_rng(2)
    for layer in cbams:
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    path = tmp_path / "cbam.keras"
    keras.saving.save_model(model, path)
    reloaded = load_keras_model(path)
    x = rng.normal(size=_input_shape(builder)).astype("float32")
    np.testing.assert_allclose(np.asarray(reloaded(x)), np.asarray(model(x)), atol=1e-6)
    assert sum(isinstance(layer, CBAM) for layer in reloaded.layers) == len(cbams)


def test_cbam_changes_features_and_validates_arguments() -> None:
    layer = CBAM(reduction_ratio=2, spatial_kernel_size=3)
    x = np.random.default_rng(3).normal(size=(2, 8, 6, 4)).astype("float32")
    y = np.asarray(layer(x))
    assert y.shape == x.shape
    assert not np.allclose(y, x)
    # attention maps are in (0, 1): |y| <= |x| everywhere
    assert np.all(np.abs(y) <= np.abs(x) + 1e-6)
    clone = CBAM.from_config(layer.get_config())
    assert clone.reduction_ratio == 2 and clone.spatial_kernel_size == 3
    with pytest.raises(ValueError, match="spatial_kernel_size"):
        CBAM(spatial_kernel_size=4)
    with pytest.raises(ValueError, match="reduction_ratio"):
        CBAM(reduction_ratio=0)


def test_safe_mode_refuses_lambda_layer(tmp_path: Path) -> None:
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.saving.save_model(keras.Model(inputs, outputs), path)
    with pytest.raises(ModelFolderError, match="refused to load") as refused:
        load_keras_model(path)
    # the refusal comes from Keras' safe mode, not from a broken file: the same file loads unsafely
    assert "safe_mode" in str(refused.value.__cause__) and "Lambda" in str(refused.value.__cause__)
    assert isinstance(keras.saving.load_model(path, safe_mode=False, compile=False).layers[-1], keras.layers.Lambda)
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_keras_model(tmp_path / "missing.keras")


def test_vgg16_encoder_frozen_blocks_and_adapter() -> None:
    model = build_model(dict(TINY["vgg16_unet_2d"], frozen_blocks=1, in_channels=2))
    assert model.get_layer("enc_adapter").kernel.shape == (1, 1, 2, 3)
    assert model.get_layer("enc_adapter").trainable
    assert not model.get_layer("enc_block1_conv1").trainable
    assert not model.get_layer("enc_block1_conv2").trainable
    assert model.get_layer("enc_block2_conv1").trainable
    assert model.get_layer("enc_block3_conv3").trainable
    assert model.get_layer("enc_block3_conv3").filters == 256
    frozen = {id(v) for layer in model.layers if not layer.trainable for v in layer.weights}
    assert frozen and not frozen & {id(v) for v in model.trainable_weights}
    with pytest.raises(ValueError):
        model.get_layer("enc_block4_conv1")
    rgb = build_model(dict(TINY["vgg16_unet_2d"], in_channels=3))
    assert "enc_adapter" not in {layer.name for layer in rgb.layers}
    assert rgb.get_layer("enc_block1_conv1").kernel.shape == (3, 3, 3, 64)


def test_vgg16_local_weights_are_loaded_and_downloads_refused(tmp_path: Path) -> None:
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    marker = np.full(vgg.get_layer("block1_conv1").kernel.shape, 0.125, "float32")
    vgg.get_layer("block1_conv1").set_weights([marker, np.zeros(64, "float32")])
    weights = tmp_path / "vgg16_notop.weights.h5"
    vgg.save_weights(weights)
    model = build_model(dict(TINY["vgg16_unet_2d"], encoder_weights=str(weights)))
    np.testing.assert_array_equal(model.get_layer("enc_block1_conv1").get_weights()[0], marker)
    with pytest.raises(MedSegAIInputError, match="download"):
        build_model(dict(TINY["vgg16_unet_2d"], encoder_weights="imagenet"))
    with pytest.raises(MedSegAIInputError, match="does not exist"):
        build_model(dict(TINY["vgg16_unet_2d"], encoder_weights=str(tmp_path / "nope.h5")))


def test_freeze_encoder() -> None:
    model = build_model(TINY["dense_unet_2d"])
    names = freeze_encoder(model)
    assert names and all(n.startswith("enc_") for n in names)
    assert all(not model.get_layer(n).trainable for n in names)
    assert model.get_layer("dec_l0_d1_conv").trainable and model.get_layer("head_conv").trainable
    freeze_encoder(model, trainable=True)
    assert all(model.get_layer(n).trainable for n in names)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="enc_"):
        freeze_encoder(plain)


def test_adapt_from_parent_keeps_shared_label_heads_and_parent_unchanged() -> None:
    keras.utils.set_random_seed(5)
    parent = build_model(dict(TINY["unet_2d"], num_classes=3))  # background, liver, spleen
    rng = np.random.default_rng(5)
    for layer in parent.layers:  # make every weight distinctive
        if layer.weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    parent_before = [w.copy() for w in parent.get_weights()]

    new = build_model(dict(TINY["unet_2d"], num_classes=4))  # background, spleen, kidney, liver
    fresh_head = [w.copy() for w in new.get_layer("head_conv").get_weights()]
    report = adapt_from_parent(
        new,
        parent,
        ["liver", "spleen"],
        [{"name": "spleen", "value": 1}, {"name": "kidney", "value": 2}, {"name": "liver", "value": 3}],
    )
    assert sorted(report["head_copied_labels"]) == ["liver", "spleen"]
    assert report["head_new_labels"] == ["kidney"]
    assert "enc_l0_conv1" in report["copied_layers"] and not report["skipped_layers"]

    pk, pb = parent.get_layer("head_conv").get_weights()
    nk, nb = new.get_layer("head_conv").get_weights()
    for new_ch, parent_ch in ((0, 0), (1, 2), (3, 1)):  # background; spleen 2->1; liver 1->3
        np.testing.assert_array_equal(nk[..., new_ch], pk[..., parent_ch])
        assert nb[new_ch] == pb[parent_ch]
    np.testing.assert_array_equal(nk[..., 2], fresh_head[0][..., 2])  # new label keeps its fresh init
    np.testing.assert_array_equal(
        new.get_layer("dec_l1_conv2").get_weights()[0], parent.get_layer("dec_l1_conv2").get_weights()[0]
    )
    for before, after in zip(parent_before, parent.get_weights()):
        np.testing.assert_array_equal(before, after)

    # a changed input channel count skips only the mismatching first convolution
    wider = build_model(dict(TINY["unet_2d"], num_classes=3, in_channels=2))
    report2 = adapt_from_parent(wider, parent, ["liver", "spleen"], ["liver", "spleen"])
    assert report2["skipped_layers"] == ["enc_l0_conv1"]
    np.testing.assert_array_equal(wider.get_layer("head_conv").get_weights()[0], pk)


def test_adapt_from_parent_rejects_bad_labels() -> None:
    parent = build_model(TINY["unet_2d"])
    new = build_model(TINY["unet_2d"])
    with pytest.raises(ValueError, match="do not fit"):
        adapt_from_parent(new, parent, ["a", "b"], [{"name": "a", "value": 7}])
    with pytest.raises(TypeError):
        adapt_from_parent(new, parent, "a", ["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        adapt_from_parent(new, parent, ["a", "a"], ["a"])


def test_a_model_saved_by_a_newer_keras_is_rebuilt_from_its_card(tmp_path: Path) -> None:
    """Slicer 5.8's Python 3.9 has at most Keras 3.10, which rejects arguments newer Keras writes
    (``HeNormal(input_axes=...)``): the network is rebuilt from model.json and the weights read from the file."""
    import shutil
    import zipfile

    import keras

    from MedSegAILib.model.modelcard import builtin_models_dir

    source = builtin_models_dir() / "mr-brain-tumor"
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(source / "model.json", folder / "model.json")
    with zipfile.ZipFile(source / "model.keras") as original, zipfile.ZipFile(folder / "model.keras", "w") as copy:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename == "config.json":
                config = json.loads(data)
                first = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Conv2D")
                first["config"]["kernel_initializer"]["config"]["argument_from_the_future"] = 1
                data = json.dumps(config).encode()
            copy.writestr(info, data)
    with pytest.raises(Exception):
        keras.saving.load_model(str(folder / "model.keras"), safe_mode=True, compile=False)
    rebuilt = load_keras_model(folder)
    reference = load_keras_model(source)
    batch = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    assert np.allclose(np.asarray(rebuilt(batch, training=False)), np.asarray(reference(batch, training=False)), atol=1e-6)
    (folder / "model.json").unlink()  # without the card there is nothing to rebuild from: one clear error
    with pytest.raises(ModelFolderError, match="refused to load"):
        load_keras_model(folder / "model.keras")
