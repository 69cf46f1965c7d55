"""Segmentation metrics and the ``medsegai evaluate`` report.

Metrics work on numpy masks in ``(z, y, x)`` order with voxel spacing in ``(x, y, z)`` mm (the
order of :attr:`MedSegAILib.core.image.Volume.spacing`).

Empty masks (documented behaviour):

- :func:`dice`: both empty -> ``nan`` (nothing to compare; left out of means); one empty -> 0.0.
- :func:`hd95_mm`: both empty -> ``nan``; exactly one empty -> ``inf`` (no surface to measure to).
- :func:`volume_error`: ``relative`` is ``nan`` when the reference is empty.

Report files (never overwriting: the report folder must be new or empty):
``metrics.csv`` (one row per case and label), ``metrics.json`` (per case, per label, and means
per label; ``nan`` is written as ``null`` and ``inf`` as the string ``"inf"``) and
``best_worst.png`` (axial slice through the largest reference area of the best and the worst
case by mean Dice, reference and prediction contours per label).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.protocol import EVALUATE

__all__ = [
    "VolumeError",
    "dice",
    "hd95_mm",
    "surface_distances_mm",
    "volume_error",
    "evaluate_case",
    "evaluate_model",
]

SegmentFn = Callable[..., "tuple[Volume, Any]"]


@dataclass(frozen=True)
class VolumeError:
    """Volumes of a prediction and its reference.

    Attributes:
        reference_ml: reference volume, millilitres.
        prediction_ml: predicted volume, millilitres.
        difference_ml: ``prediction_ml - reference_ml``.
        relative: ``difference_ml / reference_ml`` (``nan`` for an empty reference).
    """

    reference_ml: float
    prediction_ml: float
    difference_ml: float
    relative: float


def _as_masks(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    return prediction.astype(bool), reference.astype(bool)


def _spacing_zyx(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or any(not math.isfinite(s) or s <= 0 for s in values):
        raise ValueError(f"spacing must hold {ndim} positive values in (x, y, z) order, got {spacing!r}")
    return tuple(reversed(values))


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient ``2|P∩R| / (|P|+|R|)`` of two masks (any non-zero voxel is inside).

    Returns:
        In [0, 1]; ``nan`` when both masks are empty.

    Raises:
        ValueError: shapes differ.
    """
    pred, ref = _as_masks(prediction, reference)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def surface_distances_mm(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each prediction surface voxel to the reference surface, and back.

    The surface of a mask is its voxels with a face-neighbour outside (or at the array border);
    distances come from an exact Euclidean distance transform with the voxel spacing.

    Args:
        prediction, reference: masks ``(z, y, x)`` (or ``(y, x)``).
        spacing: voxel size in ``(x, y, z)`` (or ``(x, y)``) order, mm.

    Returns:
        ``(pred_to_ref, ref_to_pred)`` 1D arrays (empty when the source mask is empty).
    """
    from scipy import ndimage

    pred, ref = _as_masks(prediction, reference)
    sampling = _spacing_zyx(spacing, pred.ndim)
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    if not pred_surface.any() or not ref_surface.any():
        return np.zeros(0), np.zeros(0)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return to_ref[pred_surface], to_pred[ref_surface]


def hd95_mm(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm.

    The larger of the two directed 95th percentiles of surface-to-surface distances
    (prediction→reference and reference→prediction), as in MONAI's ``percentile=95``.

    Args:
        prediction, reference: masks ``(z, y, x)``.
        spacing: voxel size ``(x, y, z)`` mm.

    Returns:
        Distance in mm; ``nan`` when both masks are empty, ``inf`` when exactly one is empty.
    """
    pred, ref = _as_masks(prediction, reference)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        _spacing_zyx(spacing, pred.ndim)
        return float("nan")
    if has_pred != has_ref:
        _spacing_zyx(spacing, pred.ndim)
        return float("inf")
    to_ref, to_pred = surface_distances_mm(pred, ref, spacing)
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def volume_error(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> VolumeError:
    """Predicted vs reference volume in millilitres.

    Args:
        prediction, reference: masks ``(z, y, x)``.
        spacing: voxel size ``(x, y, z)`` mm.
    """
    pred, ref = _as_masks(prediction, reference)
    voxel_ml = float(np.prod(_spacing_zyx(spacing, pred.ndim))) / 1000.0
    ref_ml = int(ref.sum()) * voxel_ml
    pred_ml = int(pred.sum()) * voxel_ml
    difference = pred_ml - ref_ml
    relative = difference / ref_ml if ref_ml > 0 else float("nan")
    return VolumeError(ref_ml, pred_ml, difference, relative)


# ----------------------------------------------------------------------------------------------
# Per-case evaluation and the report
# ----------------------------------------------------------------------------------------------


def _card_label_map(card: Any) -> dict[str, int] | None:
    """name -> value of a model card (ModelCard, dict or None)."""
    if card is None:
        return None
    label_map = getattr(card, "label_map", None)
    if isinstance(label_map, dict):
        return {str(k): int(v) for k, v in label_map.items()}
    labels = getattr(card, "labels", None)
    if labels is None and isinstance(card, dict):
        labels = card.get("labels")
    if isinstance(labels, dict):
        return {str(k): int(v) for k, v in labels.items()}
    if isinstance(labels, (list, tuple)):
        result = {}
        for item in labels:
            name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
            value = item.get("value") if isinstance(item, dict) else getattr(item, "value", None)
            if name is not None and value is not None:
                result[str(name)] = int(value)
        return result
    return None


def evaluate_case(
    prediction: Volume, reference: Volume, labels: dict[str, int], prediction_labels: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Metrics of one case for each foreground label.

    Args:
        prediction: predicted labelmap on the reference grid.
        reference: reference labelmap.
        labels: dataset label name -> value in ``reference``.
        prediction_labels: model label name -> value in ``prediction`` (default: ``labels``).
            Labels whose name is missing in the model are skipped.

    Returns:
        One dict per label: ``label``, ``dice``, ``hd95_mm``, ``reference_ml``, ``prediction_ml``,
        ``volume_error_ml``, ``volume_error_rel``.

    Raises:
        MedSegAIInputError: the prediction is not on the reference grid.
    """
    if not prediction.same_grid(reference):
        raise MedSegAIInputError(
            f"the prediction ({prediction.geometry_description()}) is not on the reference grid "
            f"({reference.geometry_description()}); the model must return labels on the input grid."
        )
    prediction_labels = labels if prediction_labels is None else prediction_labels
    pred_array, ref_array = np.asarray(prediction.array), np.asarray(reference.array)
    rows = []
    for name, value in labels.items():
        if value == 0 or name not in prediction_labels:
            continue
        pred_mask = pred_array == prediction_labels[name]
        ref_mask = ref_array == value
        vol = volume_error(pred_mask, ref_mask, reference.spacing)
        rows.append({
            "label": name,
            "dice": dice(pred_mask, ref_mask),
            "hd95_mm": hd95_mm(pred_mask, ref_mask, reference.spacing),
            "reference_ml": vol.reference_ml,
            "prediction_ml": vol.prediction_ml,
            "volume_error_ml": vol.difference_ml,
            "volume_error_rel": vol.relative,
        })
    return rows


def _json_constant(token: str) -> Any:
    """JSON has no NaN/Infinity: nan -> null, inf -> "inf"."""
    return {"NaN": None, "Infinity": "inf", "-Infinity": "-inf"}[token]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _write_text_atomic(path: Path, text: str) -> None:
    from MedSegAILib.io.imageio import atomic_output

    with atomic_output(path, overwrite=False) as temp:
        temp.write_text(text, encoding="utf-8")


def _prepare_report_dir(report_dir: str | os.PathLike[str]) -> Path:
    path = Path(report_dir).expanduser().resolve()
    if path.exists():
        if not path.is_dir():
            raise MedSegAIInputError(f"report folder {path} is a file; give a new folder name with -o.")
        if any(path.iterdir()):
            raise MedSegAIInputError(
                f"report folder {path} already exists and is not empty; choose a new folder with -o "
                f"(reports are never overwritten)."
            )
    return path


def evaluate_model(
    model: str | os.PathLike[str] | Any,
    dataset_dir: str | os.PathLike[str],
    cases: Sequence[str] | None,
    report_dir: str | os.PathLike[str],
    backend: str = "auto",
    device: str = "auto",
    segment_fn: SegmentFn | None = None,
    progress: Callable[[str, int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Segment dataset cases with a model and write the metrics report.

    Args:
        model: model id or folder (anything ``MedSegAILib.inference.pipeline.segment_case`` accepts).
        dataset_dir: MedSegAI dataset folder (see :mod:`MedSegAILib.data.dataset`).
        cases: case ids to evaluate; None or empty means all cases.
        report_dir: new (or empty) folder for ``metrics.csv``, ``metrics.json``, ``best_worst.png``.
        backend, device: passed to ``segment_fn``.
        segment_fn: ``(volumes, model, backend=..., device=...) -> (labels Volume, card)``;
            default ``MedSegAILib.inference.pipeline.segment_case``. The model is loaded once when the
            default is used (the loaded card/predictor are reused for every case).
        progress: ``(stage, done, total, message)`` callback, stage ``"evaluate"``.

    Returns:
        The report dict written to ``metrics.json``.

    Raises:
        MedSegAIInputError: unknown case ids, unreadable case files, no label shared by model and
            dataset, or an existing non-empty report folder.
    """
    from MedSegAILib.data.dataset import load_dataset, read_case

    report_path = _prepare_report_dir(report_dir)
    info = load_dataset(dataset_dir)
    if not info.cases:
        raise MedSegAIInputError(f"dataset {info.root} has no cases to evaluate; add cases first.")
    selected = [info.case(case_id) for case_id in cases] if cases else list(info.cases)
    segment_fn, model = _segmenter(segment_fn, model, backend, device)

    per_case: list[dict[str, Any]] = []
    best: tuple[float, str, _Panel] | None = None
    worst: tuple[float, str, _Panel] | None = None
    model_info: dict[str, Any] = {}
    label_map: dict[str, int] | None = None
    for done, case in enumerate(selected):
        if progress is not None:
            progress(EVALUATE, done, len(selected), case.id)
        images, reference = read_case(info, case)
        images = _model_channels(images, info.channels, model)
        prediction, card = segment_fn(images, model, backend=backend, device=device)
        label_map = _card_label_map(card)
        if label_map is not None and not (set(label_map) - {"background"}) & set(info.foreground_labels):
            raise MedSegAIInputError(
                f"the model's labels ({', '.join(label_map)}) share no name with the dataset's labels "
                f"({', '.join(info.labels)}); evaluate with a model trained for these labels."
            )
        if card is not None and not model_info:
            model_info = {"id": getattr(card, "id", None), "version": getattr(card, "version", None)}
        rows = evaluate_case(prediction, reference, info.labels, label_map)
        mean_dice = _nanmean([row["dice"] for row in rows])
        per_case.append({"case": case.id, "mean_dice": mean_dice, "labels": rows})
        # keep only the slices the PNG needs, for the best and the worst case so far (nan = no label)
        known = not math.isnan(mean_dice)
        is_best = best is None or (known and (math.isnan(best[0]) or mean_dice >= best[0]))
        is_worst = worst is None or (known and (math.isnan(worst[0]) or mean_dice < worst[0]))
        if is_best or is_worst:
            panel = _axial_panel(images[0], reference, prediction)
            best = (mean_dice, case.id, panel) if is_best else best
            worst = (mean_dice, case.id, panel) if is_worst else worst
    if progress is not None:
        progress(EVALUATE, len(selected), len(selected), "")

    label_names = [row["label"] for row in per_case[0]["labels"]] if per_case else []
    summary = {}
    for name in label_names:
        rows = [row for case in per_case for row in case["labels"] if row["label"] == name]
        finite_hd = [row["hd95_mm"] for row in rows if math.isfinite(row["hd95_mm"])]
        summary[name] = {
            "dice_mean": _nanmean([row["dice"] for row in rows]),
            "hd95_mm_mean": float(np.mean(finite_hd)) if finite_hd else float("nan"),
            "hd95_inf_cases": sum(1 for row in rows if math.isinf(row["hd95_mm"])),
            "volume_error_ml_mean": _nanmean([row["volume_error_ml"] for row in rows]),
            "volume_error_rel_mean": _nanmean([row["volume_error_rel"] for row in rows]),
            "cases": len(rows),
        }
    if best is None or worst is None:
        raise MedSegAIInputError(f"no case of {info.root} was selected for evaluation; check --cases.")
    report: dict[str, Any] = {
        "dataset": str(info.root),
        "model": model_info or {"id": str(model)},
        "cases": per_case,
        "summary": summary,
        "best_case": best[1],
        "worst_case": worst[1],
        "definitions": {
            "dice": "2|P∩R|/(|P|+|R|); null when both are empty",
            "hd95_mm": "max of the two directed 95th-percentile surface distances (mm); "
                       "null when both are empty, \"inf\" when exactly one is empty",
            "volume_error_ml": "predicted minus reference volume (mL)",
            "volume_error_rel": "volume_error_ml / reference volume; null when the reference is empty",
        },
    }

    report_path.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(report_path / "metrics.csv", _csv_text(per_case))
    json_ready = json.loads(json.dumps(report, default=str), parse_constant=_json_constant)
    _write_text_atomic(report_path / "metrics.json", json.dumps(json_ready, indent=2) + "\n")
    panels = [("best", *best), ("worst", *worst)] if best[1] != worst[1] else [("best = worst", *best)]
    _write_overlay_png(report_path / "best_worst.png", panels, info.labels, label_map)
    json_ready["files"] = {name: str(report_path / name) for name in ("metrics.csv", "metrics.json", "best_worst.png")}
    return json_ready


def _model_channels(images: list[Volume], dataset_channels: Sequence[str], model: Any) -> list[Volume]:
    """The dataset's channels that the model takes, in the model's order (matched by name)."""
    from MedSegAILib.model.modelcard import ModelCard

    if not isinstance(model, ModelCard):
        return images
    by_name = dict(zip(dataset_channels, images))
    missing = [name for name in model.channel_names if name not in by_name]
    if missing:
        raise MedSegAIInputError(
            f"model '{model.id}' needs channel(s) {', '.join(missing)} that the dataset does not have "
            f"(dataset channels: {', '.join(dataset_channels)}); evaluate on a dataset with those channels."
        )
    return [by_name[name] for name in model.channel_names]


def _segmenter(segment_fn: SegmentFn | None, model: Any, backend: str, device: str) -> tuple[SegmentFn, Any]:
    """The default segmenter loads the model once and reuses its predictor for every case."""
    if segment_fn is not None:
        if not callable(segment_fn):
            raise TypeError(f"segment_fn must be callable, got {segment_fn!r}")
        return segment_fn, model
    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.model.modelcard import ModelCard, find_model
    from MedSegAILib.inference.pipeline import segment_case

    card = model if isinstance(model, ModelCard) else find_model(model)
    predictor = load_predictor(card, backend=backend, device=device)

    def run(volumes: list[Volume], model_: Any, backend: str = "auto", device: str = "auto") -> tuple[Volume, Any]:
        return segment_case(volumes, card, backend=backend, device=device, predictor=predictor)

    return run, card


def _csv_text(per_case: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    fields = ["case", "label", "dice", "hd95_mm", "reference_ml", "prediction_ml", "volume_error_ml",
              "volume_error_rel"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for case in per_case:
        for row in case["labels"]:
            writer.writerow({"case": case["case"], **{k: _csv_value(row[k]) for k in fields[1:]}})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return value


@dataclass(frozen=True)
class _Panel:
    """One axial slice for the overlay PNG, already in display orientation."""

    index: int
    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    aspect: float


def _axial_panel(image: Volume, reference: Volume, prediction: Volume) -> _Panel:
    """The axial slice with the largest reference area (largest predicted area if the reference is
    empty), in radiological orientation (patient right on the left, anterior up) when the volume is
    axis-aligned."""
    ref = np.asarray(reference.array)
    pred = np.asarray(prediction.array)
    area = (ref != 0).reshape(ref.shape[0], -1).sum(axis=1)
    if area.max() == 0:
        area = (pred != 0).reshape(pred.shape[0], -1).sum(axis=1)
    index = int(np.argmax(area))
    flip_rows = image.direction[1, 1] < 0
    flip_columns = image.direction[0, 0] < 0

    def display(plane: np.ndarray) -> np.ndarray:
        plane = plane[::-1] if flip_rows else plane
        return np.array(plane[:, ::-1] if flip_columns else plane)

    return _Panel(index, display(np.asarray(image.array)[index]).astype(float), display(ref[index]),
                  display(pred[index]), image.spacing[1] / image.spacing[0])


def _write_overlay_png(
    path: Path,
    panels: list[tuple[str, float, str, _Panel]],
    labels: dict[str, int],
    prediction_labels: dict[str, int] | None,
) -> None:
    """One column per panel ``(title, mean_dice, case_id, panel)``: the slice in grey, reference
    (solid) and prediction (dashed) contours per label colour, and a legend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    prediction_labels = labels if prediction_labels is None else prediction_labels
    foreground = [(name, value) for name, value in labels.items() if value != 0]
    colours = matplotlib.colormaps["tab10"]
    figure = Figure(figsize=(5.5 * len(panels), 6.0), dpi=100)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, mean_dice, case_id, panel) in zip(axes, panels):
        low, high = np.percentile(panel.image, [1, 99])
        axis.imshow(panel.image, cmap="gray", vmin=low, vmax=high if high > low else low + 1,
                    aspect=panel.aspect, interpolation="nearest")
        for colour_index, (name, value) in enumerate(foreground):
            colour = colours(colour_index % 10)
            ref_mask = (panel.reference == value).astype(float)
            if ref_mask.any():
                axis.contour(ref_mask, levels=[0.5], colors=[colour], linewidths=1.6, linestyles="solid")
            if name in prediction_labels:
                pred_mask = (panel.prediction == prediction_labels[name]).astype(float)
                if pred_mask.any():
                    axis.contour(pred_mask, levels=[0.5], colors=[colour], linewidths=1.4, linestyles="dashed")
        dice_text = "n/a" if math.isnan(mean_dice) else f"{mean_dice:.3f}"
        axis.set_title(f"{title}: {case_id}, slice {panel.index}, mean Dice {dice_text}")
        axis.set_axis_off()
    handles = [Line2D([], [], color="black", linestyle="solid", label="reference"),
               Line2D([], [], color="black", linestyle="dashed", label="prediction")]
    handles += [Line2D([], [], color=colours(i % 10), linewidth=3, label=name)
                for i, (name, _) in enumerate(foreground)]
    figure.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    from MedSegAILib.io.imageio import atomic_output

    with atomic_output(path, overwrite=False) as temp:
        temp.write_bytes(buffer.getvalue())
