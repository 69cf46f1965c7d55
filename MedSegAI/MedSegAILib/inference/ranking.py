"""Which case to correct next: segment several cases and order them by expected error (``medsegai rank``).

A case is one INPUT: for a one-channel model an image file or a DICOM series folder (as
``segment`` takes it); for a model with several channels a folder holding one entry per channel
named after it (``T1post.nrrd`` or a ``T1post/`` DICOM folder, any image suffix), in any order.

The score (:func:`case_score`) is the expected error: the uncertain volume (voxels at or above
:func:`uncertainty.uncertain_level`) divided by the predicted foreground volume plus the uncertain
volume — a stand-in for ``1 − Dice`` that is high when the model is unsure about a large part of
what it segments (chosen by measurement, ``benchmarks/bench_uncertainty.py``). Cases are processed
one at a time with one loaded network; only the case index and the input's base name (as given by
the user) reach the CSV.
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..core.errors import MedSegAIInputError
from ..core.image import Volume
from ..io.imageio import SUPPORTED_SUFFIXES, atomic_output, full_suffix
from .uncertainty import SCALE, uncertain_level

__all__ = ["RANKING_COLUMNS", "CaseScore", "case_channel_paths", "case_score", "rank_cases", "write_ranking"]

RANKING_COLUMNS = ("rank", "case", "input", "expected_error", "uncertain_ml", "foreground_ml", "mean_uncertainty", "seconds")


@dataclass
class CaseScore:
    """The figures of one segmented case (volumes in mL, ``mean_uncertainty`` on the 0–1 scale)."""

    expected_error: float
    uncertain_ml: float
    foreground_ml: float
    mean_uncertainty: float


def case_score(labels: Volume, uncertainty: Volume, num_classes: int) -> CaseScore:
    """Expected error of one segmentation from its uncertainty map.

    Args:
        labels: uint8 ``(z, y, x)`` labels (0 = background).
        uncertainty: uint8 map on the same grid (0 certain … 255 maximal).
        num_classes: the model's class count (background included), for the "uncertain" level.

    Returns:
        ``expected_error = uncertain / (foreground + uncertain)`` (voxel counts; 0 when both are
        0), the two volumes in mL and the mean map value over foreground ∪ uncertain voxels.
    """
    labels_array, map_array = np.asarray(labels.array), np.asarray(uncertainty.array)
    if labels_array.shape != map_array.shape:
        raise ValueError(f"labels {labels_array.shape} and uncertainty {map_array.shape} differ in shape")
    level = uncertain_level(num_classes)
    uncertain = map_array >= level
    foreground = labels_array > 0
    n_uncertain, n_foreground = int(np.count_nonzero(uncertain)), int(np.count_nonzero(foreground))
    union = uncertain | foreground
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    mean = float(map_array[union].mean()) / SCALE if union.any() else 0.0
    error = n_uncertain / (n_foreground + n_uncertain) if n_uncertain + n_foreground else 0.0
    return CaseScore(round(error, 6), round(n_uncertain * voxel_ml, 4), round(n_foreground * voxel_ml, 4), round(mean, 6))


def _find_channel(folder: Path, name: str) -> Path | None:
    matches = [entry for entry in sorted(folder.iterdir())
               if (entry.is_dir() and entry.name == name)
               or (entry.is_file() and full_suffix(entry) in SUPPORTED_SUFFIXES
                   and entry.name[: -len(full_suffix(entry))] == name)]
    return matches[0] if matches else None


def case_channel_paths(case: str | os.PathLike, channel_names: Sequence[str]) -> list[Path]:
    """The input path of each channel of one case (see the module docstring).

    Raises:
        MedSegAIInputError: the case does not exist, or a multi-channel case folder lacks a channel.
    """
    path = Path(case).expanduser()
    if not path.exists():
        raise MedSegAIInputError(f"input {path} does not exist; check the path.")
    if len(channel_names) == 1:
        return [path]
    if not path.is_dir():
        raise MedSegAIInputError(
            f"the model takes {len(channel_names)} channels ({', '.join(channel_names)}), so each INPUT must be a case folder "
            f"holding one image or DICOM folder per channel, named after it; {path.name} is a file."
        )
    found = [_find_channel(path, name) for name in channel_names]
    missing = [name for name, entry in zip(channel_names, found) if entry is None]
    if missing:
        raise MedSegAIInputError(
            f"case folder {path.name} has no {', '.join(missing)} (needed: {', '.join(channel_names)} as <name>.nrrd/.nii.gz/... "
            f"or <name>/ DICOM folders); add them or leave the case out."
        )
    return [entry for entry in found if entry is not None]


def rank_cases(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    model: str | os.PathLike | None = None,
    backend: str = "auto",
    device: str = "auto",
    options: Any = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """Segment every case, score it and write the ranking CSV (highest expected error first).

    Every input and the output path are checked before any work. Returns the CSV rows.

    Raises:
        MedSegAIInputError: no input, a missing case or channel, an output that exists without
            ``overwrite`` or that is not ``.csv``, a model that cannot give an uncertainty map.
        CancelledError: ``should_cancel`` returned True (no CSV is written).
    """
    from ..model.backends import load_predictor
    from ..io.imageio import read_volume
    from ..model.modelcard import find_model
    from .pipeline import segment_case

    if not inputs:
        raise MedSegAIInputError("no INPUT given; pass one image, DICOM folder or case folder per case.")
    output = Path(output).expanduser()
    if full_suffix(output) != ".csv":
        raise MedSegAIInputError(f"the ranking must be a .csv file, not '{output.name}'.")
    if output.exists() and not overwrite:
        raise MedSegAIInputError(f"{output} already exists; choose another -o name or pass --overwrite.")
    if not output.parent.is_dir():
        raise MedSegAIInputError(f"the folder of {output} does not exist; create it first.")
    card = find_model(model)
    cases = [case_channel_paths(case, card.channel_names) for case in inputs]
    predictor = load_predictor(card, backend=backend, device=device, precision=getattr(options, "precision", "auto"))
    rows = []
    for index, (case, paths) in enumerate(zip(inputs, cases)):
        started = time.perf_counter()
        name = Path(case).name
        if progress:
            progress("read", index, len(cases), f"case {index + 1} of {len(cases)}")
        volumes = [read_volume(path) for path in paths]
        uncertainty = np.zeros(np.asarray(volumes[0].array).shape, dtype=np.uint8)
        labels, _ = segment_case(volumes, card, options=options, should_cancel=should_cancel, predictor=predictor,
                                 sources=[path.name for path in paths], uncertainty=uncertainty)
        score = case_score(labels, labels.with_array(uncertainty), card.num_classes)
        rows.append({"case": index + 1, "input": name, **score.__dict__,
                     "seconds": round(time.perf_counter() - started, 2)})
        del volumes, labels, uncertainty
    rows.sort(key=lambda row: (-row["expected_error"], row["case"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    write_ranking(output, rows, overwrite=overwrite)
    return rows


def write_ranking(path: str | os.PathLike, rows: Sequence[dict[str, Any]], overwrite: bool = False) -> Path:
    """Write ranking rows (:data:`RANKING_COLUMNS`) atomically as CSV."""
    path = Path(path)
    with atomic_output(path, overwrite) as temp:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(RANKING_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
    return path
