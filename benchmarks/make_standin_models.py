"""Write stand-in model folders (random weights, real architecture) for benchmarking.

    python benchmarks/make_standin_models.py /tmp/standin            # 2D and 3D folders
    python benchmarks/make_standin_models.py /tmp/standin --only 2d

The 2D folder has exactly the network, spatial settings, labels and post-processing of the shipped
``ct-abdomen-organs`` recipe (``training/recipes/ct-abdomen-organs.json``: unet_2d, 6 labels +
background, base 8 filters, depth 4, patch 160×160, 2 mm in-plane, batch 16);
the 3D folder is a small unet_3d (base 8, depth 3, patch 32×128×128, 2 mm) used to measure the
engine's 3D path. Weights are random: the figures they give are the engine's and the
network's costs, not segmentation quality. Nothing is written inside the repository.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

RECIPE = Path(__file__).resolve().parents[1] / "training" / "recipes" / "ct-abdomen-organs.json"
LABELS = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "aorta"]


def _card(model_id: str, mode: str, patch: list[int], spacing: list[float | None], architecture: dict) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "id": model_id,
        "name": f"Benchmark stand-in ({mode})",
        "version": "0.0.1",
        "description": "Random weights; for timing and memory measurements only.",
        "license": "Apache-2.0",
        "channels": [{"name": "CT", "modality": "CT", "normalization": {"method": "ct", "clip": [-200, 300]}}],
        "labels": [
            {"name": name, "value": i + 1, "color": [0.2 + 0.1 * i, 0.5, 0.8 - 0.1 * i]} for i, name in enumerate(LABELS)
        ],
        "spatial": {
            "mode": mode,
            "axis": "axial",
            "orientation": "LPS",
            "patch_size": patch,
            "target_spacing": spacing,
            "divisible_by": 2 ** architecture["depth"],
        },
        "postprocessing": {"method": "argmax", "largest_component": ["liver", "spleen"], "fill_holes": True,
                           "min_island_mm3": 50},
        "architecture": {"builder": architecture["builder"], "config": architecture},
        "provenance": {"kind": "benchmark stand-in", "weights": "random (seed 0)"},
    }


def make(folder: Path, mode: str) -> Path:
    """Build, export and return one stand-in model folder (``folder`` must not exist)."""
    import keras
    from medsegai_training.export import export_model_folder
    from medsegai_training.models import build_model, resolve_config

    keras.utils.set_random_seed(0)
    if mode == "2d":
        recipe = json.loads(RECIPE.read_text(encoding="utf-8"))
        config = resolve_config({**recipe["model"], "num_classes": len(recipe["labels"]) + 1})
        patch, spacing = recipe["spatial"]["patch_size"], recipe["spatial"]["target_spacing"]
        sample = np.random.default_rng(0).normal(size=(2, *patch, 1)).astype(np.float32)
    else:
        config = resolve_config({"builder": "unet_3d", "num_classes": len(LABELS) + 1, "base_filters": 8, "depth": 3})
        patch, spacing = [32, 128, 128], [2.0, 2.0, 2.0]
        sample = np.random.default_rng(0).normal(size=(1, 32, 128, 128, 1)).astype(np.float32)
    model = build_model(copy.deepcopy(config))
    card = _card(f"bench-standin-{mode}", mode, patch, spacing, config)
    if mode == "2d":
        card["labels"] = [{k: v for k, v in label.items() if k != "source"} for label in recipe["labels"]]
        card["postprocessing"] = recipe["postprocessing"]
        card["spatial"]["batch_size"] = recipe["spatial"]["batch_size"]
    return export_model_folder(model, card, folder, sample)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="parent folder; writes bench-standin-2d/ and bench-standin-3d/")
    parser.add_argument("--only", choices=("2d", "3d"))
    args = parser.parse_args()
    for mode in (args.only,) if args.only else ("2d", "3d"):
        target = args.folder / f"bench-standin-{mode}"
        if target.exists():
            print(f"{target} exists; kept")
            continue
        print(make(target, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
