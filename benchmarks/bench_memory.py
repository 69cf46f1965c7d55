"""Peak resident memory of `medsegai segment` against volume size, 2D and 3D mode.

    python benchmarks/bench_memory.py --model-2d ct-abdomen-organs --model-3d FOLDER_3D
    python benchmarks/bench_memory.py --model-2d /tmp/standin/bench-standin-2d \
        --model-3d /tmp/standin/bench-standin-3d --slices 200 400 600

Each configuration runs in a fresh Python process (read → segment → write a .seg.nrrd, exactly what
the CLI does) so its peak RSS (``getrusage`` ``ru_maxrss``) is its own. A "baseline" process that
only imports the engine and loads the model gives the fixed cost; what the volume adds is
``peak - baseline``. The input is a 512×512×Z int16 CT (the shipped sample CT resampled; Z × 0.5 MB).

Target (issue 6): peak < 3 GB at 512×512×600 in 2D and 3D, growing with the volume (a few bytes a
voxel), not with volume × classes × 4 bytes. Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    emit_child_result,
    machine,
    peak_rss_mb,
    print_report,
    resolve_model_arg,
    run_child,
    segment_in_this_process,
    synthetic_ct,
)

TARGET_MB = 3 * 1024


def child_baseline(model: str, backend: str) -> dict:
    """Imports + model load only."""
    start = time.perf_counter()
    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.model.modelcard import find_model

    predictor = load_predictor(find_model(model), backend=backend)
    return {"backend": predictor.name, "startup_s": round(time.perf_counter() - start, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-2d", default=None, help="2D model id or folder (default: the shipped default model)")
    parser.add_argument("--model-3d", default=None, help="3D model id or folder (skipped when not given)")
    parser.add_argument("--slices", nargs="+", type=int, default=[200, 400, 600])
    parser.add_argument("--size", type=int, default=512, help="in-plane size (default 512)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--child", nargs=2, metavar=("INPUT", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--child-baseline", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit_child_result(segment_in_this_process(args.child[0], args.child[1], args.backend))
        return 0
    if args.child_baseline:
        emit_child_result(child_baseline(args.child_baseline, args.backend))
        return 0

    models = {"2d": resolve_model_arg(args.model_2d)}
    if args.model_3d:
        models["3d"] = resolve_model_arg(args.model_3d)
    rows = []
    script = str(Path(__file__).resolve())
    for mode, model in models.items():
        base = run_child([script, "--child-baseline", model, "--backend", args.backend])
        rows.append({"mode": mode, "model": Path(model).name, "volume": "baseline (imports + model)",
                     "input_mb": 0.0, "peak_rss_mb": base.get("peak_rss_mb"), "added_mb": 0.0,
                     "error": base.get("error")})
        for slices in args.slices:
            path = synthetic_ct((args.size, args.size, slices))
            result = run_child([script, "--child", str(path), model, "--backend", args.backend])
            peak = result.get("peak_rss_mb")
            input_mb = args.size * args.size * slices * 2 / 2**20
            added = None if peak is None or base.get("peak_rss_mb") is None else peak - base["peak_rss_mb"]
            rows.append({
                "mode": mode,
                "model": Path(model).name,
                "volume": f"{args.size}x{args.size}x{slices}",
                "input_mb": round(input_mb, 1),
                "peak_rss_mb": peak,
                "added_mb": None if added is None else round(added, 1),
                "added_bytes_per_voxel": None if added is None else round(added * 2**20 / (args.size**2 * slices), 2),
                "under_3gb": None if peak is None else peak < TARGET_MB,
                "end_to_end_s": result.get("end_to_end_s"),
                "backend": result.get("backend"),
                "error": result.get("error"),
            })
    print_report("bench_memory", rows, ["mode", "model", "volume", "input_mb", "peak_rss_mb", "added_mb",
                                         "added_bytes_per_voxel", "under_3gb", "end_to_end_s", "error"])
    print(f"\nmachine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
