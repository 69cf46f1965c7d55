"""ONNX Runtime vs TensorFlow on CPU: throughput on the same model and windows, identical labels, `auto`'s choice.

    python benchmarks/bench_backends.py                              # default model, 512x512x40 CT
    python benchmarks/bench_backends.py --model FOLDER --slices 40 --repeat 5

1. The engine segments a 512×512×N CT once (ONNX Runtime) while the exact network batches it
   sends are recorded (same windows for both backends).
2. Each backend (its own fresh process, so thread pools do not interfere) predicts those batches
   ``--repeat`` times after one warm-up pass; throughput = windows/s (slices/s for a 2D model
   whose slice fits one window), median of the repeats.
3. Both backends segment the same CT end to end; the label maps are compared voxel for voxel.
4. ``load_predictor(card, "auto")`` is asked which backend it picks; it must be the faster one.

Target (issue 6): ONNX Runtime ≥ 1.2× TensorFlow throughput on CPU, identical labels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_child_result, machine, median, print_report, resolve_model_arg, run_child, synthetic_ct  # noqa: E402

TARGET_RATIO = 1.2


def record_batches(volume_path: Path, model: str, out: Path) -> int:
    """Segment with ONNX Runtime, saving every distinct batch shape and its call count (npz)."""
    from MedSegAILib.backends import load_predictor
    from MedSegAILib.imageio import read_volume
    from MedSegAILib.modelcard import find_model
    from MedSegAILib.pipeline import segment_case

    card = find_model(model)
    inner = load_predictor(card, backend="onnx")
    batches: dict[tuple[int, ...], np.ndarray] = {}
    counts: dict[tuple[int, ...], int] = {}

    class Recorder:
        name, device = inner.name, inner.device

        def predict(self, batch: np.ndarray) -> np.ndarray:
            key = tuple(batch.shape)
            counts[key] = counts.get(key, 0) + 1
            batches.setdefault(key, batch.copy())
            return inner.predict(batch)

    segment_case([read_volume(volume_path)], card, predictor=Recorder())
    arrays = {f"batch{i}": batches[k] for i, k in enumerate(batches)}
    arrays.update({f"count{i}": np.array(counts[k]) for i, k in enumerate(batches)})
    np.savez(out, **arrays)
    return sum(k[0] * c for k, c in counts.items())


def child_throughput(model: str, backend: str, batches_file: str, repeat: int) -> dict:
    from MedSegAILib.backends import load_predictor
    from MedSegAILib.modelcard import find_model

    data = np.load(batches_file)
    work = [(data[f"batch{i}"], int(data[f"count{i}"])) for i in range(len([k for k in data.files if k.startswith("batch")]))]
    windows = sum(batch.shape[0] * count for batch, count in work)
    start = time.perf_counter()
    predictor = load_predictor(find_model(model), backend=backend, device="cpu")
    load = time.perf_counter() - start
    for batch, _ in work:  # warm-up (graph tracing, allocations)
        predictor.predict(batch)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for batch, count in work:
            for _ in range(count):
                predictor.predict(batch)
        seconds.append(time.perf_counter() - start)
    best = median(seconds)
    return {"backend": predictor.name, "load_s": round(load, 3), "windows": windows,
            "seconds_median": round(best, 3), "seconds_all": [round(s, 3) for s in seconds],
            "windows_per_s": round(windows / best, 2)}


def child_labels(model: str, backend: str, volume_path: str, out: str) -> dict:
    from MedSegAILib.imageio import read_volume
    from MedSegAILib.pipeline import segment_case

    labels, _ = segment_case([read_volume(volume_path)], model, backend=backend, device="cpu")
    np.save(out, labels.array)
    return {"saved": out}


def child_auto(model: str) -> dict:
    from MedSegAILib.backends import available_backends, load_predictor
    from MedSegAILib.modelcard import find_model

    return {"auto": load_predictor(find_model(model), backend="auto", device="cpu").name, "available": available_backends()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "throughput":
            emit_child_result(child_throughput(rest[0], rest[1], rest[2], int(rest[3])))
        elif kind == "labels":
            emit_child_result(child_labels(*rest))
        else:
            emit_child_result(child_auto(rest[0]))
        return 0

    model = resolve_model_arg(args.model)
    script = str(Path(__file__).resolve())
    volume = synthetic_ct((512, 512, args.slices))
    rows = []
    with tempfile.TemporaryDirectory(prefix="medsegai-bench-") as folder:
        batches_file = Path(folder) / "batches.npz"
        windows = record_batches(volume, model, batches_file)
        results = {}
        for backend in ("onnx", "tensorflow"):
            results[backend] = run_child([script, "--child", "throughput", model, backend, str(batches_file), str(args.repeat)])
            run_child([script, "--child", "labels", model, backend, str(volume), str(Path(folder) / f"{backend}.npy")])
        auto = run_child([script, "--child", "auto", model])
        labels = {b: np.load(Path(folder) / f"{b}.npy") for b in ("onnx", "tensorflow") if (Path(folder) / f"{b}.npy").is_file()}
    same = None
    if len(labels) == 2:
        differing = int(np.count_nonzero(labels["onnx"] != labels["tensorflow"]))
        same = {"identical": differing == 0, "differing_voxels": differing, "voxels": int(labels["onnx"].size)}
    onnx_rate = results["onnx"].get("windows_per_s")
    tf_rate = results["tensorflow"].get("windows_per_s")
    ratio = round(onnx_rate / tf_rate, 3) if onnx_rate and tf_rate else None
    faster = None if ratio is None else ("onnx" if ratio >= 1.0 else "tensorflow")
    for backend, result in results.items():
        rows.append({"backend": backend, "windows": windows, **result})
    summary = {
        "model": Path(model).name,
        "volume": f"512x512x{args.slices}",
        "onnx_over_tensorflow": ratio,
        "meets_1_2x": None if ratio is None else ratio >= TARGET_RATIO,
        "labels": same,
        "auto_picks": auto.get("auto"),
        "auto_picks_faster": None if faster is None else auto.get("auto") == faster,
        "machine": machine(),
    }
    print_report("bench_backends", rows + [summary], ["backend", "windows", "load_s", "seconds_median", "windows_per_s",
                                                       "onnx_over_tensorflow", "auto_picks", "auto_picks_faster", "error"])
    print(f"\nlabels: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
