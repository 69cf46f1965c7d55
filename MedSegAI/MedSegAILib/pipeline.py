"""The one segmentation pipeline behind both the ``medsegai`` command line and the Slicer module.

read → check → preprocess/model/stitch (``inference.segment_volumes``) → postprocess → write.
Outputs are written atomically; nothing that exists is overwritten unless asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import MedSegAIInputError
from .image import Volume
from .modelcard import ModelCard, find_model

__all__ = ["SegmentationResult", "output_kind", "segment_case", "run_segmentation"]

ProgressCallback = Callable[[str, int, int, str], None]
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd")


@dataclass
class SegmentationResult:
    """What a run produced."""

    labels: Volume
    card: ModelCard
    backend: str
    device: str
    output: Path | None = None
    measurements: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def output_kind(path: str | Path) -> str:
    """``"segmentation"`` for ``.seg.nrrd``, ``"labelmap"`` for other image suffixes.

    Raises:
        MedSegAIInputError: the suffix is not one MedSegAI writes.
    """
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        return "segmentation"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise MedSegAIInputError(
        f"cannot write '{Path(path).name}': the output must end with .seg.nrrd (Slicer segmentation) "
        f"or {', '.join(LABELMAP_SUFFIXES)} (labelmap)."
    )


def _check_output_free(path: Path | None, overwrite: bool) -> None:
    if path is not None and path.exists() and not overwrite:
        raise MedSegAIInputError(f"{path} already exists; choose another output name or pass --overwrite.")
    if path is not None and not path.parent.is_dir():
        raise MedSegAIInputError(f"the folder of {path} does not exist; create it first.")


def segment_case(
    volumes: Sequence[Volume],
    model: str | Path | ModelCard | None = None,
    backend: str = "auto",
    device: str = "auto",
    options: object | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    timings: dict[str, float] | None = None,
    predictor: object | None = None,
    sources: Sequence[str] | None = None,
) -> tuple[Volume, ModelCard]:
    """Segment already-loaded channel volumes.

    Args:
        volumes: one ``Volume`` per model channel, in the model's channel order.
        model: a model id, a model folder, a loaded card, or ``None`` for the default model.
        backend: one of :data:`MedSegAILib.backends.BACKENDS` (``auto``, ``onnx``, ``tensorflow``, ``tflite``).
        device: ``auto``, ``cpu`` or ``gpu``.
        options: ``inference.SegmentOptions`` (overlap, tta, batch size, post-processing).
        progress: ``(stage, done, total, message)`` callback.
        should_cancel: polled between batches; returning True raises ``CancelledError``.
        timings: filled with seconds per stage (``model_load`` plus the engine's stages).
        predictor: an already-loaded predictor for this card (skips loading).
        sources: what to call each input in error messages (e.g. its file name).

    Returns:
        ``(labels, card)``: uint8 labels on exactly the first volume's grid, and the model card.
    """
    from .backends import load_predictor
    from .inference import SegmentOptions, segment_volumes
    from .validation import check_channels

    card = model if isinstance(model, ModelCard) else find_model(model)
    checked = check_channels(list(volumes), card.channel_names, sources=sources)
    timings = timings if timings is not None else {}
    if predictor is None:
        start = time.perf_counter()
        predictor = load_predictor(card, backend=backend, device=device)
        timings["model_load"] = time.perf_counter() - start
    labels = segment_volumes(
        checked,
        card,
        predictor.predict,  # type: ignore[attr-defined]
        options=options if options is not None else SegmentOptions(),
        progress=progress,
        should_cancel=should_cancel,
        timings=timings,
    )
    return labels, card


def run_segmentation(
    inputs: Sequence[str | Path],
    output: str | Path,
    model: str | Path | None = None,
    series_uid: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    options: object | None = None,
    measurements: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    report: str | Path | None = None,
    report_identify: bool = False,
) -> SegmentationResult:
    """Read input files, segment them, write the output (and measurements). What ``medsegai segment`` does.

    ``report`` also writes the one-page PDF case report (:func:`MedSegAILib.report.write_case_report`);
    ``report_identify`` puts the DICOM input's patient name, id and birth date into it.

    Raises:
        MedSegAIInputError: any problem with the inputs, the model or the output paths; raised
            before any work where it can be known up front.
        CancelledError: ``should_cancel`` returned True; no output file is left behind.
    """
    from .backends import load_predictor
    from .imageio import read_volume, write_volume
    from .measurements import compute_measurements, write_measurements
    from .segfile import write_segmentation

    output = Path(output).expanduser()
    kind = output_kind(output)
    _check_output_free(output, overwrite)
    measurements_path = Path(measurements).expanduser() if measurements else None
    if measurements_path is not None:
        if measurements_path.suffix.lower() not in (".csv", ".json"):
            raise MedSegAIInputError(f"--measurements must end with .csv or .json, not '{measurements_path.name}'.")
        _check_output_free(measurements_path, overwrite)
    report_path = None
    if report:
        from .report import check_report_path

        report_path = check_report_path(report, overwrite)
    elif report_identify:
        raise MedSegAIInputError("--report-identify needs --report FILE.pdf; add the report path or drop --report-identify.")
    card = find_model(model)
    if len(inputs) != len(card.channels):
        raise MedSegAIInputError(
            f"model '{card.id}' needs {len(card.channels)} input(s) in this order: {', '.join(card.channel_names)}; "
            f"got {len(inputs)}."
        )

    timings: dict[str, float] = {}
    start = time.perf_counter()
    volumes = []
    for index, path in enumerate(inputs):
        if progress:
            progress("read", index, len(inputs), f"reading {card.channel_names[index]}")
        volumes.append(read_volume(path, series_uid=series_uid))
    if progress:
        progress("read", len(inputs), len(inputs), "")
    timings["read"] = time.perf_counter() - start

    start = time.perf_counter()
    predictor = load_predictor(card, backend=backend, device=device)
    timings["model_load"] = time.perf_counter() - start

    labels, card = segment_case(
        volumes, card, options=options, progress=progress, should_cancel=should_cancel,
        timings=timings, predictor=predictor, sources=[Path(path).name for path in inputs],
    )

    start = time.perf_counter()
    if progress:
        progress("write", 0, 1, output.name)
    labels_spec = [label.to_dict() for label in card.labels]
    if kind == "segmentation":
        write_segmentation(output, labels, labels_spec, overwrite=overwrite)
    else:
        write_volume(output, labels, overwrite=overwrite)
    rows: list[dict] = []
    if measurements_path is not None or report_path is not None:
        rows = compute_measurements(labels, labels_spec)
    if measurements_path is not None:
        write_measurements(measurements_path, rows, overwrite=overwrite)
    if report_path is not None:
        from .report import patient_identity, write_case_report

        identity = patient_identity(inputs[0], series_uid) if report_identify else None
        write_case_report(
            report_path, volumes[0], labels, card, inputs=volumes, measurements=rows, identity=identity,
            backend=f"{predictor.name}, {predictor.device}", overwrite=overwrite,
        )
    if progress:
        progress("write", 1, 1, output.name)
    timings["write"] = time.perf_counter() - start
    return SegmentationResult(
        labels=labels, card=card, backend=predictor.name, device=predictor.device,
        output=output, measurements=rows, timings=timings,
    )
