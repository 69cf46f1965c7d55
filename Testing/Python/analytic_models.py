"""Model folders whose network is analytic: fixed weights with a known answer.

``threshold_model_folder`` writes a 1x1(x1) convolution + softmax that labels voxels above a
Hounsfield threshold as "bone": class-1 logit ``k * (x - threshold)``, class-0 logit 0. With
``normalization: none`` and no resampling, its segmentation must equal ``array > threshold`` voxel
for voxel. Both ``model.keras`` (Keras functional model) and ``model.onnx`` (built with
``onnx.helper``) are written, so both backends can be checked against numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

THRESHOLD_HU = 300.5
SLOPE = 20.0


def _card(
    model_id: str, mode: str, patch: list[int], target_spacing: list[float | None], files: dict, channels: list[str]
) -> dict:
    return {
        "schema_version": 1,
        "id": model_id,
        "name": f"Analytic bone threshold ({mode})",
        "version": "1.0.0",
        "description": f"Test model: voxels above {THRESHOLD_HU} HU are bone (a fixed 1x1 convolution).",
        "license": "Apache-2.0",
        "channels": [{"name": name, "modality": "CT", "normalization": {"method": "none"}} for name in channels],
        "labels": [
            {
                "name": "bone",
                "value": 1,
                "color": [0.945, 0.839, 0.569],
                "terminology": {
                    "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
                    "type": {"scheme": "SCT", "code": "272673000", "meaning": "Bone"},
                },
            }
        ],
        "spatial": {
            "mode": mode,
            "axis": "axial",
            "orientation": "LPS",
            "patch_size": patch,
            "target_spacing": target_spacing,
            "divisible_by": 1,
            "batch_size": 4,
        },
        "postprocessing": {"method": "argmax", "largest_component": False, "fill_holes": False, "min_island_mm3": 0},
        "files": files,
        "provenance": {"kind": "analytic", "threshold_hu": THRESHOLD_HU},
    }


def _keras_model(mode: str, num_channels: int):
    import keras

    spatial = (None, None) if mode == "2d" else (None, None, None)
    inputs = keras.Input(shape=(*spatial, num_channels), name="image")
    conv_class = keras.layers.Conv2D if mode == "2d" else keras.layers.Conv3D
    conv = conv_class(2, 1, name="threshold")
    logits = conv(inputs)
    kernel = np.zeros(conv.kernel.shape, dtype="float32")
    kernel[..., 0, 1] = SLOPE
    conv.set_weights([kernel, np.array([0.0, -SLOPE * THRESHOLD_HU], dtype="float32")])
    outputs = keras.layers.Softmax(axis=-1, name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=f"analytic_threshold_{mode}")


def _onnx_model(mode: str, num_channels: int):
    import onnx
    from onnx import TensorProto, helper

    spatial = ["y", "x"] if mode == "2d" else ["z", "y", "x"]
    rank = len(spatial) + 2
    channels_first = [0, rank - 1, *range(1, rank - 1)]
    channels_last = [0, *range(2, rank), 1]
    weight = np.zeros((2, num_channels) + (1,) * len(spatial), dtype=np.float32)
    weight[1, 0] = SLOPE
    bias = np.array([0.0, -SLOPE * THRESHOLD_HU], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["image"], ["image_cf"], perm=channels_first),
            helper.make_node("Conv", ["image_cf", "weight", "bias"], ["logits_cf"]),
            helper.make_node("Transpose", ["logits_cf"], ["logits"], perm=channels_last),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        f"analytic_threshold_{mode}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", *spatial, num_channels])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", *spatial, 2])],
        [helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.ravel()),
         helper.make_tensor("bias", TensorProto.FLOAT, bias.shape, bias)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def threshold_model_folder(
    folder: Path,
    mode: str = "2d",
    patch: list[int] | None = None,
    target_spacing: list[float | None] | None = None,
    backends: tuple[str, ...] = ("keras", "onnx"),
    model_id: str | None = None,
    channels: tuple[str, ...] = ("CT",),
) -> Path:
    """Write an analytic threshold model folder and return it.

    With several ``channels`` only the first one is thresholded; the others are ignored.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    patch = patch or ([64, 64] if mode == "2d" else [16, 48, 48])
    files = {}
    if "keras" in backends:
        _keras_model(mode, len(channels)).save(folder / "model.keras")
        files["keras"] = "model.keras"
    if "onnx" in backends:
        import onnx

        onnx.save(_onnx_model(mode, len(channels)), str(folder / "model.onnx"))
        files["onnx"] = "model.onnx"
    card = _card(model_id or f"analytic-bone-{mode}", mode, patch, target_spacing or [None, None, None], files, list(channels))
    (folder / "model.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    return folder


def lambda_model_folder(folder: Path) -> Path:
    """A model folder whose ``model.keras`` contains a Lambda layer (must be refused)."""
    import keras

    folder = threshold_model_folder(folder, backends=("keras",), model_id="lambda-model")
    inputs = keras.Input(shape=(None, None, 1))
    outputs = keras.layers.Lambda(lambda x: keras.ops.concatenate([x * 0.0, x * 0.0 + 1.0], axis=-1))(inputs)
    keras.Model(inputs, outputs).save(folder / "model.keras")
    return folder
