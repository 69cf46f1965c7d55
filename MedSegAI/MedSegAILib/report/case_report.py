"""One-page PDF case report: model, input, three orthogonal views with the segments, measurements, validation.

Written by the engine process (``medsegai segment --report``, ``medsegai report``), so it needs only
numpy and Pillow (:mod:`MedSegAILib.report.pdfwriter`, :func:`MedSegAILib.report.preview.render_views`), which
Slicer's Python has. No patient name, id or birth date appears unless the caller passes them
(``identity``, from ``--report-identify``); the document title and file metadata never hold them.
The file is written atomically (:func:`MedSegAILib.io.imageio.atomic_output`).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.errors import MedSegAIInputError
from ..core.image import Volume
from ..io.imageio import atomic_output
from ..model.modelcard import ModelCard, builtin_models_dir
from .pdfwriter import PdfDocument, PdfPage, text_width

__all__ = [
    "IDENTITY_FIELDS", "check_report_path", "is_shipped_model", "patient_identity", "report_from_files", "write_case_report",
]

IDENTITY_FIELDS = (("PatientName", "Patient name"), ("PatientID", "Patient ID"), ("PatientBirthDate", "Birth date"))
_MARGIN = 40.0
_BOTTOM = 48.0
_GREY = (0.35, 0.35, 0.35)
_WARNING_RED = (0.72, 0.11, 0.11)


def check_report_path(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Check a report path before any work: ``.pdf``, its folder exists, free unless ``overwrite``.

    Raises:
        MedSegAIInputError: any of these is not so (one line saying what to do).
    """
    out = Path(path).expanduser()
    if out.suffix.lower() != ".pdf":
        raise MedSegAIInputError(f"the report must be a .pdf file, not '{out.name}'; choose a name ending in .pdf.")
    if out.is_dir():
        raise MedSegAIInputError(f"report {out} is a folder; give a file name ending in .pdf.")
    if not out.parent.is_dir():
        raise MedSegAIInputError(f"the folder of the report {out} does not exist; create it first or choose another path.")
    if out.exists() and not overwrite:
        raise MedSegAIInputError(f"report {out} already exists; choose another name or pass --overwrite.")
    return out


def is_shipped_model(card: ModelCard) -> bool:
    """True for the demonstration models shipped in ``Resources/Models`` (and installed copies of their ids)."""
    builtin = builtin_models_dir()
    try:
        Path(card.folder).resolve().relative_to(builtin.resolve())
        return True
    except ValueError:
        pass
    shipped_ids = {p.name for p in builtin.iterdir() if (p / "model.json").is_file()} if builtin.is_dir() else set()
    return card.id in shipped_ids


def patient_identity(input_path: str | os.PathLike[str], series_uid: str | None = None) -> dict[str, str]:
    """Patient name, id and birth date of a DICOM input, for ``--report-identify`` only.

    Args:
        input_path: the first input as the user gave it (a DICOM folder or a file).
        series_uid: the series read from the folder, when it holds several.

    Returns:
        ``{"Patient name": ..., "Patient ID": ..., "Birth date": ...}`` for a DICOM folder (fields
        the files lack are left out); an empty dict for image files, which carry no patient data.
    """
    import pydicom

    from ..io.dicom import scan_dicom_folder

    folder = Path(input_path).expanduser()
    if not folder.is_dir():
        return {}
    series = scan_dicom_folder(folder)
    if series_uid is not None:
        series = [s for s in series if s.uid == series_uid]
    if not series or not series[0].files:
        return {}
    header = pydicom.dcmread(series[0].files[0], stop_before_pixels=True)
    identity = {}
    for keyword, title in IDENTITY_FIELDS:
        value = header.get(keyword, "")
        text = "" if value is None else str(value).strip()
        if text:
            identity[title] = text
    return identity


def _wrap(text: str, width: float, size: float, bold: bool = False) -> list[str]:
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if text_width(candidate, size, bold) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _fit(text: str, width: float, size: float, bold: bool = False) -> str:
    """``text`` cut with an ellipsis so that it fits ``width``."""
    if text_width(text, size, bold) <= width:
        return text
    while text and text_width(text + "...", size, bold) > width:
        text = text[:-1]
    return text + "..."


