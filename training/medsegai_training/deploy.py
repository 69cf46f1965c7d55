"""Deployment formats of a model folder: TF Serving SavedModel, TFLite (float32/float16/int8) and ONNX.

``medsegai export MODEL --format savedmodel|tflite|onnx -o OUT --data DATASET [--quantize float16|int8]``
writes a new folder ``OUT`` (``model.json``, ``NOTICE``, ``README.md`` and the exported graph) built
in a hidden temporary sibling and renamed into place only after the check passed:

* the exported graph segments the first cases of ``DATASET`` through the engine (same
  preprocessing, sliding window and post-processing as ``medsegai segment``) and must give the
  Keras model's labels on at least :data:`MIN_AGREEMENT` of the voxels (float formats);
* int8: the calibration windows are the real windows the engine feeds the network on those
  cases; the Dice change against the float model (both against the dataset's reference labels)
  is measured and written into ``model.json`` (``metrics.deployment``); an int8 model whose Dice
  drops by more than :data:`MAX_INT8_DICE_DROP` is refused unless ``force``.

All graphs take one float32 channels-last input ``image`` ``(N, y, x, C)`` (3D: ``(N, z, y, x, C)``)
of normalised intensities and return ``probabilities`` ``(N, ..., K)``, every size but the channels
dynamic. TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from MedSegAILib.core.errors import MedSegAIInputError, ModelFolderError

__all__ = [
    "FORMATS",
    "MAX_INT8_DICE_DROP",
    "MIN_AGREEMENT",
    "QUANTIZATIONS",
    "SAVEDMODEL_VERSION",
    "check_int8",
    "export_deployment",
    "load_savedmodel_predictor",
]

FORMATS = ("savedmodel", "tflite", "onnx")
QUANTIZATIONS = ("float16", "int8")
MIN_AGREEMENT = 0.999
MAX_INT8_DICE_DROP = 0.02
SAVEDMODEL_VERSION = "1"
SIGNATURE_NAME = "serving_default"
_CALIBRATION_WINDOWS = 64
_KERAS_BUILTIN_PREFIXES = ("keras.", "keras")


def _custom_layers(model: Any) -> list[tuple[str, str]]:
    """``(layer name, class name)`` of layers that are not Keras' own (MedSegAI's registered layers)."""
    found = []
    for layer in model.layers:
        module = type(layer).__module__
        if not module.startswith(_KERAS_BUILTIN_PREFIXES) and not module.startswith("tf_keras"):
            found.append((layer.name, type(layer).__name__))
    return found


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _conversion_error(fmt: str, model: Any, error: BaseException) -> MedSegAIInputError:
    custom = _custom_layers(model)
    if custom:
        named = [(name, cls) for name, cls in custom if name in str(error)]
        name, cls = (named or custom)[0]
        return MedSegAIInputError(
            f"the {fmt} format cannot hold layer '{name}' ({cls}, a custom layer) of this model "
            f"({_first_line(error)}); export another format (onnx, savedmodel) or rebuild the model without it."
        )
    return MedSegAIInputError(f"the model cannot be converted to {fmt}: {_first_line(error)}.")


def _spec(model: Any) -> Any:
    import tensorflow as tf

    shape = tuple(model.inputs[0].shape)
    return tf.TensorSpec((None,) * (len(shape) - 1) + (shape[-1],), tf.float32, name="image")


def _signature(model: Any, card: dict[str, Any]) -> dict[str, Any]:
    shape = tuple(model.inputs[0].shape)
    layout = "N, y, x, C" if len(shape) == 4 else "N, z, y, x, C"
    k = int(model.outputs[0].shape[-1])
    return {
        "name": SIGNATURE_NAME,
        "inputs": {"image": {"shape": [None] * (len(shape) - 1) + [int(shape[-1])], "dtype": "float32",
                             "layout": f"{layout}: normalised intensities, channels {', '.join(c['name'] for c in card['channels'])}"}},
        "outputs": {"probabilities": {"shape": [None] * (len(shape) - 1) + [k], "dtype": "float32",
                                      "layout": f"{layout.replace('C', 'K')}: softmax, class index = label value (0 = background)"}},
    }


@contextlib.contextmanager
def _quiet() -> Any:
    """Keep the converters' prints, warnings and native log lines off the CLI's stdout/stderr."""
    from MedSegAILib.model.backends import native_stderr_silenced

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), native_stderr_silenced():
        warnings.simplefilter("ignore")
        yield


def _write_savedmodel(model: Any, folder: Path) -> None:
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SIGNATURE_NAME,
        fn=lambda image: {"probabilities": model(image, training=False)},
        input_signature=[_spec(model)],
    )
    with _quiet():
        archive.write_out(str(folder))


def load_savedmodel_predictor(folder: str | os.PathLike[str]) -> Any:
    """A predictor (``.predict(batch) -> probabilities``) for a SavedModel folder, through ``tf.saved_model.load``."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(folder))
    serve = loaded.signatures[SIGNATURE_NAME]

    class _SavedModelPredictor:
        name, device = "savedmodel", "cpu"

        def predict(self, batch: np.ndarray) -> np.ndarray:
            return np.asarray(serve(image=tf.constant(batch, tf.float32))["probabilities"], np.float32)

    _SavedModelPredictor._keep = loaded  # type: ignore[attr-defined]
    return _SavedModelPredictor()


