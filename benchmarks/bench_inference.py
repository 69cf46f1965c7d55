"""Time each stage of `medsegai segment` and the model alone on the same windows; print peak memory.

    python benchmarks/bench_inference.py                       # 512x512x200 CT, default model
    python benchmarks/bench_inference.py --size 512 512 600 --model ct-abdomen-organs --backend onnx

Stages: read, model_load, preprocess, model, stitch, postprocess, write (what the engine reports),
then "model alone": the same network called on batches of exactly the shapes the engine used,
with nothing else around it. In 2D mode the engine preprocesses the next slab and maps the last
one back on threads while the network runs, so preprocess and stitch overlap the model and the
stage times add up to more than the end-to-end time; the overhead is what end-to-end shows. Overhead = end-to-end (without model_load) / model alone.
``--repeat N`` runs it N times in this process and quotes the median and the best (minimum) of
every figure; the "best" overhead is best end-to-end / best model-alone (on a shared machine noise
only adds time; also look at ``engine_cpu_s`` and the load average).
Prints one JSON document, then a table.
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
    cpu_seconds,
    machine,
    median,
    peak_rss_mb,
    print_report,
    resolve_model_arg,
    synthetic_ct,
)


class RecordingPredictor:
    """Wraps a predictor; remembers one batch per shape and how often each shape was used."""

    def __init__(self, predictor: object) -> None:
        self.predictor = predictor
        self.name = predictor.name  # type: ignore[attr-defined]
        self.device = predictor.device  # type: ignore[attr-defined]
        self.batches: dict[tuple[int, ...], np.ndarray] = {}
        self.counts: dict[tuple[int, ...], int] = {}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        key = tuple(batch.shape)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.batches.setdefault(key, batch.copy())
        return self.predictor.predict(batch)  # type: ignore[attr-defined]


def model_alone(recorder: RecordingPredictor) -> float:
    """Seconds the bare network needs for the same calls (same shapes, same count)."""
    start = time.perf_counter()
    for key, count in recorder.counts.items():
        batch = recorder.batches[key]
        for _ in range(count):
            recorder.predictor.predict(batch)  # type: ignore[attr-defined]
    return time.perf_counter() - start


def run(size: tuple[int, int, int], model: str | None, backend: str, device: str, output_suffix: str,
        precision: str = "auto") -> dict:
    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.io.imageio import read_volume, write_volume
    from MedSegAILib.inference.segment import SegmentOptions
    from MedSegAILib.model.modelcard import find_model
    from MedSegAILib.inference.pipeline import segment_case
    from MedSegAILib.io.segfile import write_segmentation

    path = synthetic_ct(size)
    timings: dict[str, float] = {}
    start, cpu_read = time.perf_counter(), cpu_seconds()
    volume = read_volume(path)
    cpu_read = cpu_seconds() - cpu_read
    timings["read"] = time.perf_counter() - start

    card = find_model(model)
    start = time.perf_counter()
    recorder = RecordingPredictor(load_predictor(card, backend=backend, device=device, precision=precision))
    timings["model_load"] = time.perf_counter() - start

    start, cpu_start = time.perf_counter(), cpu_seconds()
    labels, card = segment_case([volume], card, options=SegmentOptions(), timings=timings, predictor=recorder)
    engine_seconds = time.perf_counter() - start
    engine_cpu = cpu_seconds() - cpu_start

    with tempfile.TemporaryDirectory() as folder:
        start, cpu_write = time.perf_counter(), cpu_seconds()
        output = Path(folder) / f"labels{output_suffix}"
        if output_suffix == ".seg.nrrd":
            write_segmentation(output, labels, [label.to_dict() for label in card.labels])
        else:
            write_volume(output, labels)
        timings["write"] = time.perf_counter() - start
        cpu_write = cpu_seconds() - cpu_write

    cpu_alone = cpu_seconds()
    alone = model_alone(recorder)
    cpu_alone = cpu_seconds() - cpu_alone
    end_to_end = timings["read"] + engine_seconds + timings["write"]
    windows = sum(key[0] * count for key, count in recorder.counts.items())
    return {
        "size": "x".join(map(str, size)),
        "model": f"{card.id} {card.version}",
        "mode": card.spatial.mode,
        "backend": f"{recorder.name} {getattr(recorder.predictor, 'precision', 'fp32')}",
        "device": recorder.device,
        **{f"{stage}_s": round(seconds, 3) for stage, seconds in timings.items()},
        "end_to_end_s": round(end_to_end, 3),
        "model_alone_s": round(alone, 3),
        "engine_cpu_s": round(engine_cpu, 3),
        "end_to_end_cpu_s": round(cpu_read + engine_cpu + cpu_write, 3),
        "model_alone_cpu_s": round(cpu_alone, 3),
        "overhead_ratio_cpu": round((cpu_read + engine_cpu + cpu_write) / cpu_alone, 3) if cpu_alone > 0 else None,
        "overhead_ratio": round(end_to_end / alone, 3) if alone > 0 else None,
        "network_calls": sum(recorder.counts.values()),
        "windows": windows,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "labels_found": sorted(int(v) for v in np.unique(labels.array) if v),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs=3, type=int, default=[512, 512, 200], metavar=("X", "Y", "Z"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "int8"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output-suffix", default=".seg.nrrd", choices=(".seg.nrrd", ".nrrd", ".nii.gz"))
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median of each figure is reported")
    args = parser.parse_args()
    model = resolve_model_arg(args.model)
    runs = [run(tuple(args.size), model, args.backend, args.device, args.output_suffix, args.precision) for _ in range(args.repeat)]
    rows = []
    for statistic, pick in (("median", median), ("best", min)):
        row = dict(runs[0], statistic=statistic)
        for key, value in runs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("network_calls", "windows"):
                row[key] = round(pick([r[key] for r in runs]), 3)
        # overhead of the best run against the best model-alone time (noise only ever adds time)
        if statistic == "best" and row["model_alone_s"]:
            row["overhead_ratio"] = round(row["end_to_end_s"] / row["model_alone_s"], 3)
        rows.append(row)
    rows[0]["end_to_end_all_s"] = [r["end_to_end_s"] for r in runs]
    rows[0]["model_alone_all_s"] = [r["model_alone_s"] for r in runs]
    rows[0]["overhead_all"] = [r["overhead_ratio"] for r in runs]
    rows[0]["machine"] = machine()
    columns = ["statistic", "size", "backend", "read_s", "model_load_s", "preprocess_s", "model_s", "stitch_s", "postprocess_s",
               "write_s", "end_to_end_s", "model_alone_s", "overhead_ratio", "overhead_ratio_cpu", "peak_rss_mb"]
    print_report("bench_inference", rows, columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