def _format(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "-" if not np.isfinite(number) else f"{number:.{digits}f}"


class _Layout:
    """A cursor over the pages of the document: new pages when the current one is full."""

    def __init__(self, document: PdfDocument, footer: str) -> None:
        self.document = document
        self.footer = footer
        self.width = document.page_size[0] - 2 * _MARGIN
        self.page: PdfPage = document.new_page()
        self.y = document.page_size[1] - _MARGIN

    def need(self, height: float) -> None:
        if self.y - height < _BOTTOM:
            self.page = self.document.new_page()
            self.y = self.document.page_size[1] - _MARGIN
            self.text("MedSegAI case report (continued)", 9, color=_GREY)

    def text(self, text: str, size: float = 9.0, bold: bool = False, x: float = 0.0,
             color: Sequence[float] = (0.0, 0.0, 0.0), advance: float | None = None) -> None:
        self.need(size * 1.35)
        self.page.text(_MARGIN + x, self.y - size, text, size=size, bold=bold, color=color)
        self.y -= advance if advance is not None else size * 1.35

    def paragraph(self, text: str, size: float = 9.0, bold: bool = False, x: float = 0.0,
                  color: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        for line in _wrap(text, self.width - x, size, bold):
            self.text(line, size, bold, x=x, color=color)

    def heading(self, text: str) -> None:
        self.need(30)
        self.y -= 6
        self.text(text, 11, bold=True)
        self.page.line(_MARGIN, self.y + 2, _MARGIN + self.width, self.y + 2, width=0.4, color=_GREY)
        self.y -= 3

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[float],
              swatches: Sequence[Sequence[float] | None] | None = None, size: float = 8.5) -> None:
        """Rows of cells; numbers (all columns but the first) right-aligned; optional colour swatch per row."""
        step = size * 1.45
        positions = np.concatenate([[0.0], np.cumsum(widths)])

        def draw(cells: Sequence[str], bold: bool, swatch: Sequence[float] | None) -> None:
            self.need(step)
            baseline = self.y - size
            for index, cell in enumerate(cells):
                if index == 0:
                    indent = 12.0 if swatches is not None else 0.0
                    if swatch is not None:
                        self.page.rect(_MARGIN, baseline - 1, 8, 8, fill=swatch, stroke=(0, 0, 0), line_width=0.3)
                    self.page.text(_MARGIN + indent, baseline, _fit(cell, widths[0] - indent - 4, size, bold), size, bold)
                else:
                    text = _fit(cell, widths[index] - 4, size, bold)
                    right = _MARGIN + positions[index + 1] - 4
                    self.page.text(right - text_width(text, size, bold), baseline, text, size, bold)
            self.y -= step

        draw(header, True, None)
        self.page.line(_MARGIN, self.y + 2, _MARGIN + positions[-1], self.y + 2, width=0.3, color=_GREY)
        for index, row in enumerate(rows):
            draw(row, False, swatches[index] if swatches is not None else None)

    def finish(self) -> None:
        pages = self.document.pages
        for number, page in enumerate(pages, start=1):
            page.line(_MARGIN, 36, page.width - _MARGIN, 36, width=0.3, color=_GREY)
            page.text(_MARGIN, 25, _fit(self.footer, self.width - 60, 7), size=7, color=_GREY)
            label = f"page {number}/{len(pages)}"
            page.text(page.width - _MARGIN - text_width(label, 7), 25, label, size=7, color=_GREY)


def _views_block(layout: _Layout, image: Volume, labels: Volume, card: ModelCard) -> None:
    from .preview import render_views

    views = render_views(image, labels, card)
    gap = 8.0
    cell = (layout.width - 2 * gap) / 3  # one equal column per view, each view fitted into it
    sizes = []
    for _, rgb in views:
        ratio = rgb.shape[0] / rgb.shape[1]
        width = min(cell, 200.0 / ratio)
        sizes.append((width, width * ratio))
    height = max(h for _, h in sizes)
    layout.need(height + 16)
    top = layout.y
    letters = {"axial": ("R", "L", "A"), "coronal": ("R", "L", "S"), "sagittal": ("A", "P", "S")}
    yellow = (1.0, 0.85, 0.0)
    for index, ((name, rgb), (width, view_height)) in enumerate(zip(views, sizes)):
        x = _MARGIN + index * (cell + gap) + (cell - width) / 2
        y = top - (height - view_height) / 2 - view_height
        layout.page.image(rgb, x, y, width, view_height)
        left, right, up = letters[name]
        layout.page.text(x + 2, y + view_height / 2 - 3, left, size=8, bold=True, color=yellow)
        layout.page.text(x + width - 8, y + view_height / 2 - 3, right, size=8, bold=True, color=yellow)
        layout.page.text(x + width / 2 - 3, y + view_height - 9, up, size=8, bold=True, color=yellow)
        centre = _MARGIN + index * (cell + gap) + cell / 2
        layout.page.text(centre - text_width(name, 8) / 2, top - height - 10, name, size=8, color=_GREY)
    layout.y = top - height - 14


def _measurement_rows(rows: Sequence[Mapping[str, Any]], card: ModelCard) -> tuple[list[list[str]], list[Any]]:
    colors = {label.value: label.color for label in card.labels}
    table, swatches = [], []
    for row in rows:
        count = int(row.get("voxel_count", 0) or 0)
        table.append([
            str(row.get("name", "")),
            _format(row.get("volume_ml"), 2) if count else "not found",
            _format(row.get("max_diameter_mm"), 1) if count else "-",
            str(count),
        ])
        swatches.append(colors.get(int(row.get("value", 0)), (0.6, 0.6, 0.6)))
    return table, swatches


def _validation_block(layout: _Layout, card: ModelCard) -> None:
    metrics = card.raw.get("metrics") or {}
    validation = metrics.get("cross_validation") or metrics.get("validation") or metrics.get("test")
    if not isinstance(validation, Mapping):
        fit = metrics.get("training_fit")
        if isinstance(fit, Mapping) and isinstance(fit.get("dice"), Mapping):
            layout.paragraph("model.json has no independent validation; Dice on its own training cases "
                             "(not a measure of accuracy on new cases):", size=8.5)
            validation = fit
        else:
            layout.paragraph("model.json holds no validation figures for this model.", size=8.5)
            return
    method = validation.get("method") or validation.get("note")
    if method:
        layout.paragraph(f"Method: {method}", size=8.5)
    dice = validation.get("dice") if isinstance(validation.get("dice"), Mapping) else {}
    hd95 = validation.get("hd95_mm") if isinstance(validation.get("hd95_mm"), Mapping) else {}
    colors = {label.name: label.color for label in card.labels}
    names = [label.name for label in card.labels if label.name in dice or label.name in hd95]
    rows = [[name, _format(dice.get(name), 3), _format(hd95.get(name), 1)] for name in names]
    if rows:
        layout.table(["Segment", "Dice", "HD95 (mm)"], rows, [170, 80, 90], [colors[n] for n in names])
    if validation.get("mean_dice") is not None:
        layout.text(f"Mean Dice: {_format(validation.get('mean_dice'), 3)}", 8.5)


def write_case_report(
    path: str | os.PathLike[str],
    image: Volume,
    labels: Volume,
    card: ModelCard,
    *,
    inputs: Sequence[Volume] | None = None,
    measurements: Sequence[Mapping[str, Any]] | None = None,
    identity: Mapping[str, str] | None = None,
    backend: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the PDF case report.

    Args:
        path: the ``.pdf`` to write (its folder must exist; see :func:`check_report_path`).
        image: the first input channel, ``array`` ``(z, y, x)``, on the labels' grid.
        labels: the segmentation (uint8 label values of ``card``).
        card: the model that made it.
        inputs: every input channel (default: ``[image]``), described in the input section.
        measurements: rows of :func:`MedSegAILib.report.measurements.compute_measurements` (computed
            here when not given).
        identity: patient fields to print (``--report-identify``); ``None`` prints none.
        backend: the backend and device that ran the model, e.g. ``"onnx, cpu"``.
        overwrite: replace an existing report.

    Returns:
        The path written.

    Raises:
        TypeError: bad argument types.
        MedSegAIInputError: bad path (see :func:`check_report_path`) or labels not on the image grid.
    """
    from .measurements import compute_measurements

    if not isinstance(card, ModelCard):
        raise TypeError(f"card must be a ModelCard, got {type(card).__name__}")
    if not isinstance(image, Volume) or not isinstance(labels, Volume):
        raise TypeError("image and labels must be Volume objects")
    if identity is not None and not isinstance(identity, Mapping):
        raise TypeError(f"identity must be a mapping or None, got {type(identity).__name__}")
    out = check_report_path(path, overwrite)
    inputs = list(inputs) if inputs is not None else [image]
    rows = list(measurements) if measurements is not None else compute_measurements(labels, card)

    now = _dt.datetime.now(_dt.timezone.utc)
    document = PdfDocument(title=f"MedSegAI case report - {card.id} {card.version}")
    shipped = is_shipped_model(card)
    footer = (f"MedSegAI {__version__} - automatic segmentation by model {card.id} {card.version}. "
              + ("Not for clinical use." if shipped else "Review every segment before relying on it."))
    layout = _Layout(document, footer)

    layout.text("MedSegAI case report", 16, bold=True, advance=18)
    stamp = f"generated {now.strftime('%Y-%m-%d %H:%M')} UTC"
    layout.page.text(_MARGIN + layout.width - text_width(stamp, 8), layout.y + 18 - 8, stamp, size=8, color=_GREY)
    if shipped:
        layout.page.rect(_MARGIN, layout.y - 20, layout.width, 18, fill=_WARNING_RED)
        layout.page.text(_MARGIN + 6, layout.y - 14.5,
                         "NOT FOR CLINICAL USE - demonstration model trained on very few patients; not a medical device.",
                         size=9, bold=True, color=(1.0, 1.0, 1.0))
        layout.y -= 26

    layout.heading("Model")
    layout.paragraph(f"{card.name} - id {card.id}, version {card.version}" + (f" (run with {backend})" if backend else ""), 9)
    licence = card.raw.get("license")
    if licence:
        layout.paragraph(f"Licence: {licence}", 8, color=_GREY)

    layout.heading("Input")
    for index, volume in enumerate(inputs):
        channel = card.channels[index] if index < len(card.channels) else None
        name = channel.name if channel is not None else f"channel {index + 1}"
        modality = volume.metadata.get("modality") or (channel.modality if channel is not None else "") or "?"
        size = " x ".join(str(v) for v in volume.size_xyz)
        spacing = " x ".join(f"{s:.2f}" for s in volume.spacing)
        kind = f" ({modality})" if modality != name else ""
        layout.text(f"{name}{kind}: {size} voxels, spacing {spacing} mm", 9)
    if identity:
        layout.text("; ".join(f"{key}: {value}" for key, value in identity.items()), 9, bold=True)
    else:
        layout.text("Patient identifiers are not shown (pass --report-identify to include them).", 8, color=_GREY)

    layout.heading("Segmentation")
    _views_block(layout, image, labels, card)

    layout.heading("Measurements")
    table, swatches = _measurement_rows(rows, card)
    layout.table(["Segment", "Volume (mL)", "Max. diameter (mm)", "Voxels"], table, [170, 90, 120, 90], swatches)

    layout.heading("Model validation (from model.json)")
    _validation_block(layout, card)
    layout.finish()

    with atomic_output(out, overwrite=overwrite) as temp:
        with open(temp, "wb") as handle:
            document.write(handle)
    return out


def report_from_files(
    inputs: Sequence[str | os.PathLike[str]],
    labels: str | os.PathLike[str],
    output: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    series_uid: str | None = None,
    identify: bool = False,
    overwrite: bool = False,
) -> Path:
    """``medsegai report``: read the inputs and a label map from files and write their case report.

    Args:
        inputs: one image file or DICOM folder per model channel.
        labels: a label map on the first input's grid (values are the model's label values).
        output: the ``.pdf`` to write.
        model: model id or folder (default: the default model).
        series_uid: DICOM series to read from a folder with several.
        identify: print the DICOM input's patient name, id and birth date.
        overwrite: replace an existing report.

    Raises:
        MedSegAIInputError: bad paths, wrong number of inputs, labels on another grid or with
            values the model does not have.
    """
    from ..io.imageio import read_volume
    from ..model.modelcard import find_model

    out = check_report_path(output, overwrite)
    card = find_model(model)
    if len(inputs) != len(card.channels):
        raise MedSegAIInputError(
            f"model '{card.id}' has {len(card.channels)} input(s) ({', '.join(card.channel_names)}); got {len(inputs)}."
        )
    volumes = [read_volume(path, series_uid=series_uid) for path in inputs]
    label_volume = read_volume(labels)
    if label_volume.array.dtype.kind not in "iub":
        raise MedSegAIInputError(f"{Path(labels).name} holds {label_volume.array.dtype} values; give an integer label map.")
    if not label_volume.same_grid(volumes[0]):
        raise MedSegAIInputError(
            f"the labels ({label_volume.geometry_description()}) are not on the grid of {Path(inputs[0]).name} "
            f"({volumes[0].geometry_description()}); give the label map the segmentation was made on."
        )
    top = int(label_volume.array.max(initial=0))
    if top > card.num_classes - 1 or int(label_volume.array.min(initial=0)) < 0:
        raise MedSegAIInputError(
            f"{Path(labels).name} has label values up to {top}, but model '{card.id}' has labels 1..{card.num_classes - 1}; "
            "give the label map of this model."
        )
    identity = patient_identity(inputs[0], series_uid) if identify else None
    return write_case_report(out, volumes[0], label_volume, card, inputs=volumes, identity=identity, overwrite=overwrite)
