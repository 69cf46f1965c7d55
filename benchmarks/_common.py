"""Shared helpers for the benchmark scripts (not a test module)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "MedSegAI" / "Resources" / "SampleData" / "abdomen-ct.nii.gz"
CACHE = REPO / "benchmarks" / ".cache"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_ct(size_xyz: tuple[int, int, int], path: Path | None = None) -> Path:
    """The shipped sample CT resampled to ``size_xyz`` voxels over the same field of view (int16 .nrrd).

    Real anatomy at a realistic size; cached under ``benchmarks/.cache``.
    """
    import SimpleITK as sitk

    path = path or CACHE / f"ct_{size_xyz[0]}x{size_xyz[1]}x{size_xyz[2]}.nrrd"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(SAMPLE_CT))
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    spacing = extent / np.array(size_xyz)
    resampled = sitk.Resample(
        image, [int(s) for s in size_xyz], sitk.Transform(), sitk.sitkLinear,
        image.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * s / o for s, o in zip(spacing, image.GetSpacing())]),
        spacing.tolist(), image.GetDirection(), -1024.0, sitk.sitkInt16,
    )
    sitk.WriteImage(resampled, str(path), useCompression=False)
    return path


def print_report(title: str, rows: list[dict[str, Any]], columns: list[str], as_json: bool = True) -> None:
    """JSON (one document) on stdout, then an aligned table."""
    if as_json:
        print(json.dumps({"benchmark": title, "results": rows}, indent=2))
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print(f"\n{title}", file=sys.stdout)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)
