"""int8 against fp32 in one process, alternating: network time, end-to-end time, label agreement.

    python benchmarks/bench_int8.py --model MODEL_FOLDER [--input CT] [--repeat 3]

MODEL_FOLDER must carry a validated int8 file (``medsegai quantize``). The input (default: the
512×512×200 CT of ``bench_inference.py``, ``_common.synthetic_ct``; for a multi-channel
model pass one file per channel with repeated ``--input``) is read once; then fp32 and int8 segment
it in turn, ``--repeat`` pairs, each timed from the loaded volumes to the labels (model load
excluded) with the seconds spent inside the network added up apart. Prints medians and the
fp32/int8 ratio of each pair (a ratio pair by pair holds when the machine's speed drifts).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from _common import machine, median, print_report, synthetic_ct


class _Timed:
    def __init__(self, predictor):
        self.predictor, self.seconds = predictor, 0.0
        self.name, self.device = predictor.name, predictor.device

    def predict(self, batch):
        start = time.perf_counter()
        try:
            return self.predictor.predict(batch)
        finally:
            self.seconds += time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", action="append", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.io.imageio import read_volume
    from MedSegAILib.inference.segment import SegmentOptions
    from MedSegAILib.model.modelcard import find_model
    from MedSegAILib.inference.pipeline import segment_case

    card = find_model(args.model)
    inputs = args.input or [str(synthetic_ct((512, 512, 200)))]
    volumes = [read_volume(path) for path in inputs]
    predictors = {p: _Timed(load_predictor(card, "onnx", "cpu", precision=p)) for p in ("fp32", "int8")}
    rows, labels = [], {}
    for index in range(args.repeat + 1):  # the first pair warms up (not counted)
        for precision in ("fp32", "int8") if index % 2 == 0 else ("int8", "fp32"):
            predictor = predictors[precision]
            predictor.seconds = 0.0
            start = time.perf_counter()
            result, _ = segment_case(volumes, card, predictor=predictor, options=SegmentOptions())
            wall = time.perf_counter() - start
            labels[precision] = np.asarray(result.array)
            if index:
                rows.append({"run": index, "precision": precision, "end_to_end_s": round(wall, 2),
                             "model_s": round(predictor.seconds, 2), "load_1m": round(os.getloadavg()[0], 2)})
    agreement = {}
    for label in card.labels:
        a, b = labels["fp32"] == label.value, labels["int8"] == label.value
        total = int(a.sum()) + int(b.sum())
        agreement[label.name] = None if total == 0 else round(2 * int((a & b).sum()) / total, 4)
    summary = {"machine": machine(), "model": card.id, "input": inputs, "threads": os.environ.get("MEDSEGAI_THREADS")}
    for key in ("end_to_end_s", "model_s"):
        fp32 = [r[key] for r in rows if r["precision"] == "fp32"]
        int8 = [r[key] for r in rows if r["precision"] == "int8"]
        summary[key] = {"fp32_median": median(fp32), "int8_median": median(int8),
                        "ratio_fp32_over_int8_per_pair": [round(a / b, 2) for a, b in zip(fp32, int8)]}
    summary["dice_int8_vs_fp32"] = agreement
    print_report("int8 vs fp32 (alternating)", rows, ["run", "precision", "end_to_end_s", "model_s", "load_1m"], as_json=False)
    import json

    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
