"""Deployment formats side by side: size on disk, load time, windows/s and Dice on the shared cases.

    python benchmarks/bench_deploy.py                                   # ct-abdomen-organs, 2 cases
    python benchmarks/bench_deploy.py --model mr-brain-tumor --cases 2 --formats tflite:int8

Every format is written by ``medsegai export`` (``medsegai_training.deploy.export_deployment``),
which segments the first ``--cases`` cases of the model's dataset (built from ../shared/data by
training/recipes/build_datasets.py) through the engine with the exported graph and with Keras;
its Dice against the reference labels (mean over the model's labels and the cases) and voxel
agreement with Keras are what the table quotes. Load time: creating the engine's predictor
(TensorFlow already imported; median of 3). Windows/s: real windows the engine fed the network on
the last case, in batches of 4, on ``MEDSEGAI_THREADS`` threads (default: all cores), median of 3
passes. The shipped models were trained on these cases, so the Dice shows agreement, not accuracy.
Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FORMATS = ["keras", "onnx", "savedmodel", "tflite", "tflite:float16", "tflite:int8"]


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _predictor(kind: str, path: Path):
    from medsegai_training.deploy import load_savedmodel_predictor

    from MedSegAILib.model.backends import KerasPredictor, OnnxPredictor, TFLitePredictor

    if kind == "savedmodel":
        return load_savedmodel_predictor(path)
    return {"keras": KerasPredictor, "onnx": OnnxPredictor, "tflite": TFLitePredictor}[kind](path, "cpu")


def _throughput(predictor, windows: np.ndarray, batch: int = 4) -> float:
    predictor.predict(windows[:batch])  # warm-up (allocation, tracing)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, len(windows) - batch + 1, batch):
            predictor.predict(windows[i : i + batch])
        times.append(time.perf_counter() - start)
    return (len(windows) // batch * batch) / median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ct-abdomen-organs")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--windows", type=int, default=32, help="windows timed per pass")
    parser.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("MEDSEGAI_SHARED_DATA", REPO.parent / "shared" / "data")))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "training" / "recipes"))
    from build_datasets import build_dataset
    from medsegai_training.deploy import _Recorder, export_deployment

    from MedSegAILib.model.backends import KerasPredictor, import_tensorflow
    from MedSegAILib.data.dataset import load_dataset, read_case
    from MedSegAILib.inference.segment import SegmentOptions
    from MedSegAILib.model.modelcard import find_model
    from MedSegAILib.inference.pipeline import segment_case

    import_tensorflow()
    card = find_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dataset = build_dataset(card.id, args.shared, tmp / "data")
        info = load_dataset(dataset)
        recorder = _Recorder(KerasPredictor(card.weights_path("keras"), "cpu"), args.windows)
        images, _ = read_case(info, info.cases[min(args.cases, len(info.cases)) - 1])
        segment_case(images, card, predictor=recorder, options=SegmentOptions())
        windows = np.stack(recorder.windows)
        reference_dice = None
        for spec in args.formats:
            kind, _, quantize = spec.partition(":")
            row = {"format": spec}
            if kind == "keras":
                path = card.weights_path("keras")
                row.update(agreement=1.0)
            else:
                out = tmp / spec.replace(":", "-")
                start = time.perf_counter()
                check = export_deployment(card.folder, kind, out, data=dataset, quantize=quantize or None,
                                          max_cases=args.cases, force=True)
                row.update(export_s=round(time.perf_counter() - start, 1), agreement=check["voxel_agreement"],
                           dice=check["dice_export"], dice_change=check["dice_change"])
                reference_dice = check["dice_float"]
                files = json_files(out)
                path = out / (files.get("savedmodel") or files.get("tflite") or files.get("onnx"))
            loads = []
            for _ in range(3):
                start = time.perf_counter()
                predictor = _predictor(kind, path)
                loads.append(time.perf_counter() - start)
            row.update(size_mb=round(_size(path) / 1e6, 2), load_s=round(median(loads), 3),
                       windows_per_s=round(_throughput(predictor, windows), 2))
            rows.append(row)
        for row in rows:
            if row["format"] == "keras":
                row.update(dice=reference_dice, dice_change=0.0)
    info_machine = machine()
    info_machine["threads"] = os.environ.get("MEDSEGAI_THREADS", "all cores")
    print_report(
        f"deployment formats: {card.id} {card.version}, window {tuple(windows.shape[1:])}, {info_machine}",
        rows, ["format", "size_mb", "load_s", "windows_per_s", "dice", "dice_change", "agreement", "export_s"],
    )
    return 0


def json_files(folder: Path) -> dict:
    import json

    return json.loads((folder / "model.json").read_text())["files"]


if __name__ == "__main__":
    raise SystemExit(main())
