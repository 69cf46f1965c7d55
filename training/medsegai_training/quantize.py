"""int8 ONNX beside the float model: ONNX Runtime static quantisation, calibrated and validated on real cases.

``medsegai quantize MODEL --data DATASET [--cases N] [--max-dice-drop 0.01]``:

1. the float ``model.onnx`` segments the first ``N`` cases of ``DATASET`` through the engine (same
   preprocessing, sliding window and post-processing as ``medsegai segment``); a spread-out sample
   of the windows it is fed is the calibration set;
2. ONNX Runtime quantises the graph statically (QDQ, weights int8 per output channel,
   activations uint8 with min/max ranges from the calibration windows);
3. the int8 graph segments the same cases; per label, the Dice against the reference is compared
   with the float model's (reference: the dataset's label where the case has it, else the float
   model's own labels, so a label missing from the data still counts);
4. only when no label loses more than ``max_dice_drop`` (default :data:`MAX_INT8_DICE_DROP`, 0.01)
   are ``model.int8.onnx`` and the record ``metrics.int8`` written into the model folder
   (``files.onnx_int8``), each atomically; otherwise nothing is written.

The engine (:mod:`MedSegAILib.model.precision`) uses the int8 file only with a passed record whose
checksums match both ONNX files. No TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from MedSegAILib.core.errors import MedSegAIInputError, ModelFolderError

__all__ = ["MAX_INT8_DICE_DROP", "quantize_model", "softmax_on_the_last_axis"]

MAX_INT8_DICE_DROP = 0.01
CALIBRATION_WINDOWS = 64


class _Timed:
    """Wraps a predictor; adds up the seconds spent in its ``predict``."""

    def __init__(self, predictor: Any) -> None:
        self.predictor, self.seconds = predictor, 0.0
        self.name, self.device = predictor.name, predictor.device

    def predict(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.predictor.predict(batch)
        finally:
            self.seconds += time.perf_counter() - start


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantisation tools log and warn freely; keep the command's output to its own lines."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _quantize_file(source: Path, target: Path, windows: list[np.ndarray], input_name: str, work: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._windows = iter(windows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            window = next(self._windows, None)
            return None if window is None else {input_name: window[None].astype(np.float32)}

    prepared = work / "prepared.onnx"
    with _quiet():
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )
    import onnx

    quantized = onnx.load(str(target))
    if softmax_on_the_last_axis(quantized):
        onnx.checker.check_model(quantized)
        onnx.save(quantized, str(target))


def softmax_on_the_last_axis(model_proto: Any) -> bool:
    """Give a 2D int8 graph's output one ``Softmax`` over its last axis (in place); True when rewritten.

    The export decomposes the channel softmax of an NCHW head (:func:`.export.simplify_onnx`:
    ``ReduceMax``/``Sub``/``Exp``/``ReduceSum``/``Div`` over axis 1, then the ``Transpose`` to
    channels-last that the graph output is). That is the faster form in float, where ONNX Runtime
    keeps the head in NCHW. In the int8 graph ONNX Runtime runs the convolutions channels-last, so
    ``Transpose`` first and ``Softmax(axis=-1)`` after is the same function with contiguous classes
    (measured on the default CT model, 208x256 windows, 2 threads: 2.3 -> 1.4 ms of a 36 ms window;
    probabilities within 2.4e-7, the same labels). Anything else is left as it is.

    Args:
        model_proto: an ``onnx.ModelProto`` written by :func:`.export.simplify_onnx` and quantised.
    """
    from onnx import helper, numpy_helper

    from .export import _consumers, _prune_dead_nodes

    graph = model_proto.graph
    by_name = {node.name: node for node in graph.node}
    consumers = _consumers(graph)
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    for div in list(graph.node):
        if div.op_type != "Div" or not div.name.endswith("/medsegai_softmax/Div"):
            continue
        base = div.name[: -len("/Div")]
        parts = [by_name.get(f"{base}/{part}") for part in ("max", "Sub", "Exp", "sum")]
        users = consumers.get(div.output[0], [])
        if any(part is None for part in parts) or len(users) != 1:
            continue
        transpose = users[0]
        perm = next((list(helper.get_attribute_value(a)) for a in transpose.attribute if a.name == "perm"), None)
        if transpose.op_type != "Transpose" or perm != [0, 2, 3, 1] or transpose.output[0] not in outputs:
            continue
        logits = parts[0].input[0]
        axes = initializers.get(parts[3].input[1]) if len(parts[3].input) > 1 else None  # ReduceSum's axes
        if parts[1].input[0] != logits or axes is None or numpy_helper.to_array(axes).tolist() not in ([1], [-3]):
            continue  # only the channel axis of an NCHW head
        channels_last = f"{base}/channels_last"
        new_nodes = [
            helper.make_node("Transpose", [logits], [channels_last], perm=perm, name=f"{base}/Transpose"),
            helper.make_node("Softmax", [channels_last], [transpose.output[0]], axis=-1, name=f"{base}/Softmax"),
        ]
        gone = {id(node) for node in (*parts, div, transpose)}
        kept = [node for node in graph.node if id(node) not in gone]
        del graph.node[:]
        graph.node.extend(kept + new_nodes)
        _prune_dead_nodes(graph)
        return True
    return False


def _counts(labels: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """(2 * |A and B|, |A| + |B|) of two boolean masks: Dice summed over cases as one pool."""
    return 2 * int(np.count_nonzero(labels & reference)), int(np.count_nonzero(labels)) + int(np.count_nonzero(reference))


def _ratio(pair: list[int]) -> float | None:
    return None if pair[1] == 0 else round(pair[0] / pair[1], 5)


def quantize_model(
    model: str | os.PathLike[str] | None,
    data: str | os.PathLike[str],
    *,
    max_cases: int = 2,
    max_dice_drop: float = MAX_INT8_DICE_DROP,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantise a model folder's ``model.onnx`` to int8, validate it and write it beside the float model.

    Args:
        model: model id or folder (``None``: the default model); it needs ``model.onnx`` and must
            be writable.
        data: dataset folder (the model's channels) whose first ``max_cases`` cases calibrate and
            validate.
        max_cases: cases used (>= 1).
        max_dice_drop: largest Dice loss allowed on any label, in [0, 1).
        progress: called with one line per step.

    Returns:
        The ``metrics.int8`` record written into ``model.json``.

    Raises:
        MedSegAIInputError: bad arguments, missing packages or data, or a label that loses more
            than ``max_dice_drop`` (nothing is written then).
        ModelFolderError: the model folder is unusable or not writable.
    """
    import importlib.util

    from MedSegAILib.model.backends import OnnxPredictor
    from MedSegAILib.data.dataset import load_dataset_for_model, read_case
    from MedSegAILib.inference.segment import SegmentOptions
    from MedSegAILib.model.modelcard import find_model, validate_model_dict
    from MedSegAILib.inference.pipeline import segment_case
    from MedSegAILib.model.precision import INT8_FILE, file_sha256

    from .deploy import _Recorder

    say = progress or (lambda line: None)
    if isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1:
        raise ValueError(f"max_cases must be an integer >= 1, got {max_cases!r}")
    if not 0.0 <= float(max_dice_drop) < 1.0:
        raise ValueError(f"max_dice_drop must be in [0, 1), got {max_dice_drop!r}")
    for package in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(package) is None:
            raise MedSegAIInputError(f"quantising needs the Python package '{package}'; install it (pip install -e .[train]).")
    card = find_model(model)
    float_path = card.weights_path("onnx")
    if float_path is None:
        raise MedSegAIInputError(f"model '{card.id}' has no model.onnx to quantise; export it first (medsegai export --format onnx).")
    if not os.access(card.folder, os.W_OK):
        raise ModelFolderError(f"cannot write into the model folder {card.folder}; copy the model folder somewhere writable.")
    dataset = load_dataset_for_model(data, card, "to calibrate")

    options = SegmentOptions(precision="fp32")
    float_predictor = _Timed(OnnxPredictor(float_path, "cpu"))
    recorder = _Recorder(float_predictor, CALIBRATION_WINDOWS)
    cases = dataset.cases[: max_cases]
    loaded = []
    for case in cases:
        say(f"segmenting {case.id} with the float model")
        images, reference = read_case(dataset, case)
        labels, _ = segment_case(images, card, predictor=recorder, options=options)
        loaded.append((images, np.asarray(reference.array), np.asarray(labels.array)))
    if not recorder.windows:
        raise MedSegAIInputError(f"the cases of {data} gave no non-empty window to calibrate on; give cases with image content.")

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=card.folder) as work_dir:
        work = Path(work_dir)
        target = work / INT8_FILE
        say(f"quantising with {len(recorder.windows)} calibration windows")
        start = time.perf_counter()
        _quantize_file(float_path, target, recorder.windows, "image", work)
        quantize_s = time.perf_counter() - start
        int8_predictor = _Timed(OnnxPredictor(target, "cpu"))
        input_names = [i.name for i in int8_predictor.predictor._session.get_inputs()]
        if input_names != ["image"]:
            raise ModelFolderError(f"the quantised graph has inputs {input_names}, not ['image']; re-export the model.")
        float_predictor.seconds = 0.0
        pools: dict[str, dict[str, list[int]]] = {
            label.name: {"float": [0, 0], "int8": [0, 0], "agreement": [0, 0]} for label in card.labels
        }
        reference_kind: dict[str, str] = {}
        for case, (images, reference, float_labels) in zip(cases, loaded):
            say(f"checking {case.id}")
            # the float model again, alternating with int8, so the two timings share the machine's state
            segment_case(images, card, predictor=float_predictor, options=options)
            labels, _ = segment_case(images, card, predictor=int8_predictor, options=options)
            int8_labels = np.asarray(labels.array)
            for label in card.labels:
                source = dataset.labels.get(label.name)
                has_reference = source is not None and bool(np.any(reference == source))
                truth = reference == source if has_reference else float_labels == label.value
                if has_reference:
                    reference_kind[label.name] = "dataset"
                else:
                    reference_kind.setdefault(label.name, "float model")
                float_mask, int8_mask = float_labels == label.value, int8_labels == label.value
                pool = pools[label.name]
                for key, mask, against in (("float", float_mask, truth), ("int8", int8_mask, truth),
                                           ("agreement", int8_mask, float_mask)):
                    twice, total = _counts(mask, against)
                    pool[key][0] += twice
                    pool[key][1] += total
        per_label: dict[str, dict[str, Any]] = {}
        for name, pool in pools.items():
            dice_float, dice_int8 = _ratio(pool["float"]), _ratio(pool["int8"])
            change = None if dice_float is None or dice_int8 is None else round(dice_int8 - dice_float, 5)
            per_label[name] = {
                "dice_float": dice_float, "dice_int8": dice_int8, "change": change,
                "dice_int8_vs_float": _ratio(pool["agreement"]), "reference": reference_kind.get(name, "float model"),
            }
        changes = {name: row["change"] for name, row in per_label.items() if row["change"] is not None}
        worst = min(changes.values()) if changes else None
        losers = {name: change for name, change in changes.items() if -change > max_dice_drop}
        record: dict[str, Any] = {
            "file": INT8_FILE,
            "passed": bool(changes) and not losers,
            "max_dice_drop": float(max_dice_drop),
            "worst_change": worst,
            "per_label": per_label,
            "cases": [case.id for case in cases],
            "space": "original image grid, model-card post-processing, Dice pooled over the cases",
            "quantization": {
                "tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "weights": "int8, per channel",
                "activations": "uint8, min/max calibration",
                "calibration": f"{len(recorder.windows)} windows the engine fed the float network on the cases",
            },
            "model_seconds": {"fp32": round(float_predictor.seconds, 2), "int8": round(int8_predictor.seconds, 2)},
            "speedup": round(float_predictor.seconds / max(int8_predictor.seconds, 1e-9), 2),
            "quantize_seconds": round(quantize_s, 1),
            "onnxruntime": _version("onnxruntime"),
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        if not changes:
            raise MedSegAIInputError(
                f"cannot validate the int8 model: no label of model '{card.id}' is present in the cases of {data} nor in "
                "the float model's output; give cases that contain the model's structures. Nothing was written."
            )
        if losers:
            listed = ", ".join(f"{name} {change:+.4f}" for name, change in sorted(losers.items()))
            raise MedSegAIInputError(
                f"the int8 model loses more than {max_dice_drop:g} Dice on {listed} ({len(cases)} case(s)); nothing was "
                "written. Keep using the float model (--precision fp32)."
            )
        record["sha256"] = file_sha256(target)
        record["float_sha256"] = file_sha256(float_path)
        card_path = card.folder / "model.json"
        data_json = json.loads(card_path.read_text(encoding="utf-8"))
        data_json.setdefault("files", {})["onnx_int8"] = INT8_FILE
        data_json["metrics"] = {**(data_json.get("metrics") or {}), "int8": record}
        problems = validate_model_dict(data_json)
        if problems:
            raise ModelFolderError("the model card with the int8 record is invalid: " + "; ".join(problems))
        new_card = work / "model.json"
        new_card.write_text(json.dumps(data_json, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.chmod(target, 0o644)
        os.chmod(new_card, 0o644)
        os.replace(target, card.folder / INT8_FILE)
        os.replace(new_card, card_path)
    say(f"wrote {card.folder / INT8_FILE} ({(card.folder / INT8_FILE).stat().st_size / 1e6:.1f} MB) and its record in model.json")
    return record


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
