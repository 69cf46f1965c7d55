"""The Slicer path (volume node → engine process → segmentation node) vs the CLI, same volume.

    python benchmarks/bench_slicer_path.py                           # default model, 512x512x200
    python benchmarks/bench_slicer_path.py --model FOLDER --slices 200 --repeat 3

- CLI: ``python -m MedSegAILib.cli segment CT.nrrd -o OUT.seg.nrrd --model M --progress none``
  timed from process start to exit (start-up, imports, model load, read, segment, write).
- Slicer path: the CT as a scalar volume node in slicer-core's real ``slicer.vtkMRMLScene``;
  ``slicer_logic.run_segmentation_blocking`` writes the node to a temporary file, runs the engine
  in a separate process (the same CLI, ``--progress json`` and measurements) and fills a
  segmentation node. Timed from the call to the filled node.
- Engine start-up: a fresh process that imports the engine and loads the model (nothing else).

Runs alternate (CLI, Slicer, CLI, Slicer, ...) so that machine noise hits both; medians are quoted.
Targets (issue 6): Slicer path ≤ 1.10 × CLI, engine start-up < 5 s on CPU.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_report, resolve_model_arg, synthetic_ct

STARTUP_CODE = (
    "import time; t=time.perf_counter(); from MedSegAILib.inference.pipeline import run_segmentation; "
    "from MedSegAILib.model.backends import load_predictor; from MedSegAILib.model.modelcard import find_model; "
    "p=load_predictor(find_model({model!r}), backend={backend!r}); print(p.name, time.perf_counter()-t)"
)


def cpu_total() -> float:
    """CPU seconds of this process and its finished children (robust to other jobs on the machine)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_startup(model: str, backend: str) -> tuple[float, float, str]:
    """(process wall seconds, in-process import+load seconds, backend)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", STARTUP_CODE.format(model=model, backend=backend)],
                          capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    name, inner = done.stdout.split()[-2:]
    return wall, float(inner), name


def time_cli(volume: Path, model: str, backend: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``medsegai segment`` process."""
    with tempfile.TemporaryDirectory(prefix="medsegai-bench-") as folder:
        start, cpu = time.perf_counter(), cpu_total()
        subprocess.run([sys.executable, "-m", "MedSegAILib.cli", "segment", str(volume), "-o", str(Path(folder) / "out.seg.nrrd"),
                        "--model", model, "--backend", backend, "--progress", "none"], check=True, capture_output=True)
        return time.perf_counter() - start, cpu_total() - cpu


def time_slicer(volume: Path, model: str, backend: str) -> tuple[float, float, dict]:
    import slicer
    from MedSegAILib.slicer_bridge import mrml, slicer_logic
    from MedSegAILib.io.imageio import read_volume

    scene = slicer.vtkMRMLScene()
    node = mrml.add_volume_node(scene, read_volume(volume), "CT")
    options = slicer_logic.EngineOptions(backend=backend)
    stages: dict[str, float] = {}
    start, cpu = time.perf_counter(), cpu_total()

    def progress(event: object) -> None:
        stages.setdefault(getattr(event, "stage", "?"), time.perf_counter() - start)

    result = slicer_logic.run_segmentation_blocking([node], model, options=options, progress=progress)
    seconds, cpu = time.perf_counter() - start, cpu_total() - cpu
    segments = result.segmentation_node.GetSegmentation().GetNumberOfSegments()
    scene.Clear(1)
    return seconds, cpu, {"first_event_s": {k: round(v, 3) for k, v in stages.items()}, "segments": segments}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = resolve_model_arg(args.model)
    volume = synthetic_ct((512, 512, args.slices))
    time_cli(volume, model, args.backend)  # warm the file cache once (not counted)

    startup = [time_startup(model, args.backend) for _ in range(args.repeat)]
    cli, slicer_runs, cli_cpu, slicer_cpu, details = [], [], [], [], {}
    for _ in range(args.repeat):
        wall, cpu = time_cli(volume, model, args.backend)
        cli.append(wall)
        cli_cpu.append(cpu)
        seconds, cpu, details = time_slicer(volume, model, args.backend)
        slicer_runs.append(seconds)
        slicer_cpu.append(cpu)
    ratio = median(slicer_runs) / median(cli)
    ratio_min = min(slicer_runs) / min(cli)
    ratio_cpu = median(slicer_cpu) / median(cli_cpu)
    rows = [
        {"what": "engine start-up (process + imports + model load)", "median_s": round(median([s[0] for s in startup]), 3),
         "all_s": [round(s[0], 2) for s in startup], "in_process_s": round(median([s[1] for s in startup]), 3),
         "backend": startup[0][2], "target": "< 5 s", "met": median([s[0] for s in startup]) < 5.0},
        {"what": "CLI (medsegai segment, whole process)", "median_s": round(median(cli), 3), "all_s": [round(s, 2) for s in cli],
         "min_s": round(min(cli), 3), "cpu_s": round(median(cli_cpu), 3)},
        {"what": "Slicer path (node → engine process → node)", "median_s": round(median(slicer_runs), 3),
         "all_s": [round(s, 2) for s in slicer_runs], "min_s": round(min(slicer_runs), 3),
         "cpu_s": round(median(slicer_cpu), 3), **details},
        {"what": "ratio Slicer / CLI (wall, medians)", "median_s": round(ratio, 3), "target": "<= 1.10", "met": ratio <= 1.10},
        {"what": "ratio Slicer / CLI (wall, best runs)", "median_s": round(ratio_min, 3), "target": "<= 1.10",
         "met": ratio_min <= 1.10},
        {"what": "ratio Slicer / CLI (CPU seconds, medians)", "median_s": round(ratio_cpu, 3), "target": "<= 1.10",
         "met": ratio_cpu <= 1.10},
    ]
    print_report("bench_slicer_path", rows, ["what", "median_s", "min_s", "cpu_s", "all_s", "in_process_s", "target", "met"])
    print(f"\nvolume 512x512x{args.slices}, model {Path(model).name}; machine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
