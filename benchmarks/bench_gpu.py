"""GPU throughput: the 2D default model on 512×512 slices, mixed precision off/on, plus the engine end to end.

    python benchmarks/bench_gpu.py                          # default model
    python benchmarks/bench_gpu.py --model FOLDER --slices 200 --repeat 5

Without a GPU (no ``nvidia-smi`` device, no CUDA provider in ONNX Runtime and no GPU visible to
TensorFlow) it prints ``{"gpu": false, ...}`` saying so and exits 0: nothing is measured.

With a GPU:
- model alone: the engine's real windows for a 512×512×N CT (recorded once), predicted
  ``--repeat`` times after a warm-up — TensorFlow float32, TensorFlow ``mixed_float16`` (the
  network rebuilt from ``architecture`` in the card under the mixed policy, same weights) and ONNX
  Runtime CUDA (float32) when available; slices/s = slices / median seconds.
- end to end: ``medsegai segment``'s pipeline on the GPU (read → write, model load apart),
  slices/s and the per-stage split, for ``--device gpu`` with the ``auto`` backend.

Target (issue 6): ≥ 500 slices/s of 512×512 for the 2D default model.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    machine,
    median,
    print_report,
    resolve_model_arg,
    segment_in_this_process,
    synthetic_ct,
)

TARGET_SLICES_PER_S = 500.0


def gpu_inventory() -> dict:
    """What GPU support is present (imports onnxruntime and TensorFlow)."""
    found: dict = {"nvidia_smi": None, "onnxruntime_cuda": False, "tensorflow_gpus": 0}
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=False)
        found["nvidia_smi"] = done.stdout.strip() or None
    try:
        import onnxruntime as ort

        found["onnxruntime_cuda"] = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        pass
    try:
        from MedSegAILib.model.backends import import_tensorflow

        found["tensorflow_gpus"] = len(import_tensorflow().config.list_physical_devices("GPU"))
    except ImportError:
        pass
    found["gpu"] = bool(found["onnxruntime_cuda"] or found["tensorflow_gpus"])
    return found


def record_windows(volume_path: Path, card: object) -> list[np.ndarray]:
    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.io.imageio import read_volume
    from MedSegAILib.inference.pipeline import segment_case

    inner = load_predictor(card, backend="auto", device="auto")
    batches: list[np.ndarray] = []

    class Recorder:
        name, device = inner.name, inner.device

        def predict(self, batch: np.ndarray) -> np.ndarray:
            batches.append(batch.copy())
            return inner.predict(batch)

    segment_case([read_volume(volume_path)], card, predictor=Recorder())
    return batches


def time_calls(predict, batches: list[np.ndarray], repeat: int) -> float:
    for batch in batches[:3]:
        predict(batch)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for batch in batches:
            predict(batch)
        seconds.append(time.perf_counter() - start)
    return median(seconds)


def keras_predictors(card: object) -> dict:
    """float32 and mixed_float16 versions of the card's Keras model (same weights)."""
    from MedSegAILib.model.backends import import_tensorflow

    tf = import_tensorflow()
    import keras
    from medsegai_training.models import build_model

    loaded = keras.saving.load_model(str(card.weights_path("keras")), compile=False, safe_mode=True)  # type: ignore[attr-defined]
    out = {"tensorflow fp32": tf.function(lambda x: loaded(x, training=False))}
    architecture = (card.to_dict().get("architecture") or {})  # type: ignore[attr-defined]
    if architecture.get("config"):
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_float16")
        try:
            mixed = build_model(dict(architecture["config"]))
        finally:
            keras.config.set_dtype_policy(previous)
        mixed.set_weights(loaded.get_weights())
        out["tensorflow mixed_float16"] = tf.function(lambda x: tf.cast(mixed(x, training=False), tf.float32))
    def as_numpy(function):
        return lambda batch: np.asarray(function(batch))

    return {name: as_numpy(function) for name, function in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    inventory = gpu_inventory()
    if not inventory["gpu"]:
        print(json_line({"benchmark": "bench_gpu", "gpu": False, "inventory": inventory, "machine": machine(),
                         "message": "No GPU is present (no CUDA provider in ONNX Runtime, no GPU visible to "
                                    "TensorFlow): nothing was measured. Run this script on a machine with an "
                                    "NVIDIA GPU, onnxruntime-gpu and/or tensorflow[and-cuda]."}))
        print("\nbench_gpu: NO GPU PRESENT - nothing measured.")
        return 0

    from MedSegAILib.model.modelcard import find_model

    model = resolve_model_arg(args.model)
    card = find_model(model)
    volume = synthetic_ct((512, 512, args.slices))
    batches = record_windows(volume, card)
    rows = []
    candidates = keras_predictors(card) if card.weights_path("keras") else {}
    if inventory["onnxruntime_cuda"] and card.weights_path("onnx"):
        from MedSegAILib.model.backends import OnnxPredictor

        candidates["onnxruntime cuda fp32"] = OnnxPredictor(card.weights_path("onnx"), "gpu").predict
    for name, predict in candidates.items():
        seconds = time_calls(predict, batches, args.repeat)
        rows.append({"what": f"model alone: {name}", "slices": args.slices, "seconds": round(seconds, 3),
                     "slices_per_s": round(args.slices / seconds, 1),
                     "meets_500": args.slices / seconds >= TARGET_SLICES_PER_S})
    end_to_end = []
    for _ in range(max(1, args.repeat // 2)):
        end_to_end.append(segment_in_this_process(str(volume), model))
    best = sorted(end_to_end, key=lambda r: r["end_to_end_s"])[len(end_to_end) // 2]
    rows.append({"what": f"end to end ({best['backend']}, read -> write)", "slices": args.slices,
                 "seconds": best["end_to_end_s"], "slices_per_s": round(args.slices / best["end_to_end_s"], 1),
                 "meets_500": args.slices / best["end_to_end_s"] >= TARGET_SLICES_PER_S, "stages": best})
    print_report("bench_gpu", rows, ["what", "slices", "seconds", "slices_per_s", "meets_500"])
    print(f"\ninventory: {inventory}\nmachine: {machine()}")
    return 0


def json_line(data: dict) -> str:
    import json

    return json.dumps(data, indent=2)


if __name__ == "__main__":
    sys.exit(main())