def _write_tflite(model: Any, path: Path, quantize: str | None, calibration: Sequence[np.ndarray]) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def representative() -> Any:
            for window in calibration:
                yield [window[None].astype(np.float32)]

        converter.representative_dataset = representative
    with _quiet():
        path.write_bytes(converter.convert())


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return None if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def _case_dice(labels: np.ndarray, reference: np.ndarray, pairs: Sequence[tuple[int, int]]) -> float | None:
    values = [_dice(labels == model_value, reference == data_value) for model_value, data_value in pairs]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


class _Recorder:
    """Wraps a predictor: keeps a spread-out sample of the windows it sees (the int8 calibration set)."""

    def __init__(self, predictor: Any, keep: int) -> None:
        self.predictor, self.keep = predictor, keep
        self.windows: list[np.ndarray] = []
        self.seen = 0
        self.name, self.device = predictor.name, predictor.device

    def predict(self, batch: np.ndarray) -> np.ndarray:
        for window in batch:
            self.seen += 1
            if np.any(window != window.flat[0]) and (len(self.windows) < self.keep or self.seen % 3 == 0):
                if len(self.windows) >= self.keep:
                    self.windows.pop(0)
                self.windows.append(np.array(window, dtype=np.float32))
        return self.predictor.predict(batch)


def _exported_predictor(fmt: str, folder: Path, files: dict[str, Any]) -> Any:
    from MedSegAILib.model.backends import OnnxPredictor, TFLitePredictor

    if fmt == "savedmodel":
        return load_savedmodel_predictor(folder / files["savedmodel"])
    if fmt == "tflite":
        return TFLitePredictor(folder / files["tflite"], "cpu")
    return OnnxPredictor(folder / files["onnx"], "cpu")


def _readme(card: dict[str, Any], fmt: str, quantize: str | None, signature: dict[str, Any], check: dict[str, Any],
            shipped: bool) -> str:
    channels = ", ".join(c["name"] for c in card["channels"])
    spatial = card["spatial"]
    lines = [
        f"# {card['name']} ({card['id']} {card['version']}) - {fmt}{' ' + quantize if quantize else ''} export",
        "",
        "Written by `medsegai export`."
        + (" A demonstration model: not a medical device, not for clinical use." if shipped else ""),
        f"Licence: {card.get('license', 'see NOTICE')}",
        "",
        "## Signature",
        "",
        f"- input `image`: float32 {json.dumps(signature['inputs']['image']['shape'])} ({signature['inputs']['image']['layout']})",
        f"- output `probabilities`: float32 {json.dumps(signature['outputs']['probabilities']['shape'])} "
        f"({signature['outputs']['probabilities']['layout']})",
        "",
        "## What the engine does around the network",
        "",
        f"1. Reorient the volume to LPS, resample to {json.dumps(spatial.get('target_spacing'))} mm (x, y, z; null = keep).",
        f"2. Normalise each channel ({channels}) as `model.json` `channels[].normalization` says.",
        f"3. Cut {spatial['mode']} windows of {json.dumps(spatial['patch_size'])} (array order), overlap 0.5, batch them "
        "channels-last: these are the `image` tensors.",
        "4. Blend the `probabilities` of overlapping windows with a Gaussian weight, argmax, resample back "
        "to the input grid, post-process (`model.json` `postprocessing`).",
        "",
        "`medsegai segment --model <this folder>` does all of it"
        + (" with `--backend tflite`." if fmt == "tflite" else "; the model folder it came from holds the Keras/ONNX files."),
        "",
        "## Check against the Keras model",
        "",
        f"Cases: {', '.join(check['cases'])}; labels identical on {100 * check['voxel_agreement']:.3f} % of voxels.",
    ]
    if check.get("dice_change") is not None:
        lines.append(f"Dice against the reference labels: float {check['dice_float']:.4f}, this export "
                     f"{check['dice_export']:.4f} (change {check['dice_change']:+.4f}).")
    if fmt == "savedmodel":
        patch = spatial["patch_size"]
        c = len(card["channels"])
        lines += [
            "",
            "## TF Serving",
            "",
            "```bash",
            f"docker run -p 8501:8501 -v \"$PWD:/models/{card['id']}\" -e MODEL_NAME={card['id']} tensorflow/serving",
            "```",
            "",
            f"REST request for one {patch[0]}x{patch[-1]} window with {c} channel(s) (nested lists, `instances` = batch):",
            "",
            "```bash",
            f"curl -X POST http://localhost:8501/v1/models/{card['id']}:predict \\",
            "     -d '{\"signature_name\": \"serving_default\", \"instances\": [{\"image\": WINDOW}]}'",
            "```",
            "",
            f"`WINDOW` is a {'x'.join(str(p) for p in patch)}x{c} nested list of normalised intensities; the answer is "
            "`{\"predictions\": [PROBABILITIES]}` with one list of K class probabilities per pixel. "
            "In Python: `tf.saved_model.load(\"OUT/1\").signatures[\"serving_default\"](image=batch)[\"probabilities\"]`.",
        ]
    return "\n".join(lines) + "\n"


