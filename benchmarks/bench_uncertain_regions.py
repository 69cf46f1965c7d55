"""Cost of ranking uncertain regions (what the panel does once per Segment with Show uncertainty).

    python benchmarks/bench_uncertain_regions.py                      # 300x512x512, three organs, specks
    python benchmarks/bench_uncertain_regions.py --slices 150 --speck-rate 0

A synthetic map on a CT-sized grid: the one-voxel boundary bands of three spheres (uncertain, level
200) and random specks (level 150) at ``--speck-rate`` of the voxels, most of them in the background
so each needs the shell search for its label. Prints the time and peak memory of
``rank_regions`` for all regions and for the first 100 (numpy allocations, tracemalloc), and the
region count.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSegAI"))
from MedSegAILib.report.uncertain_regions import rank_regions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--speck-rate", type=float, default=2e-4)
    parser.add_argument("--threshold", type=int, default=120)
    args = parser.parse_args()
    shape = (args.slices, args.size, args.size)
    rng = np.random.default_rng(0)
    labels = np.zeros(shape, np.uint8)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    s = args.size / 512.0
    for value, (centre, radius) in enumerate([((0.5, 256, 200), 80), ((0.5, 256, 380), 50), ((0.27, 150, 150), 30)], start=1):
        cz = centre[0] * shape[0]
        inside = (zz - cz) ** 2 + (yy - centre[1] * s) ** 2 + (xx - centre[2] * s) ** 2 < (radius * s) ** 2
        labels[inside] = value
    uncertainty = np.zeros(shape, np.uint8)
    for value in (1, 2, 3):
        mask = labels == value
        uncertainty[ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)] = 200
    count = int(args.speck_rate * uncertainty.size)
    uncertainty.reshape(-1)[rng.choice(uncertainty.size, size=count, replace=False)] = 150
    del zz, yy, xx
    print(f"grid {shape[2]}x{shape[1]}x{shape[0]} ({np.prod(shape) / 1e6:.0f} M voxels), "
          f"{np.count_nonzero(uncertainty >= args.threshold)} uncertain voxels")
    for max_regions in (None, 100):
        started = time.perf_counter()
        regions = rank_regions(uncertainty, labels, (0.8, 0.8, 1.5), args.threshold, max_regions=max_regions)
        seconds = time.perf_counter() - started
        tracemalloc.start()  # a second pass for memory: tracing slows the many small allocations
        rank_regions(uncertainty, labels, (0.8, 0.8, 1.5), args.threshold, max_regions=max_regions)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        print(f"rank_regions(max_regions={max_regions}): {len(regions)} regions in {seconds:.2f} s, "
              f"peak {peak:.0f} MiB allocated beyond its inputs ({uncertainty.nbytes / 2**20:.0f} MiB map + "
              f"{labels.nbytes / 2**20:.0f} MiB labels); first: {regions[0].voxel_count} voxels, label {regions[0].label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
