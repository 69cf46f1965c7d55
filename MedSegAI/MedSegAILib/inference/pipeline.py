"""The one segmentation pipeline behind both the ``medsegai`` command line and the Slicer module.

read → check → preprocess/model/stitch (``inference.segment_volumes``) → postprocess → write.
Outputs are written atomically; nothing that exists is overwritten unless asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core.errors import MedSegAIInputError, optional_import
from ..core.image import Volume
from ..model.modelcard import ModelCard, find_model
from ..protocol import READ, WRITE

__all__ = ["SegmentationResult", "check_uncertainty_path", "output_kind", "segment_case", "run_segmentation"]

ProgressCallback = Callable[[str, int, int, str], None]
LABELMAP_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha", ".mhd")
DICOM_SEG_SUFFIX = ".dcm"


@dataclass
class SegmentationResult:
    """What a run produced."""

    labels: Volume
    card: ModelCard
    backend: str
    device: str
    precision: str = "fp32"
    output: Path | None = None
    dicom_seg: Path | None = None
    measurements: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    uncertainty: Volume | None = None
    uncertainty_path: Path | None = None


def output_kind(path: str | Path) -> str:
    """``"segmentation"`` for ``.seg.nrrd``, ``"dicom-seg"`` for ``.dcm``, ``"labelmap"`` for other image suffixes.

    Raises:
        MedSegAIInputError: the suffix is not one MedSegAI writes.
    """
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        return "segmentation"
    if name.endswith(DICOM_SEG_SUFFIX):
        return "dicom-seg"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise MedSegAIInputError(
        f"cannot write '{Path(path).name}': the output must end with .seg.nrrd (Slicer segmentation), "
        f".dcm (DICOM SEG) or {', '.join(LABELMAP_SUFFIXES)} (labelmap)."
    )


def check_uncertainty_path(path: str | Path, overwrite: bool, others: Sequence[Path | None] = ()) -> Path:
    """The ``--uncertainty`` output checked before any work: an image suffix, free (or ``overwrite``), not another output.

    Raises:
        MedSegAIInputError: what is wrong and what to do.
    """
    path = Path(path).expanduser()
    name = path.name.lower()
    if name.endswith((".seg.nrrd", DICOM_SEG_SUFFIX)) or not name.endswith(LABELMAP_SUFFIXES):
        raise MedSegAIInputError(
            f"the uncertainty map '{path.name}' must be an image file ending with {', '.join(LABELMAP_SUFFIXES)} "
            f"(not .seg.nrrd or .dcm); choose such a name."
        )
    for other in others:
        if other is not None and other.resolve() == path.resolve():
            raise MedSegAIInputError(f"the uncertainty map and another output are the same file ({path.name}); give it its own name.")
    if path.exists() and not overwrite:
        raise MedSegAIInputError(f"{path} already exists; choose another --uncertainty name or pass --overwrite.")
    _check_output_free(path, overwrite)
    return path


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
    uncertainty: np.ndarray | None = None,
) -> tuple[Volume, ModelCard]:
    """Segment already-loaded channel volumes.

    Args:
        volumes: one ``Volume`` per model channel, in the model's channel order.
        model: a model id, a model folder, a loaded card, or ``None`` for the default model.
        backend: one of :data:`MedSegAILib.model.backends.BACKENDS` (``auto``, ``onnx``, ``tensorflow``, ``tflite``).
        device: ``auto``, ``cpu`` or ``gpu``.
        options: ``inference.SegmentOptions`` (overlap, tta, batch size, post-processing).
        progress: ``(stage, done, total, message)`` callback.
        should_cancel: polled between batches; returning True raises ``CancelledError``.
        timings: filled with seconds per stage (``model_load`` plus the engine's stages).
        predictor: an already-loaded predictor for this card (skips loading).
        sources: what to call each input in error messages (e.g. its file name).
        uncertainty: a uint8 ``(z, y, x)`` array of the first volume's shape, filled with the
            uncertainty map (:mod:`MedSegAILib.inference.uncertainty`; 0 certain … 255 maximal).

    Returns:
        ``(labels, card)``: uint8 labels on exactly the first volume's grid, and the model card.
    """
    from ..model.backends import load_predictor
    from .segment import SegmentOptions, cpu_batch_size, segment_volumes
    from .validation import check_channels

    card = model if isinstance(model, ModelCard) else find_model(model)
    checked = check_channels(list(volumes), card.channel_names, sources=sources)
    timings = timings if timings is not None else {}
    if predictor is None:
        start = time.perf_counter()
        predictor = load_predictor(card, backend=backend, device=device, precision=getattr(options, "precision", "auto"))
        timings["model_load"] = time.perf_counter() - start
    options = options if options is not None else SegmentOptions()
    if options.batch_size is None and getattr(predictor, "device", "cpu") == "cpu":
        options = replace(options, batch_size=cpu_batch_size(card))  # same speed, less memory
    labels = segment_volumes(
        checked,
        card,
        predictor.predict,  # type: ignore[attr-defined]
        options=options,
        progress=progress,
        should_cancel=should_cancel,
        timings=timings,
        uncertainty=uncertainty,
    )
    return labels, card


def run_segmentation(
    inputs: Sequence[str | Path],
    output: str | Path | None,
    model: str | Path | None = None,
    series_uid: str | None = None,
    backend: str = "auto",
    device: str = "auto",
    options: object | None = None,
    measurements: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    dicom_seg: str | Path | None = None,
    report: str | Path | None = None,
    report_identify: bool = False,
    uncertainty: str | Path | None = None,
) -> SegmentationResult:
    """Read input files, segment them, write the output (and measurements). What ``medsegai segment`` does.

    Args:
        output: ``.seg.nrrd``, ``.dcm`` (DICOM SEG) or labelmap file; ``None`` when only
            ``dicom_seg`` is wanted.
        dicom_seg: also write a DICOM SEG here (the first input must then be a DICOM folder).
        report: also write the one-page PDF case report here (:func:`MedSegAILib.report.case_report.write_case_report`).
        report_identify: put the DICOM input's patient name, id and birth date into the report.
        uncertainty: also write the uint8 uncertainty map here (``.nrrd``/``.nii.gz``/...: on the
            first input's exact grid; 0 certain … 255 maximal, :mod:`MedSegAILib.inference.uncertainty`);
            the measurements then gain ``mean_uncertainty`` and ``uncertain_ml_near``.

    Raises:
        MedSegAIInputError: any problem with the inputs, the model or the output paths; raised
            before any work where it can be known up front.
        CancelledError: ``should_cancel`` returned True; no output file is left behind.
    """
    from ..model.backends import load_predictor
    from ..io.imageio import read_volume, write_volume
    from ..report.measurements import compute_measurements, write_measurements
    from ..io.segfile import write_segmentation

    output = Path(output).expanduser() if output is not None else None
    dicom_seg = Path(dicom_seg).expanduser() if dicom_seg is not None else None
    if output is None and dicom_seg is None:
        raise MedSegAIInputError("no output given; pass -o OUTPUT (or --dicom-seg FILE).")
    kind = output_kind(output) if output is not None else None
    if kind == "dicom-seg":
        if dicom_seg is not None:
            raise MedSegAIInputError("-o already names a DICOM SEG (.dcm); drop --dicom-seg or give -o another type.")
        output, dicom_seg, kind = None, output, None
    if dicom_seg is not None and not dicom_seg.name.lower().endswith(DICOM_SEG_SUFFIX):
        raise MedSegAIInputError(f"the DICOM SEG output must end with .dcm, not '{dicom_seg.name}'.")
    if dicom_seg is not None and output is not None and dicom_seg.resolve() == output.resolve():
        raise MedSegAIInputError("the DICOM SEG and the other output are the same file; give them different names.")
    for path in (output, dicom_seg):
        _check_output_free(path, overwrite)
    if kind == "segmentation":
        optional_import("slicerio", "Writing a .seg.nrrd segmentation")  # say so before the work, not after
    if dicom_seg is not None and inputs and Path(inputs[0]).exists() and not Path(inputs[0]).is_dir():
        raise MedSegAIInputError(
            "a DICOM SEG output (.dcm) needs a DICOM series folder as the (first) input, because the SEG "
            "references its images; write a .seg.nrrd or labelmap output for other inputs."
        )
    if dicom_seg is not None:
        from ..io.dicomseg import require_highdicom

        require_highdicom()
    measurements_path = Path(measurements).expanduser() if measurements else None
    if measurements_path is not None:
        if measurements_path.suffix.lower() not in (".csv", ".json"):
            raise MedSegAIInputError(f"--measurements must end with .csv or .json, not '{measurements_path.name}'.")
        _check_output_free(measurements_path, overwrite)
    report_path = None
    if report:
        from ..report.case_report import check_report_path

        report_path = check_report_path(report, overwrite)
    elif report_identify:
        raise MedSegAIInputError("--report-identify needs --report FILE.pdf; add the report path or drop --report-identify.")
    uncertainty_path = None
    if uncertainty:
        uncertainty_path = check_uncertainty_path(uncertainty, overwrite, (output, dicom_seg, measurements_path))
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
            progress(READ, index, len(inputs), f"reading {card.channel_names[index]}")
        volumes.append(read_volume(path, series_uid=series_uid))
    source_headers = None
    if dicom_seg is not None:
        from ..io.dicomseg import check_source_headers, read_source_headers

        source_headers = check_source_headers(read_source_headers(inputs[0], volumes[0].metadata.get("series_uid", "")))
    if progress:
        progress(READ, len(inputs), len(inputs), "")
    timings["read"] = time.perf_counter() - start

    start = time.perf_counter()
    predictor = load_predictor(card, backend=backend, device=device, precision=getattr(options, "precision", "auto"))
    timings["model_load"] = time.perf_counter() - start

    uncertainty_array = None
    if uncertainty_path is not None:
        uncertainty_array = np.zeros(np.asarray(volumes[0].array).shape, dtype=np.uint8)
    labels, card = segment_case(
        volumes, card, options=options, progress=progress, should_cancel=should_cancel,
        timings=timings, predictor=predictor, sources=[Path(path).name for path in inputs],
        uncertainty=uncertainty_array,
    )
    uncertainty_volume = labels.with_array(uncertainty_array) if uncertainty_array is not None else None

    start = time.perf_counter()
    name = (output or dicom_seg).name  # type: ignore[union-attr]
    if progress:
        progress(WRITE, 0, 1, name)
    labels_spec = [label.to_dict() for label in card.labels]
    seg_dataset = None
    if source_headers is not None:
        from ..io.dicomseg import build_dicom_seg

        seg_dataset = build_dicom_seg(labels, labels_spec, source_headers, card.id, card.version, card.name)
    written: list[Path] = []
    try:
        if kind == "segmentation":
            written.append(write_segmentation(output, labels, labels_spec, overwrite=overwrite))
        elif kind == "labelmap":
            written.append(write_volume(output, labels, overwrite=overwrite))
        if uncertainty_volume is not None:
            written.append(write_volume(uncertainty_path, uncertainty_volume, overwrite=overwrite))
        if seg_dataset is not None:
            from ..io.dicomseg import write_dicom_seg

            written.append(write_dicom_seg(dicom_seg, seg_dataset, overwrite=overwrite))
        rows: list[dict] = []
        if measurements_path is not None or report_path is not None:
            rows = compute_measurements(labels, labels_spec)
            if uncertainty_volume is not None:
                from .uncertainty import uncertainty_measurements

                uncertainty_measurements(labels, uncertainty_volume, rows, card.num_classes)
        if measurements_path is not None:
            written.append(write_measurements(measurements_path, rows, overwrite=overwrite))
        if report_path is not None:
            from ..report.case_report import patient_identity, write_case_report

            identity = patient_identity(inputs[0], series_uid) if report_identify else None
            written.append(Path(write_case_report(
                report_path, volumes[0], labels, card, inputs=volumes, measurements=rows, identity=identity,
                backend=f"{predictor.name}, {predictor.device}", overwrite=overwrite,
            )))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if progress:
        progress(WRITE, 1, 1, name)
    timings["write"] = time.perf_counter() - start
    return SegmentationResult(
        labels=labels, card=card, backend=predictor.name, device=predictor.device,
        precision=getattr(predictor, "precision", "fp32"),
        output=output, dicom_seg=dicom_seg, measurements=rows, timings=timings,
        uncertainty=uncertainty_volume, uncertainty_path=uncertainty_path,
    )
