"""Write a trained Keras model as a MedSegAI model folder (``model.keras``, ``model.onnx``, ``model.json``).

The folder is assembled in a hidden temporary sibling folder and renamed into place at the end, so
a reader never sees a half-written model and an existing folder is never touched. ``model.json``
is written last. Both weight files are checked before anything is published:

* ``model.keras`` is reloaded with ``safe_mode=True`` and must reproduce the model's output;
* ``model.onnx`` (tf2onnx, opset :data:`ONNX_OPSET`, dynamic batch and spatial axes, input
  ``image``, output ``probabilities``) must agree with Keras on a real batch in what decides the
  result: the probabilities within :data:`ONNX_TOLERANCE` (max absolute difference) and the labels
  (argmax) on at least :data:`ONNX_LABEL_AGREEMENT` of the voxels; both figures are recorded in
  ``card["provenance"]`` (``onnx_max_abs_diff``, ``onnx_label_agreement``). When they do not
  agree, the folder is written without ``model.onnx`` (``--backend auto`` then uses TensorFlow)
  unless ``onnx="require"``, and ``card["provenance"]["onnx_skipped"]`` says why.

Exported models are always float32: a model trained under a ``mixed_float16`` policy is rebuilt in
float32 with the same weights before saving (CPU inference and ONNX need float32).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from MedSegAILib.core.errors import MedSegAIInputError, ModelFolderError
from MedSegAILib.model.keras_model import register_custom_objects

__all__ = [
    "KERAS_FILE",
    "MODEL_JSON",
    "ONNX_FILE",
    "ONNX_LABEL_AGREEMENT",
    "ONNX_OPSET",
    "ONNX_TOLERANCE",
    "onnx_agreement",
    "export_model_folder",
    "export_onnx",
    "load_keras_model",
    "simplify_onnx",
    "to_float32_model",
]

KERAS_FILE = "model.keras"
ONNX_FILE = "model.onnx"
MODEL_JSON = "model.json"
ONNX_OPSET = 17
# What the ONNX graph must reproduce (measured with benchmarks/bench_onnx_agreement.py, see
# benchmarks/RESULTS.md "ONNX export check"): float32 graphs of the same network differ in the
# operations' summation order; on every window the engine makes for the five brain studies the
# shipped mr-brain-tumor 1.2.0 differs by up to 7.0e-3 in a probability (99.99th percentile 1.4e-3,
# instance normalisation over near-constant background) while not one of its 6.2 million voxel
# labels changes. The check therefore bounds the probabilities at 1e-2 and asks for the same label
# on 99.99% of the sample voxels; a converter that really gets an operation wrong fails both.
ONNX_TOLERANCE = 1e-2
ONNX_LABEL_AGREEMENT = 0.9999
_KERAS_RELOAD_TOLERANCE = 1e-5
_MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """Load ``model.keras`` (or a model folder holding one) with ``safe_mode=True``, uncompiled.

    The engine's loader (:func:`MedSegAILib.model.keras_model.load_keras_model`): MedSegAI's custom
    layers/losses registered, and a file saved by a newer Keras rebuilt from its ``model.json``.

    Raises:
        ModelFolderError: the file is missing, unreadable or unsafe.
    """
    from MedSegAILib.model.keras_model import load_keras_model as load

    return load(path)


def _replace_policies(obj: Any) -> Any:
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and isinstance(obj.get("config"), dict):
            if obj["config"].get("name") in _MIXED_POLICIES:
                return {**obj, "config": {**obj["config"], "name": "float32"}}
        return {k: _replace_policies(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_policies(v) for v in obj]
    if isinstance(obj, str) and obj in _MIXED_POLICIES:
        return "float32"
    return obj


def to_float32_model(model: Any) -> Any:
    """Return ``model`` itself if every layer computes in float32, else a float32 copy with its weights.

    Args:
        model: a functional ``keras.Model`` (possibly built under ``mixed_float16``).
    """
    import keras

    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    register_custom_objects()
    config = _replace_policies(keras.saving.serialize_keras_object(model))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        clone = keras.saving.deserialize_keras_object(config, safe_mode=True)
    finally:
        keras.config.set_dtype_policy(previous)
    clone.set_weights(model.get_weights())
    return clone


def export_onnx(model: Any, path: str | os.PathLike[str], opset: int = ONNX_OPSET, simplify: bool = True) -> list[str]:
    """Convert a channels-last Keras model to ONNX with tf2onnx (dynamic batch and spatial axes).

    The graph has one float32 input ``image`` ``(N, *spatial, C)`` and one output ``probabilities``
    ``(N, *spatial, K)``, every dimension but the channels dynamic.

    Args:
        model: a float32 ``keras.Model`` with one input.
        path: output ``.onnx`` file.
        opset: ONNX opset (>= 13).
        simplify: apply :func:`simplify_onnx` (faster on ONNX Runtime CPU).

    Returns:
        The changes :func:`simplify_onnx` made (empty when ``simplify`` is false).
    """
    import onnx as onnx_lib
    import tensorflow as tf
    import tf2onnx

    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an integer >= 13, got {opset!r}")
    if len(model.inputs) != 1:
        raise ValueError(f"model must have exactly one input, got {len(model.inputs)}")
    shape = tuple(model.inputs[0].shape)
    spec = (tf.TensorSpec((None,) * (len(shape) - 1) + (shape[-1],), tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def forward(image: Any) -> dict[str, Any]:
        return {"probabilities": tf.cast(model(image, training=False), tf.float32)}

    try:  # keras' numpy>=2 compatibility patch for tf2onnx's constant folding, when present
        from keras.src.export.tf2onnx_lib import patch_tf2onnx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            patch_tf2onnx()
    except ImportError:
        pass
    model_proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=opset)
    changes = simplify_onnx(model_proto) if simplify else []
    onnx_lib.checker.check_model(model_proto)
    onnx_lib.save(model_proto, str(path))
    return changes


def _opset(model_proto: Any) -> int:
    return max((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def simplify_onnx(model_proto: Any) -> list[str]:
    """Rewrite three slow patterns tf2onnx produces for MedSegAI's networks (in place).

    * ``Softmax`` over the channel axis of an NCHW tensor: ONNX Runtime transposes it twice
      internally (about 8% of a U-Net's CPU time); it becomes ``ReduceMax``/``Sub``/``Exp``/
      ``ReduceSum``/``Div`` over that axis (same values up to float rounding).
    * ``ConvTranspose`` with ``kernel_shape == strides`` and no padding, followed by the
      ``Slice`` -> ``Pad`` pair tf2onnx adds to reach TensorFlow's dynamic output shape: that
      shape is exactly ``stride * input`` already, so the pair is an identity copy and is bypassed.
    * ``Concat`` over the channels of 2D feature maps feeding only a ``Conv`` (a U-Net's skip
      connection): ONNX Runtime runs that ``Concat`` outside its blocked NCHWc layout, with
      reorders in and out (about 12% of a 2D U-Net's CPU time). ``Conv(Concat(a, b))`` becomes
      ``Conv(a, W[:, :Ca]) + Conv(b, W[:, Ca:])`` (the weights split along their input channels;
      the bias on the last part): the same sum of products, up to float rounding.

    The caller must still check the result against Keras (``export_model_folder`` does).

    Args:
        model_proto: an ``onnx.ModelProto`` (modified in place).

    Returns:
        A description of each change made.
    """
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    opset = _opset(model_proto)
    changes: list[str] = []
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}

    def attrs(node: Any) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    # 1. bypass Slice -> Pad after an exact-size ConvTranspose
    rename: dict[str, str] = {}
    removed: set[str] = set()  # first outputs of the Slice/Pad nodes to drop
    for node in graph.node:
        if node.op_type != "ConvTranspose":
            continue
        a = attrs(node)
        kernel, strides = list(a.get("kernel_shape", [])), list(a.get("strides", []))
        if (
            not kernel
            or kernel != strides
            or any(key in a for key in ("pads", "output_padding", "output_shape", "auto_pad"))
            or any(d != 1 for d in a.get("dilations", [1]))
        ):
            continue
        out = node.output[0]
        slices = [n for n in consumers.get(out, []) if n.op_type != "Shape"]  # Shape: pad arithmetic
        if len(slices) != 1 or slices[0].op_type != "Slice" or slices[0].input[0] != out:
            continue
        pads = consumers.get(slices[0].output[0], [])
        if len(pads) != 1 or pads[0].op_type != "Pad" or pads[0].input[0] != slices[0].output[0]:
            continue
        if pads[0].output[0] in graph_outputs or (len(pads[0].input) > 2 and pads[0].input[2]):
            continue
        rename[pads[0].output[0]] = out
        removed.update((slices[0].output[0], pads[0].output[0]))
        changes.append(f"bypassed identity Slice/Pad after {node.name}")

    # 2. split Concat -> Conv (found before any rewrite; rewritten in the loop below)
    initializers: list[Any] = []
    split_convs = _concat_conv_splits(model_proto, consumers, graph_outputs, rename)
    for conv_output, (concat, _, _) in split_convs.items():
        removed.add(concat.output[0])
        changes.append(f"split {concat.name} -> Conv {conv_output} into one Conv per input and Add")

    # 3. decompose Softmax
    new_nodes: list[Any] = []
    for node in graph.node:
        if node.output and node.output[0] in removed:
            continue
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type == "Conv" and node.output[0] in split_convs:
            new_nodes += _split_conv(node, *split_convs[node.output[0]], initializers, rename)
            continue
        if node.op_type != "Softmax" or opset < 13:
            new_nodes.append(node)
            continue
        axis = int(attrs(node).get("axis", -1))
        x, y = node.input[0], node.output[0]
        base = f"{node.name}/medsegai_softmax"
        axes_name = f"{base}/axes"
        initializers.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), axes_name))
        if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
            reduce_max = helper.make_node("ReduceMax", [x, axes_name], [f"{base}/max"], keepdims=1, name=f"{base}/max")
        else:
            reduce_max = helper.make_node(
                "ReduceMax", [x], [f"{base}/max"], axes=[axis], keepdims=1, name=f"{base}/max"
            )
        new_nodes += [
            reduce_max,
            helper.make_node("Sub", [x, f"{base}/max"], [f"{base}/shifted"], name=f"{base}/Sub"),
            helper.make_node("Exp", [f"{base}/shifted"], [f"{base}/exp"], name=f"{base}/Exp"),
            helper.make_node("ReduceSum", [f"{base}/exp", axes_name], [f"{base}/sum"], keepdims=1, name=f"{base}/sum"),
            helper.make_node("Div", [f"{base}/exp", f"{base}/sum"], [y], name=f"{base}/Div"),
        ]
        changes.append(f"decomposed {node.name} (axis {axis})")
    if changes:
        del graph.node[:]
        graph.node.extend(new_nodes)
        graph.initializer.extend(initializers)
        _prune_dead_nodes(graph)
    return changes


def _concat_conv_splits(model_proto: Any, consumers: dict[str, list[Any]], graph_outputs: set[str],
                        rename: dict[str, str]) -> dict[str, tuple[Any, list[int], Any]]:
    """For rule 2 of simplify_onnx: Conv output name -> (its input Concat, the channels of each
    Concat input, the Conv's weight initializer).

    ``rename`` maps the outputs rule 1 bypasses to the tensors that replace them.
    """
    from onnx import helper, shape_inference

    inferred = shape_inference.infer_shapes(model_proto).graph
    shapes: dict[str, Any] = {}
    for info in [*inferred.value_info, *inferred.input, *inferred.output]:
        shapes[info.name] = info.type.tensor_type.shape.dim
    weights = {t.name: t for t in model_proto.graph.initializer}
    found: dict[str, tuple[Any, list[int], Any]] = {}
    for concat in model_proto.graph.node:
        if concat.op_type != "Concat" or len(concat.input) < 2 or concat.output[0] in graph_outputs:
            continue
        users = consumers.get(concat.output[0], [])
        axis = next((helper.get_attribute_value(a) for a in concat.attribute if a.name == "axis"), None)
        if axis != 1 or len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != concat.output[0]:
            continue
        conv = users[0]
        group = next((helper.get_attribute_value(a) for a in conv.attribute if a.name == "group"), 1)
        weight = weights.get(conv.input[1])
        if group != 1 or weight is None or len(weight.dims) != 4:  # 2D only: NCHWc is a 2D layout
            continue
        sizes = []
        for name in concat.input:
            dims = shapes.get(rename.get(name, name))
            if dims is None or len(dims) != 4 or not dims[1].HasField("dim_value"):
                break
            sizes.append(int(dims[1].dim_value))
        if len(sizes) == len(concat.input) and sum(sizes) == weight.dims[1]:
            found[conv.output[0]] = (concat, sizes, weight)
    return found


def _split_conv(conv: Any, concat: Any, sizes: list[int], weight: Any, initializers: list[Any],
                rename: dict[str, str]) -> list[Any]:
    """``Conv(Concat(x_1..x_n))`` as ``Conv(x_1, W_1) + ... + Conv(x_n, W_n, bias)``: the new nodes."""
    from onnx import helper, numpy_helper

    parts = np.split(numpy_helper.to_array(weight), np.cumsum(sizes)[:-1], axis=1)
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    nodes, outputs = [], []
    sources = [rename.get(name, name) for name in concat.input]
    for k, (source, part) in enumerate(zip(sources, parts)):
        base = f"{conv.output[0]}/medsegai_split{k}"
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(part), f"{base}/W"))
        inputs = [source, f"{base}/W"] + ([conv.input[2]] if has_bias and k == len(parts) - 1 else [])
        node = helper.make_node("Conv", inputs, [f"{base}/y"], name=base)
        node.attribute.extend(conv.attribute)
        nodes.append(node)
        outputs.append(f"{base}/y")
    total = outputs[0]
    for k, part_output in enumerate(outputs[1:], start=1):
        result = conv.output[0] if k == len(outputs) - 1 else f"{conv.output[0]}/medsegai_sum{k}"
        nodes.append(helper.make_node("Add", [total, part_output], [result], name=f"{conv.output[0]}/medsegai_add{k}"))
        total = result
    return nodes


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes of ``graph`` that read it."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _prune_dead_nodes(graph: Any) -> None:
    """Drop nodes (and initializers) whose outputs nothing uses any more (e.g. shape arithmetic)."""
    while True:
        used = {o.name for o in graph.output}
        for node in graph.node:
            used.update(node.input)
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input}
    keep_init = [t for t in graph.initializer if t.name in used]
    if len(keep_init) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep_init)


def _keras_predict(model: Any, batch: np.ndarray, chunk: int = 8) -> np.ndarray:
    """Eager inference in chunks (no tf.function tracing for a one-off check)."""
    outputs = [np.asarray(model(batch[i : i + chunk], training=False), np.float32) for i in range(0, len(batch), chunk)]
    return np.concatenate(outputs, axis=0)


def _onnx_predict(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: batch})[0], dtype=np.float32)


def onnx_agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """How far two probability arrays ``(N, *spatial, K)`` (channels-last) are apart.

    Returns:
        ``(max |difference|, share of voxels whose argmax label is the same)``.
    """
    reference = np.asarray(reference, dtype=np.float32)
    candidate = np.asarray(candidate, dtype=np.float32)
    if reference.shape != candidate.shape or reference.ndim < 2:
        raise ValueError(f"probability arrays must have one shape (N, ..., K), got {reference.shape} and {candidate.shape}")
    if not np.all(np.isfinite(candidate)):
        return float("inf"), float(np.mean(np.argmax(reference, -1) == np.argmax(np.nan_to_num(candidate), -1)))
    diff = float(np.max(np.abs(candidate - reference)))
    same = float(np.mean(np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)))
    return diff, same


def _validate_card(card: Mapping[str, Any]) -> list[str]:
    from MedSegAILib.model.modelcard import validate_model_dict

    return list(validate_model_dict(card))


def _check_sample_batch(model: Any, sample_batch: Any) -> np.ndarray:
    if not isinstance(sample_batch, np.ndarray):
        raise TypeError(f"sample_batch must be a numpy array, got {type(sample_batch).__name__}")
    shape = tuple(model.inputs[0].shape)
    if sample_batch.ndim != len(shape):
        raise ValueError(
            f"sample_batch must have {len(shape)} dimensions (N, ..., C) for this model, got shape {sample_batch.shape}"
        )
    if sample_batch.shape[-1] != shape[-1]:
        raise ValueError(f"sample_batch has {sample_batch.shape[-1]} channels but the model expects {shape[-1]}")
    if sample_batch.shape[0] < 1 or sample_batch.size == 0:
        raise ValueError(f"sample_batch is empty: shape {sample_batch.shape}")
    if not np.issubdtype(sample_batch.dtype, np.number) or not np.all(np.isfinite(sample_batch)):
        raise ValueError("sample_batch must be finite numbers")
    return np.ascontiguousarray(sample_batch, dtype=np.float32)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def _copy_extra(tmp: Path, extra_files: Mapping[str, Any]) -> list[str]:
    reserved = {KERAS_FILE, ONNX_FILE, MODEL_JSON}
    names = []
    for name, content in extra_files.items():
        plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        if not plain or name in reserved:
            raise ValueError(f"extra_files key {name!r} must be a plain file name other than {sorted(reserved)}")
        target = tmp / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        elif isinstance(content, str):
            target.write_text(content, encoding="utf-8")
        elif isinstance(content, os.PathLike):
            src = Path(content)
            if src.is_dir():
                shutil.copytree(src, target)
            elif src.is_file():
                shutil.copy2(src, target)
            else:
                raise MedSegAIInputError(f"extra file {src} does not exist; check the path given for {name!r}.")
        else:
            raise TypeError(f"extra_files[{name!r}] must be bytes, str (text) or a Path, got {type(content).__name__}")
        names.append(name)
    return names


def export_model_folder(
    model: Any,
    card: dict[str, Any],
    out_dir: str | os.PathLike[str],
    sample_batch: np.ndarray,
    onnx: bool | str = True,
    extra_files: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its card as a new model folder ``out_dir``.

    Writes ``model.keras`` (float32, uncompiled), ``model.onnx`` when ``onnx`` is true, any
    ``extra_files`` (e.g. ``NOTICE``, ``history.csv``) and, last, ``model.json``, into a temporary
    sibling folder renamed to ``out_dir`` at the end. ``card`` is completed in place on success:
    ``card["files"]`` and ``card["provenance"]`` (``onnx_max_abs_diff``, ``onnx_label_agreement``,
    ``keras_max_abs_diff``, ``onnx_opset``, ``exported`` UTC time, package ``versions``; and
    ``onnx_skipped`` — why there is no ``model.onnx`` — when the ONNX graph did not agree).

    Args:
        model: trained ``keras.Model`` with one channels-last input; its output must be softmax
            probabilities ``(N, *spatial, K)``.
        card: the ``model.json`` content (everything but ``files`` filled by the caller).
        out_dir: the model folder to create; must not exist.
        sample_batch: a *real* input batch, float, channels-last ``(N, y, x, C)`` or
            ``(N, z, y, x, C)``, spatial sizes divisible by the network's ``2**depth``.
        onnx: ``True``: also write ``model.onnx`` when it agrees with Keras (max |Δp| ≤
            :data:`ONNX_TOLERANCE`, labels identical on ≥ :data:`ONNX_LABEL_AGREEMENT` of the
            sample voxels), else write the folder with ``model.keras`` only and record why in
            ``provenance.onnx_skipped``; ``"require"``: raise instead; ``False``: no ONNX.
        extra_files: file name -> ``bytes``/``str`` content or a ``Path`` (file or folder) to copy.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        MedSegAIInputError: ``out_dir`` already exists.
        ModelFolderError: the completed card does not validate against ``model.schema.json``.
        RuntimeError: the reloaded Keras file does not reproduce the model, or (``onnx="require"``)
            the ONNX graph does not.
        TypeError/ValueError: bad arguments.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    if not isinstance(card, dict):
        raise TypeError(f"card must be a dict (the model.json content), got {type(card).__name__}")
    if not (isinstance(onnx, bool) or onnx == "require"):
        raise TypeError(f"onnx must be True, False or 'require', got {onnx!r}")
    if extra_files is not None and not isinstance(extra_files, Mapping):
        raise TypeError(f"extra_files must be a mapping or None, got {type(extra_files).__name__}")
    batch = _check_sample_batch(model, sample_batch)
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise MedSegAIInputError(
            f"model folder {out_dir} already exists; choose a new output folder (nothing is overwritten)."
        )

    files = {"keras": KERAS_FILE, **({"onnx": ONNX_FILE} if onnx else {})}
    new_card = copy.deepcopy(card)
    new_card["files"] = files
    problems = _validate_card(new_card)
    if problems:
        raise ModelFolderError("the model card is invalid: " + "; ".join(problems))
    k_card = max(label["value"] for label in new_card["labels"]) + 1
    k_model = model.outputs[0].shape[-1]
    if k_model != k_card:
        raise ValueError(f"model predicts {k_model} classes but the card's labels need {k_card} (background + labels)")

    register_custom_objects()
    export = to_float32_model(model)
    reference = _keras_predict(export, batch)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the user's usual mode
        keras.saving.save_model(export, tmp / KERAS_FILE)
        reloaded = load_keras_model(tmp / KERAS_FILE)
        keras_diff = float(np.max(np.abs(_keras_predict(reloaded, batch) - reference)))
        if not keras_diff <= _KERAS_RELOAD_TOLERANCE:
            raise RuntimeError(f"reloaded {KERAS_FILE} differs from the trained model by {keras_diff:.3g}")
        provenance = dict(new_card.get("provenance") or {})
        provenance["keras_max_abs_diff"] = keras_diff
        if onnx:
            simplified = export_onnx(export, tmp / ONNX_FILE)
            onnx_diff, onnx_same = onnx_agreement(reference, _onnx_predict(tmp / ONNX_FILE, batch))
            provenance["onnx_max_abs_diff"] = onnx_diff if np.isfinite(onnx_diff) else None
            provenance["onnx_label_agreement"] = onnx_same
            if not (onnx_diff <= ONNX_TOLERANCE and onnx_same >= ONNX_LABEL_AGREEMENT):
                reason = (
                    f"ONNX and Keras disagree on the sample batch (max probability difference {onnx_diff:.3g}, "
                    f"limit {ONNX_TOLERANCE:g}; same label on {100 * onnx_same:.3f}% of the voxels, "
                    f"limit {100 * ONNX_LABEL_AGREEMENT:g}%)"
                )
                if onnx == "require":
                    raise RuntimeError(reason + "; export without ONNX (medsegai train --no-onnx)")
                (tmp / ONNX_FILE).unlink()
                new_card["files"] = {"keras": KERAS_FILE}
                provenance["onnx_skipped"] = reason + "; only model.keras was written (the TensorFlow backend runs it)"
            else:
                provenance["onnx_opset"] = ONNX_OPSET
                provenance["onnx_simplified"] = len(simplified)
        provenance["exported"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        provenance["versions"] = _versions()
        new_card["provenance"] = provenance
        if extra_files:
            _copy_extra(tmp, extra_files)
        problems = _validate_card(new_card)
        if problems:
            raise ModelFolderError("the model card is invalid: " + "; ".join(problems))
        with open(tmp / MODEL_JSON, "w", encoding="utf-8") as f:
            json.dump(new_card, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if out_dir.exists() or out_dir.is_symlink():
            raise MedSegAIInputError(
                f"model folder {out_dir} appeared while exporting; choose a new output folder (nothing is overwritten)."
            )
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    card.clear()
    card.update(new_card)
    return out_dir
