"""Time and peak memory of `medsegai segment` against volume size and thread count, 2D and 3D mode.

    python benchmarks/bench_scaling.py --model-2d ct-abdomen-organs --model-3d FOLDER_3D
    python benchmarks/bench_scaling.py --model-2d M2 --model-3d M3 --quick      # smaller grid

Every configuration runs in a fresh process (read → segment → write .seg.nrrd; model load
reported apart), so peak RSS and thread settings are its own.

- Size grid: in-plane 128², 256², 512² × 50, 200, 600 slices (``--quick``: 128²×50, 256²×200,
  512²×50, 512²×200, 512²×600). The volumes are the shipped sample CT resampled to each size over
  the SAME field of view, so the network's work depends on the model's target spacing (it is the
  same for every in-plane size of a 2D model with a fixed in-plane spacing, and for every size of
  a 3D model), while reading, mapping back, post-processing and writing grow with the voxel count.
- Threads: 1, 2 and 4 (``MEDSEGAI_THREADS`` and ``OMP_NUM_THREADS``) at 512²×200.

Prints one JSON document, then a table a user can read to predict the cost of a volume.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_report, resolve_model_arg, run_child, synthetic_ct

FULL_GRID = [(n, z) for n in (128, 256, 512) for z in (50, 200, 600)]
QUICK_GRID = [(128, 50), (256, 200), (512, 50), (512, 200), (512, 600)]
THREADS = (1, 2, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-2d", default=None)
    parser.add_argument("--model-3d", default=None)
    parser.add_argument("--quick", action="store_true", help="subsampled size grid")
    parser.add_argument("--no-threads", action="store_true", help="skip the thread sweep")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    models = {"2d": resolve_model_arg(args.model_2d)}
    if args.model_3d:
        models["3d"] = resolve_model_arg(args.model_3d)
    child = str(Path(__file__).resolve().parent / "bench_memory.py")
    grid = QUICK_GRID if args.quick else FULL_GRID
    rows = []

    def measure(mode: str, size: int, slices: int, threads: int | None) -> None:
        path = synthetic_ct((size, size, slices))
        env = {"MEDSEGAI_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)} if threads else None
        result = run_child([child, "--child", str(path), models[mode], "--backend", args.backend], env=env)
        voxels = size * size * slices
        rows.append({
            "mode": mode,
            "volume": f"{size}x{size}x{slices}",
            "mvoxels": round(voxels / 1e6, 1),
            "threads": threads or "default",
            "end_to_end_s": result.get("end_to_end_s"),
            "model_s": result.get("model_s"),
            "model_load_s": result.get("model_load_s"),
            "other_s": None if "end_to_end_s" not in result else round(result["end_to_end_s"] - result.get("model_s", 0.0), 3),
            "cpu_s": result.get("cpu_s"),
            "peak_rss_mb": result.get("peak_rss_mb"),
            "s_per_100_slices": None if "end_to_end_s" not in result else round(100 * result["end_to_end_s"] / slices, 2),
            "error": result.get("error"),
        })
        print(rows[-1], file=sys.stderr, flush=True)

    for mode in models:
        for size, slices in grid:
            measure(mode, size, slices, None)
    if not args.no_threads:
        for mode in models:
            for threads in THREADS:
                measure(mode, 512, 200, threads)
    print_report("bench_scaling", rows, ["mode", "volume", "mvoxels", "threads", "end_to_end_s", "model_s", "other_s",
                                         "cpu_s", "peak_rss_mb", "s_per_100_slices", "error"])
    print(f"\nmodels: {models}\nmachine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