def export_deployment(
    model: str | os.PathLike[str] | None,
    fmt: str,
    out: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    quantize: str | None = None,
    max_cases: int = 2,
    overwrite: bool = False,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export a model folder to a deployment format and check it (see the module docstring).

    Args:
        model: model id or folder (``None``: the default model); it needs ``model.keras``.
        fmt: ``savedmodel``, ``tflite`` or ``onnx``.
        out: the folder to write.
        data: dataset folder (the model's channels) whose first ``max_cases`` cases check the
            export and calibrate int8.
        quantize: ``None``, ``float16`` or ``int8`` (TFLite only).
        max_cases: cases used for the check (>= 1).
        overwrite: replace an existing ``out`` (only once the new export passed its check).
        force: write an int8 model even when its Dice drops by more than :data:`MAX_INT8_DICE_DROP`.
        progress: called with one line per step.

    Returns:
        The check record written to ``model.json`` ``metrics.deployment``.

    Raises:
        MedSegAIInputError: bad format/quantisation/paths/data, a layer the format cannot hold, a
            failed check; nothing is written then.
        ModelFolderError: the model folder is unusable.
    """
    from MedSegAILib.model.backends import KerasPredictor
    from MedSegAILib.data.dataset import load_dataset_for_model, read_case
    from MedSegAILib.inference.segment import SegmentOptions
    from MedSegAILib.model.modelcard import find_model
    from MedSegAILib.inference.pipeline import segment_case
    from MedSegAILib.report.case_report import is_shipped_model

    say = progress or (lambda line: None)
    if fmt not in FORMATS:
        raise MedSegAIInputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise MedSegAIInputError(f"unknown quantisation {quantize!r}; choose float16 or int8.")
    if quantize is not None and fmt != "tflite":
        raise MedSegAIInputError(f"--quantize is for --format tflite; {fmt} exports are float32.")
    if not isinstance(max_cases, int) or max_cases < 1:
        raise ValueError(f"max_cases must be an integer >= 1, got {max_cases!r}")
    out = Path(out).expanduser()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise MedSegAIInputError(f"{out} already exists; choose another output folder or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise MedSegAIInputError(f"{out} is a file; give a folder name for the export.")
    if not out.parent.is_dir():
        raise MedSegAIInputError(f"the folder of {out} does not exist; create it first.")
    if data is None:
        what = "int8 needs calibration data" if quantize == "int8" else "the export is checked against Keras on real cases"
        raise MedSegAIInputError(
            f"{what}: pass --data DATASET (a dataset folder with the model's channels, e.g. from "
            "training/recipes/build_datasets.py or `medsegai dataset add`)."
        )
    card = find_model(model)
    keras_file = card.weights_path("keras")
    if keras_file is None:
        raise MedSegAIInputError(f"model '{card.id}' has no model.keras to export from; export from the model folder that has it.")
    dataset = load_dataset_for_model(data, card, "to check an export")
    pairs = [(label.value, dataset.labels[label.name]) for label in card.labels if label.name in dataset.labels]

    from MedSegAILib.model.backends import import_tensorflow

    import_tensorflow()
    from medsegai_training.export import export_onnx, load_keras_model, to_float32_model

    keras_model = to_float32_model(load_keras_model(keras_file))
    reference = _Recorder(KerasPredictor(keras_file, "cpu"), _CALIBRATION_WINDOWS)
    options = SegmentOptions()
    cases = dataset.cases[:max_cases]
    keras_labels, references = [], []
    for case in cases:
        say(f"segmenting {case.id} with Keras")
        images, label = read_case(dataset, case)
        result, _ = segment_case(images, card, predictor=reference, options=options)
        keras_labels.append((images, np.asarray(result.array)))
        references.append(np.asarray(label.array))

    new_card = copy.deepcopy(card.to_dict())
    signature = _signature(keras_model, new_card)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        say(f"writing {fmt}{' ' + quantize if quantize else ''}")
        start = time.perf_counter()
        try:
            if fmt == "savedmodel":
                _write_savedmodel(keras_model, tmp / SAVEDMODEL_VERSION)
                files: dict[str, Any] = {"savedmodel": SAVEDMODEL_VERSION}
            elif fmt == "tflite":
                _write_tflite(keras_model, tmp / "model.tflite", quantize, reference.windows)
                files = {"tflite": "model.tflite"}
            else:
                with _quiet():
                    export_onnx(keras_model, tmp / "model.onnx")
                files = {"onnx": "model.onnx"}
        except MedSegAIInputError:
            raise
        except Exception as e:  # converters raise their own error types (ConverterError, ValueError, ...)
            raise _conversion_error(fmt, keras_model, e) from e
        convert_s = time.perf_counter() - start
        files["signature"] = signature

        exported = _exported_predictor(fmt, tmp, files)
        agreement_voxels = total_voxels = 0
        dice_float, dice_export = [], []
        for case, (images, labels_keras), ref in zip(cases, keras_labels, references):
            say(f"checking {case.id}")
            labels, _ = segment_case(images, card, predictor=exported, options=options)
            array = np.asarray(labels.array)
            agreement_voxels += int(np.count_nonzero(array == labels_keras))
            total_voxels += array.size
            float_case, export_case = _case_dice(labels_keras, ref, pairs), _case_dice(array, ref, pairs)
            if float_case is not None and export_case is not None:
                dice_float.append(float_case)
                dice_export.append(export_case)
        agreement = agreement_voxels / max(1, total_voxels)
        check: dict[str, Any] = {
            "format": fmt, "quantize": quantize or "float32",
            "cases": [case.id for case in cases],
            "labels_compared": [label.name for label in card.labels if label.name in dataset.labels],
            "voxel_agreement": round(agreement, 6),
            "dice_float": round(float(np.mean(dice_float)), 4) if dice_float else None,
            "dice_export": round(float(np.mean(dice_export)), 4) if dice_export else None,
            "convert_seconds": round(convert_s, 1),
            "exported": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        check["dice_change"] = (round(check["dice_export"] - check["dice_float"], 4)
                                if dice_float else None)
        if quantize == "int8":
            check["calibration"] = f"{len(reference.windows)} windows the engine fed the network on the check cases"
            check_int8(check, force)
        elif agreement < MIN_AGREEMENT:
            raise MedSegAIInputError(
                f"the {fmt} export gives the Keras labels on only {100 * agreement:.3f} % of voxels "
                f"(< {100 * MIN_AGREEMENT:.1f} %); nothing was written."
            )
        say(f"labels identical to Keras on {100 * agreement:.3f} % of voxels")

        new_card["files"] = files
        metrics = dict(new_card.get("metrics") or {})
        metrics.pop("int8", None)  # the source folder's int8 file is not part of the export
        metrics["deployment"] = check
        new_card["metrics"] = metrics
        from medsegai_training.export import _validate_card

        problems = _validate_card(new_card)
        if problems:
            raise ModelFolderError("the exported model card is invalid: " + "; ".join(problems))
        notice = card.folder / "NOTICE"
        if notice.is_file():
            shutil.copy2(notice, tmp / "NOTICE")
        readme = _readme(new_card, fmt, quantize, signature, check, is_shipped_model(card))
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        with open(tmp / "model.json", "w", encoding="utf-8") as handle:
            json.dump(new_card, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return check


def check_int8(check: dict[str, Any], force: bool = False) -> None:
    """Refuse an int8 export whose Dice dropped by more than :data:`MAX_INT8_DICE_DROP` (or could not be measured).

    Args:
        check: the check record (``dice_float``, ``dice_export``, ``dice_change``, ``cases``).
        force: accept it anyway.

    Raises:
        MedSegAIInputError: the drop is too large, or no label of the model is in the check data,
            and ``force`` is false.
    """
    if force:
        return
    if check.get("dice_change") is None:
        raise MedSegAIInputError(
            "cannot measure the int8 model's Dice change: the --data cases have none of the model's labels; "
            "give a dataset with them, or pass --force to write it unmeasured."
        )
    drop = -float(check["dice_change"])
    if drop > MAX_INT8_DICE_DROP:
        raise MedSegAIInputError(
            f"the int8 model's Dice drops by {drop:.4f} (float {check['dice_float']:.4f} -> int8 "
            f"{check['dice_export']:.4f} on {len(check['cases'])} case(s)), more than {MAX_INT8_DICE_DROP}; nothing was "
            "written. Use --quantize float16, or pass --force to write it anyway."
        )


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (``overwrite``) is moved aside first and removed after."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise MedSegAIInputError(f"{out} appeared while exporting; choose another output folder (nothing was overwritten).")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, out)
