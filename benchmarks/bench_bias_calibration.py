"""Does an output-bias calibration on the corrected study transfer to the patient's later study?

    python benchmarks/bench_bias_calibration.py PGBM-001=FOLD_001_MODEL PGBM-003=FOLD_003_MODEL \
        [--shared ../shared/data] [--biases -2 -1.5 -1 -0.5 0 0.5 1 1.5 2]

The fold models are the ones ``bench_loop.py`` trains and caches (``CACHE/mr/fold-PGBM-001/model``);
a fine-tuned model folder works the same way. For each ``PATIENT=MODEL``: every brain study of the
shared data is segmented through the engine (``pipeline.segment_case``) with the tumour logit shifted
by each bias *b* (its probability multiplied by e^b, then renormalised); the *b* with the best Dice
on the patient's *earlier* study (the one the user corrected) is applied to its later study and to the
other patients' studies. Prints one JSON line per bias and one summary line per model
(``benchmarks/RESULTS.md`` section 9, "How far +0.10 is"). CPU-heavy: 5 studies × 9 biases per model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "MedSegAI"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

DEFAULT_BIASES = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


class BiasedPredictor:
    """A predictor whose class ``label`` logit is shifted by ``bias`` (probabilities renormalised)."""

    def __init__(self, inner: Any, bias: float, label: int = 1) -> None:
        self.inner, self.bias, self.label = inner, float(bias), int(label)
        self.device = getattr(inner, "device", "cpu")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        probabilities = np.array(self.inner.predict(batch), dtype=np.float32)
        probabilities[..., self.label] *= np.float32(np.exp(self.bias))
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        return probabilities


def main(argv: Sequence[str] | None = None) -> int:
    import bench_loop  # also puts training/ on the path
    from medsegai_training.evaluate import dice
    from MedSegAILib.inference.pipeline import segment_case
    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.model.modelcard import find_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="PATIENT=MODEL_FOLDER")
    parser.add_argument("--shared", type=Path, default=bench_loop.DEFAULT_SHARED)
    parser.add_argument("--biases", type=float, nargs="+", default=list(DEFAULT_BIASES))
    args = parser.parse_args(argv)

    studies: dict[str, tuple[list[Any], np.ndarray]] = {}
    for patient, folders in bench_loop.mr_studies(args.shared).items():
        for folder in folders:
            images, mask = bench_loop._read_mr(folder)
            studies[f"{patient}/{folder.name}"] = (images, np.asarray(mask.array) > 0)
    for spec in args.models:
        patient, _, path = spec.partition("=")
        own = [key for key in studies if key.startswith(patient + "/")]
        if len(own) < 2 or not path:
            parser.error(f"{spec!r}: give PATIENT=MODEL for a patient with two studies")
        card = find_model(path)
        predictor = load_predictor(card, backend="onnx")
        scores: dict[float, dict[str, float]] = {}
        for bias in args.biases:
            row = {}
            for key, (images, reference) in studies.items():
                labels, _ = segment_case(images, card, predictor=BiasedPredictor(predictor, bias))
                row[key] = round(dice(np.asarray(labels.array) > 0, reference), 4)
            scores[bias] = row
            print(json.dumps({"model": spec, "bias": bias, "dice": row}), flush=True)
        earlier, later = own[0], own[1]
        best = max(args.biases, key=lambda b: scores[b][earlier])
        others = [key for key in studies if not key.startswith(patient + "/")]
        zero = min(args.biases, key=abs)
        print(json.dumps({
            "model": spec, "bias_chosen_on_earlier": best,
            "earlier": [scores[zero][earlier], scores[best][earlier]],
            "later": [scores[zero][later], scores[best][later]],
            "others_worst_change": round(min(scores[best][k] - scores[zero][k] for k in others), 4),
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
