"""``make demo``: segment the shipped sample CT with the default model and show the result.

Writes ``<output>/sample.seg.nrrd`` (open it in Slicer), ``<output>/measurements.csv`` and
``<output>/preview.png`` (three orthogonal slices with the segments overlaid and a legend), so the
result can be looked at without Slicer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .core.errors import MedSegAIInputError, optional_import

__all__ = ["sample_ct_path", "run_demo", "main"]


def sample_ct_path() -> Path:
    """The sample CT shipped in ``MedSegAI/Resources/SampleData`` (licence beside it)."""
    return Path(__file__).resolve().parents[1] / "Resources" / "SampleData" / "abdomen-ct.nii.gz"


def run_demo(output_dir: str | Path, model: str | None = None) -> dict[str, Path]:
    """Segment the sample CT into ``output_dir`` (replacing a previous demo run there).

    Returns:
        Paths of the written segmentation, measurements and preview image.
    """
    from .io.imageio import read_volume
    from .inference.pipeline import run_segmentation
    from .report.preview import render_preview
    from .progress import make_reporter

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "segmentation": output_dir / "sample.seg.nrrd",
        "measurements": output_dir / "measurements.csv",
        "preview": output_dir / "preview.png",
    }
    optional_import("matplotlib", "The demo's preview image")  # before any file is written
    sample = sample_ct_path()
    if not sample.is_file():
        raise MedSegAIInputError(f"the sample CT {sample} is missing; restore it with `git checkout -- {sample}`.")
    result = run_segmentation(
        [sample], paths["segmentation"], model=model, measurements=paths["measurements"], overwrite=True,
        progress=make_reporter(None),
    )
    image = read_volume(sample)
    render_preview(image, result.labels, [label.to_dict() for label in result.card.labels], paths["preview"], overwrite=True)
    print(f"model: {result.card.name} ({result.card.id} {result.card.version}, backend {result.backend})")
    timing = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.timings.items())
    print(f"time: {timing}")
    for row in result.measurements:
        print(f"  {row['name']:<14} {row['volume_ml']:9.1f} mL   max diameter {row['max_diameter_mm']:6.1f} mm")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSegAILib.demo", description=__doc__)
    parser.add_argument("--output", default="demo-output", help="folder for the demo's files")
    parser.add_argument("--model", default=None, help="model id or folder (default: the default model)")
    args = parser.parse_args(argv)
    try:
        run_demo(args.output, args.model)
    except MedSegAIInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
