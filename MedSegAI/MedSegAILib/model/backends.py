"""Inference backends: ONNX Runtime, TensorFlow/Keras and TFLite behind one ``predict`` call.

Both take a float32 channels-last batch — 2D ``(N, y, x, C)`` or 3D ``(N, z, y, x, C)`` — and return
float32 softmax probabilities ``(N, ..., K)``. The heavy packages are imported only when a
predictor is created.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Any, Iterator, Protocol

import numpy as np

from ..core.errors import MedSegAIInputError, ModelFolderError
from .modelcard import ModelCard
from ..core.threads import thread_count

__all__ = ["BACKENDS", "DEVICES", "Predictor", "TFLitePredictor", "available_backends", "import_tensorflow", "load_predictor"]

# The one definition of the --backend choices (CLI, Slicer panel, load_predictor).
BACKENDS = ("auto", "onnx", "tensorflow", "tflite")
# ONNX Runtime on CPU runs at most this many voxels (windows x window voxels) per call: small
# batches stay in cache (4 windows of 160x160 measured ~1.5x faster per window than 16).
ONNX_CPU_RUN_VOXELS = 4 * 160 * 160
DEVICES = ("auto", "cpu", "gpu")


class Predictor(Protocol):
    """What the engine needs from a backend."""

    name: str
    device: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a float32 channels-last batch."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """Backends whose Python package is importable here (no import is done)."""
    found = [name for name, module in (("onnx", "onnxruntime"), ("tensorflow", "tensorflow")) if _installed(module)]
    if _installed("ai_edge_litert") or _installed("tensorflow"):
        found.append("tflite")
    return found


def import_tensorflow() -> Any:
    """Import TensorFlow without the native start-up lines it writes straight to stderr.

    Those lines would break the CLI's promise of one ``error:`` line; Python-level errors are kept.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_stderr_silenced():
        import tensorflow
    return tensorflow


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (native libraries' start-up lines)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class OnnxPredictor:
    """ONNX Runtime session for ``model.onnx``."""

    name = "onnx"
    precision = "fp32"

    def __init__(self, path: os.PathLike[str] | str, device: str) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device in ("auto", "gpu"):
            gpu_providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]
            if device == "gpu" and not gpu_providers:
                raise MedSegAIInputError(
                    "--device gpu was asked for but ONNX Runtime has no CUDA provider here; "
                    "install onnxruntime-gpu or use --device cpu."
                )
            providers = gpu_providers + providers
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = thread_count()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle worker threads sleep instead of spinning: on a busy or shared CPU spinning threads
        # steal the cores that do the work (measured 2x slower on a loaded 2-core machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ModelFolderError(f"cannot load {path} with ONNX Runtime: {e}. Re-export the model folder.") from e
        self._input = self._session.get_inputs()[0].name
        self.device = "gpu" if self._session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for ``batch``; on CPU, run in cache-sized sub-batches (same result, faster)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        per_window = int(np.prod(batch.shape[1:-1])) if batch.ndim > 2 else 1
        step = batch.shape[0] if self.device == "gpu" else max(1, ONNX_CPU_RUN_VOXELS // max(1, per_window))
        if step >= batch.shape[0]:
            return np.asarray(self._session.run(None, {self._input: batch})[0], dtype=np.float32)
        parts = [self._session.run(None, {self._input: batch[i : i + step]})[0] for i in range(0, batch.shape[0], step)]
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)


class KerasPredictor:
    """Keras 3 ``model.keras`` loaded with ``safe_mode=True`` (a model folder cannot run code)."""

    name = "tensorflow"

    def __init__(self, path: os.PathLike[str] | str, device: str) -> None:
        tf = import_tensorflow()

        threads = thread_count()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # already initialised in this process; keep the existing setting
        gpus = tf.config.list_physical_devices("GPU")
        if device == "gpu" and not gpus:
            raise MedSegAIInputError("--device gpu was asked for but TensorFlow sees no GPU here; use --device cpu.")
        if device == "cpu" and gpus:
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:
                pass
        self.device = "gpu" if gpus and device != "cpu" else "cpu"
        from .keras_model import load_keras_model

        model = load_keras_model(path)
        self._model = model
        self._call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        output = self._call(np.ascontiguousarray(batch, dtype=np.float32))
        return np.asarray(output, dtype=np.float32)


