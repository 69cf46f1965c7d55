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


# ---------------------------------------------------------------------------------------------
# Added for the performance benchmarks (bench_memory, bench_scaling, bench_backends, ...)
# ---------------------------------------------------------------------------------------------

BENCH_DIR = Path(__file__).resolve().parent
CHILD_MARK = "@@bench-child@@"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (less sensitive to other jobs than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def machine() -> dict[str, Any]:
    """CPU model, core count, load average, date: what RESULTS.md quotes next to each figure."""
    import datetime
    import os
    import platform
    import subprocess

    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": cores,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
    }


def resolve_model_arg(model: str | None) -> str:
    """The model folder to benchmark: ``model`` (id or folder) or the shipped default model.

    Exits with a clear message when neither is there (build a stand-in with make_standin_models.py).
    """
    from MedSegAILib.core.errors import MedSegAIError
    from MedSegAILib.model.modelcard import find_model

    try:
        return str(find_model(model).folder)
    except MedSegAIError as e:
        raise SystemExit(
            f"error: {e}\nThe default model is not installed; pass --model FOLDER, e.g. a stand-in from "
            "`python benchmarks/make_standin_models.py /tmp/standin`."
        ) from e


def emit_child_result(result: dict[str, Any]) -> None:
    """Print a child's result on one marked line (read by :func:`run_child`)."""
    print(CHILD_MARK + json.dumps(result), flush=True)


def run_child(argv: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run ``python *argv`` in a fresh process and return the dict it emitted (or an ``error`` entry)."""
    import os
    import subprocess

    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    full_env.update(env or {})
    try:
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=full_env, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: " + " | ".join(tail)}


def segment_in_this_process(input_path: str, model: str, backend: str = "auto", output_suffix: str = ".seg.nrrd",
                            repeat_model_alone: bool = False) -> dict[str, Any]:
    """What ``medsegai segment INPUT -o TMP/out.seg.nrrd --model M`` does, measured (imports included).

    Returns wall/CPU seconds per stage, the end-to-end time (read → write, model load excluded and
    reported apart), and this process's peak RSS.
    """
    import tempfile
    import time

    start_all = time.perf_counter()
    from MedSegAILib.inference.pipeline import run_segmentation

    imports = time.perf_counter() - start_all
    with tempfile.TemporaryDirectory(prefix="medsegai-bench-") as folder:
        cpu_before = cpu_seconds()
        start = time.perf_counter()
        result = run_segmentation([input_path], Path(folder) / f"labels{output_suffix}", model, backend=backend,
                                  progress=None)
        wall = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_before
    timings = dict(result.timings)
    load = timings.get("model_load", 0.0)
    return {
        "backend": result.backend,
        "imports_s": round(imports, 3),
        **{f"{k}_s": round(v, 3) for k, v in timings.items()},
        "end_to_end_s": round(wall - load, 3),
        "wall_with_load_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def tiled_ct_512(slices: int = 200, path: Path | None = None) -> Path:
    """A 512×512×``slices`` CT (.nii.gz, int16) tiled from the shared real 512×512×20 DICOM series.

    ``../shared/data/ct-abdomen/example_ct_dicom`` (0.98×0.98×2 mm, JPEG 2000) is repeated along z,
    every other copy mirrored so the anatomy stays continuous at the seams; geometry kept
    (spacing, direction, origin of the first slice). Cached under ``benchmarks/.cache``.
    """
    import SimpleITK as sitk

    from MedSegAILib.io.imageio import read_volume

    path = path or CACHE / f"ct_512x512x{slices}_tiled.nii.gz"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    source = read_volume(REPO.parent / "shared" / "data" / "ct-abdomen" / "example_ct_dicom")
    array = np.asarray(source.array)
    copies = [array if i % 2 == 0 else array[::-1] for i in range(-(-slices // array.shape[0]))]
    tiled = np.concatenate(copies, axis=0)[:slices].astype(np.int16)
    image = sitk.GetImageFromArray(tiled)
    reference = source.to_sitk()
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    image.SetOrigin(reference.GetOrigin())
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    tmp.replace(path)
    return path
