"""ONNX Runtime vs TensorFlow on CPU: throughput on the same model and windows, identical labels, `auto`'s choice.

    python benchmarks/bench_backends.py                              # default model, 512x512x40 CT
    python benchmarks/bench_backends.py --model FOLDER --slices 40 --repeat 5

1. The engine segments a 512×512×N CT once (ONNX Runtime) while the exact network batches it
   sends are recorded (same windows for both backends).
2. One fresh process loads both backends and predicts those batches ``--repeat`` times with the
   passes alternating (ONNX, TF, ONNX, TF, ...) after a warm-up, so machine noise hits both;
   throughput = windows/s (slices/s for a 2D model whose slice fits one window): median and best
   pass, and windows per CPU second.
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
from _common import (
    emit_child_result,
    machine,
    median,
    print_report,
    resolve_model_arg,
    run_child,
    synthetic_ct,
)

TARGET_RATIO = 1.2


def record_batches(volume_path: Path, model: str, out: Path) -> int:
    """Segment with ONNX Runtime, saving every distinct batch shape and its call count (npz)."""
    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.io.imageio import read_volume
    from MedSegAILib.model.modelcard import find_model
    from MedSegAILib.inference.pipeline import segment_case

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


def child_throughput(model: str, batches_file: str, repeat: int) -> dict:
    """Both backends in this one process, passes alternating (ONNX, TF, ONNX, TF, ...).

    Alternating makes a busy machine slow both alike; CPU seconds per pass (only one backend
    works at a time, ONNX Runtime threads do not spin) are reported next to wall seconds.
    """
    from _common import cpu_seconds
    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.model.modelcard import find_model

    data = np.load(batches_file)
    work = [(data[f"batch{i}"], int(data[f"count{i}"])) for i in range(len([k for k in data.files if k.startswith("batch")]))]
    windows = sum(batch.shape[0] * count for batch, count in work)
    card = find_model(model)
    predictors, loads = {}, {}
    for backend in ("onnx", "tensorflow"):
        start = time.perf_counter()
        predictors[backend] = load_predictor(card, backend=backend, device="cpu")
        loads[backend] = time.perf_counter() - start
        for batch, _ in work:  # warm-up (graph tracing, allocations)
            predictors[backend].predict(batch)
    wall: dict[str, list[float]] = {b: [] for b in predictors}
    cpu: dict[str, list[float]] = {b: [] for b in predictors}
    for _ in range(repeat):
        for backend, predictor in predictors.items():
            start, cpu_start = time.perf_counter(), cpu_seconds()
            for batch, count in work:
                for _ in range(count):
                    predictor.predict(batch)
            wall[backend].append(time.perf_counter() - start)
            cpu[backend].append(cpu_seconds() - cpu_start)
    result = {}
    for backend, predictor in predictors.items():
        result[backend] = {
            "backend": predictor.name, "load_s": round(loads[backend], 3), "windows": windows,
            "seconds_median": round(median(wall[backend]), 3), "seconds_best": round(min(wall[backend]), 3),
            "seconds_all": [round(v, 3) for v in wall[backend]], "cpu_seconds_median": round(median(cpu[backend]), 3),
            "windows_per_s": round(windows / median(wall[backend]), 2),
            "windows_per_s_best": round(windows / min(wall[backend]), 2),
            "windows_per_cpu_s": round(windows / median(cpu[backend]), 2),
        }
    return result


def child_labels(model: str, backend: str, volume_path: str, out: str) -> dict:
    from MedSegAILib.io.imageio import read_volume
    from MedSegAILib.inference.pipeline import segment_case

    labels, _ = segment_case([read_volume(volume_path)], model, backend=backend, device="cpu")
    np.save(out, labels.array)
    return {"saved": out}


def child_auto(model: str) -> dict:
    from MedSegAILib.model.backends import available_backends, load_predictor
    from MedSegAILib.model.modelcard import find_model

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
            emit_child_result(child_throughput(rest[0], rest[1], int(rest[2])))
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
        results = run_child([script, "--child", "throughput", model, str(batches_file), str(args.repeat)])
        if "error" in results:
            results = {"onnx": results, "tensorflow": results}
        for backend in ("onnx", "tensorflow"):
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
    best = results["onnx"].get("windows_per_s_best"), results["tensorflow"].get("windows_per_s_best")
    ratio_best = round(best[0] / best[1], 3) if all(best) else None
    cpu_rates = results["onnx"].get("windows_per_cpu_s"), results["tensorflow"].get("windows_per_cpu_s")
    ratio_cpu = round(cpu_rates[0] / cpu_rates[1], 3) if all(cpu_rates) else None
    faster = None if ratio is None else ("onnx" if ratio >= 1.0 else "tensorflow")
    for backend, result in results.items():
        rows.append({"backend": backend, "windows": windows, **result})
    summary = {
        "model": Path(model).name,
        "volume": f"512x512x{args.slices}",
        "onnx_over_tensorflow": ratio,
        "onnx_over_tensorflow_best": ratio_best,
        "onnx_over_tensorflow_cpu": ratio_cpu,
        "meets_1_2x": None if ratio is None else ratio >= TARGET_RATIO,
        "labels": same,
        "auto_picks": auto.get("auto"),
        "auto_picks_faster": None if faster is None else auto.get("auto") == faster,
        "machine": machine(),
    }
    print_report("bench_backends", rows + [summary], ["backend", "windows", "load_s", "seconds_median", "windows_per_s",
                                                       "windows_per_s_best", "windows_per_cpu_s", "onnx_over_tensorflow",
                                                       "onnx_over_tensorflow_best", "onnx_over_tensorflow_cpu", "auto_picks",
                                                       "auto_picks_faster", "error"])
    print(f"\nlabels: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
