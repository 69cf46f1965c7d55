"""How far ONNX Runtime is from Keras on real data: the measurement behind the export check.

    python benchmarks/bench_onnx_agreement.py [MODEL_FOLDER_OR_ID ...] [--shared ../shared/data]

For each model (default: the shipped models and any fine-tuned or fold model that
``bench_loop.py`` cached under ``benchmarks/.cache/loop``), every axial slice of the model's real
data (brain studies for MR models, both labelled CTs for CT models) is run through ``model.keras`` (TensorFlow) and ``model.onnx`` (ONNX Runtime, re-converted with
``medsegai_training.export.export_onnx`` when the folder has none) — the windows the engine's own
inference makes (``MedSegAILib.inference.segment.segment_volumes``) — and compared: max |Δp| over all
voxels and classes, the 99.99th percentile of |Δp|, and the share of voxels whose argmax label
differs. Prints JSON lines and a table. The export check
(``medsegai_training.export.ONNX_TOLERANCE`` / ``ONNX_LABEL_AGREEMENT``) must pass every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "MedSegAI"))
sys.path.insert(0, str(REPO_ROOT / "training"))
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"
MR_CHANNELS = ("T1post", "T1prereg", "FLAIR")


def _inputs(card: Any, shared: Path) -> list[list[Path]]:
    if card.channel_names == ["CT"]:
        return [[shared / "ct-abdomen" / "example_ct_sm.nii.gz"], [shared / "ct-abdomen" / "example_ct_dicom"]]
    studies = []
    for study in sorted((shared / "mr-brain-tumor").glob("PGBM-*/*")):
        paths = [study / f"{n}.nrrd" for n in MR_CHANNELS]
        if all(p.is_file() for p in paths):
            studies.append(paths[: len(card.channel_names)])
    return studies


def measure(model: str, shared: Path) -> dict[str, Any]:
    """Segment the model's real data through the engine; every network batch goes to both backends."""
    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.io.imageio import read_volume
    from MedSegAILib.inference.segment import SegmentOptions, segment_volumes
    from MedSegAILib.model.modelcard import ModelCard, find_model
    from MedSegAILib.inference.validation import check_channels
    from medsegai_training.export import export_onnx, load_keras_model, onnx_agreement

    card = find_model(model)
    stats = {"worst": 0.0, "q9999": 0.0, "differing": 0, "voxels": 0}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_card = card
        if card.weights_path("onnx") is None:  # a keras-only folder: convert it again to measure
            folder = Path(tmp) / "model"
            folder.mkdir()
            for name in ("model.json", "model.keras"):
                (folder / name).symlink_to(card.folder / name)
            export_onnx(load_keras_model(card.folder / card.files["keras"]), folder / "model.onnx")
            raw = json.loads((card.folder / "model.json").read_text(encoding="utf-8"))
            raw["files"] = {"keras": "model.keras", "onnx": "model.onnx"}
            (folder / "model.json").unlink()
            (folder / "model.json").write_text(json.dumps(raw), encoding="utf-8")
            onnx_card = ModelCard.from_folder(folder)
        tf_predictor = load_predictor(card, backend="tensorflow", device="cpu")
        onnx_predictor = load_predictor(onnx_card, backend="onnx", device="cpu")

        def both(batch: np.ndarray) -> np.ndarray:
            reference = np.asarray(tf_predictor.predict(batch), np.float32)
            candidate = np.asarray(onnx_predictor.predict(batch), np.float32)
            diff, same = onnx_agreement(reference, candidate)
            n = int(np.prod(reference.shape[:-1]))
            stats["worst"] = max(stats["worst"], diff)
            stats["q9999"] = max(stats["q9999"], float(np.quantile(np.abs(candidate - reference), 0.9999)))
            stats["differing"] += int(round((1.0 - same) * n))
            stats["voxels"] += n
            return reference

        for paths in _inputs(card, shared):
            volumes = check_channels([read_volume(p) for p in paths], card)
            segment_volumes(volumes, card, both, SegmentOptions())
    folder_text = str(card.folder)
    with contextlib.suppress(ValueError):
        folder_text = str(card.folder.relative_to(REPO_ROOT))
    return {"model": f"{card.id} {card.version}", "folder": folder_text, "max_abs_diff": stats["worst"],
            "q9999_abs_diff": stats["q9999"], "voxels": stats["voxels"], "labels_differing": stats["differing"],
            "label_agreement": 1.0 - stats["differing"] / max(1, stats["voxels"])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    args = parser.parse_args(argv)
    models = args.models or ["ct-abdomen-organs", "mr-brain-tumor"] + sorted(
        str(p.parent) for p in (REPO_ROOT / "benchmarks" / ".cache" / "loop").glob("*/*/model/model.json"))
    rows = []
    for model in models:
        row = measure(model, args.shared)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("| model | folder | max abs Δp | 99.99th pct abs Δp | voxels | labels differing |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['folder']} | {r['max_abs_diff']:.2e} | {r['q9999_abs_diff']:.2e} | "
              f"{r['voxels']} | {r['labels_differing']} ({100 * (1 - r['label_agreement']):.4f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