class TFLitePredictor:
    """``model.tflite`` run by the TFLite interpreter of ``ai-edge-litert`` (preferred) or ``tensorflow``.

    The exported graph has dynamic batch and spatial sizes; the input tensor is resized when a
    batch of another shape arrives. Float32 in and out, also for float16/int8 quantised files.
    CPU only (``--device gpu`` is refused).
    """

    name = "tflite"

    def __init__(self, path: os.PathLike[str] | str, device: str) -> None:
        import warnings

        if device == "gpu":
            raise MedSegAIInputError("--backend tflite runs on the CPU only; use --device cpu or auto, or another backend.")
        self.device = "cpu"
        with warnings.catch_warnings(), native_stderr_silenced():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            if _installed("ai_edge_litert"):
                from ai_edge_litert.interpreter import Interpreter
            else:
                Interpreter = import_tensorflow().lite.Interpreter
            try:
                self._interpreter = Interpreter(model_path=str(path), num_threads=thread_count())
            except (ValueError, RuntimeError) as e:
                raise ModelFolderError(f"cannot load {path} with the TFLite interpreter: {e}. Re-export the model.") from e
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._shape: tuple[int, ...] | None = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input, list(batch.shape), strict=False)
            with native_stderr_silenced():  # "Created TensorFlow Lite XNNPACK delegate" on the first allocation
                self._interpreter.allocate_tensors()
            self._shape = batch.shape
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self._output), dtype=np.float32)


def load_predictor(card: ModelCard, backend: str = "auto", device: str = "auto", precision: str = "auto") -> Predictor:
    """Create the predictor for a model folder.

    ``auto`` picks ONNX Runtime when ``model.onnx`` and the package are both there (it is the faster
    one on CPU), else TensorFlow, else TFLite (a folder written by ``medsegai export --format tflite``).
    ``precision`` (:data:`MedSegAILib.model.precision.PRECISIONS`) chooses the folder's validated int8
    ONNX file instead (``auto``: when there is one and the run is on the CPU); the predictor's
    ``precision`` attribute says which ran (``"fp32"`` or ``"int8"``).

    Raises:
        MedSegAIInputError: unknown backend/device, or the needed package/file is missing.
    """
    if backend not in BACKENDS:
        raise MedSegAIInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if device not in DEVICES:
        raise MedSegAIInputError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    from .precision import resolve_int8

    int8_path = resolve_int8(card, precision, backend, device)
    if int8_path is not None:
        predictor = OnnxPredictor(int8_path, "cpu")
        predictor.precision = "int8"
        return predictor
    tflite_package = "ai_edge_litert" if _installed("ai_edge_litert") else "tensorflow"
    choices = {
        "onnx": (card.weights_path("onnx"), "onnxruntime", "model.onnx", OnnxPredictor),
        "tensorflow": (card.weights_path("keras"), "tensorflow", "model.keras", KerasPredictor),
        "tflite": (card.weights_path("tflite"), tflite_package, "model.tflite (medsegai export --format tflite)", TFLitePredictor),
    }
    order = ["onnx", "tensorflow", "tflite"] if backend == "auto" else [backend]
    missing: list[str] = []
    for name in order:
        path, package, file_name, predictor_class = choices[name]
        if path is None:
            missing.append(f"the model has no {file_name}")
            continue
        if not _installed(package):
            missing.append(f"the Python package '{package}' is not installed")
            continue
        predictor = predictor_class(path, device)
        predictor.precision = "fp32"
        return predictor
    raise MedSegAIInputError(
        f"cannot run model '{card.id}' with backend {backend}: " + "; ".join(missing)
        + ". Install the missing package (see MedSegAI/Resources/requirements.txt) or choose another --backend."
    )
