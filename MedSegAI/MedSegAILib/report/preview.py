"""A PNG that shows a segmentation without Slicer: three orthogonal slices with the segments overlaid.

The slices go through the centre of the segmented region's bounding box (the volume centre when
nothing is segmented). They are shown in radiological convention whatever the file's voxel order:

- axial: anterior at the top, the patient's right on the image's left;
- coronal: superior at the top, the patient's right on the image's left;
- sagittal: superior at the top, anterior on the image's left.

Pixel aspect ratios come from the voxel spacing, so anisotropic volumes are not squashed. Arrays are
``(z, y, x)`` numpy arrays as everywhere in the engine (:class:`~MedSegAILib.core.image.Volume`).
matplotlib is imported inside :func:`render_preview` only (Agg canvas, no pyplot global state).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MedSegAIInputError, optional_import
from ..core.image import Volume, present_values
from ..io.imageio import atomic_output
from ..core.labels import label_entries

__all__ = ["render_preview", "render_views", "canonical_lps_array"]

_OVERLAY_ALPHA = 0.45
# an image whose darkest voxels are below -500 is taken for CT in Hounsfield units and shown in a
# soft-tissue window (level 40, width 400)
_HU_AIR_THRESHOLD = -500.0
_CT_SOFT_TISSUE_WINDOW = (-160.0, 240.0)


def canonical_lps_array(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A view of ``volume.array`` permuted/flipped so that index axes point to L, P and S.

    Oblique directions are snapped to the nearest axes (no resampling), which is what a preview
    needs.

    Args:
        volume: any 3D volume.

    Returns:
        ``(array, spacing)``: the ``(z, y, x)`` view with x towards patient left, y towards
        posterior and z towards superior, and its spacing in ``(x, y, z)`` order.
    """
    direction = np.asarray(volume.direction, dtype=float)
    # physical axis (0=L, 1=P, 2=S) that each index axis (0=i/x, 1=j/y, 2=k/z) follows most closely
    axis_of_index = [int(np.argmax(np.abs(direction[:, c]))) for c in range(3)]
    if sorted(axis_of_index) != [0, 1, 2]:
        raise MedSegAIInputError(
            f"the image direction {direction.round(3).tolist()} is too oblique to show as axial/coronal/sagittal "
            "slices; resample the image onto an axis-aligned grid first."
        )
    array = volume.array
    # numpy axis of index axis c is 2 - c; flip index axes that point to R, A or I
    for c in range(3):
        if direction[axis_of_index[c], c] < 0:
            array = np.flip(array, axis=2 - c)
    # reorder numpy axes to (S, P, L)
    numpy_axis_of_physical = {axis_of_index[c]: 2 - c for c in range(3)}
    array = np.transpose(array, (numpy_axis_of_physical[2], numpy_axis_of_physical[1], numpy_axis_of_physical[0]))
    spacing_of_physical = {axis_of_index[c]: volume.spacing[c] for c in range(3)}
    spacing = (spacing_of_physical[0], spacing_of_physical[1], spacing_of_physical[2])
    return array, spacing


def _slice_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Centre ``(z, y, x)`` of the bounding box of the non-zero voxels (array centre if none)."""
    nonzero = [np.flatnonzero(np.any(labels, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(index.size == 0 for index in nonzero):
        return tuple(s // 2 for s in labels.shape)  # type: ignore[return-value]
    return tuple(int((index[0] + index[-1]) // 2) for index in nonzero)  # type: ignore[return-value]


def _display_window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        low, high = (float(w) for w in window)
        if not low < high:
            raise ValueError(f"window must be (low, high) with low < high, got {window!r}")
        return low, high
    sample = image[:: max(1, image.shape[0] // 32)]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [0.5, 99.5])
    if low < _HU_AIR_THRESHOLD:
        return _CT_SOFT_TISSUE_WINDOW
    return (float(low), float(high)) if high > low else (float(low), float(low) + 1.0)


def _overlay_rgba(labels2d: np.ndarray, colors: dict[int, tuple[float, float, float]]) -> np.ndarray:
    rgba = np.zeros(labels2d.shape + (4,), dtype=np.float32)
    for value, rgb in colors.items():
        mask = labels2d == value
        if mask.any():
            rgba[mask] = (*rgb, _OVERLAY_ALPHA)
    return rgba


def _check_pair(image: Volume, labels: Volume) -> None:
    """TypeError/ValueError for non-3D or non-Volume arguments, MedSegAIInputError for different grids."""
    if not isinstance(image, Volume) or not isinstance(labels, Volume):
        raise TypeError(
            f"image and labels must be Volume objects, got {type(image).__name__} and {type(labels).__name__}"
        )
    if image.array.ndim != 3 or labels.array.ndim != 3:
        raise ValueError(f"image and labels must be 3D, got shapes {image.array.shape} and {labels.array.shape}")
    if not image.same_grid(labels):
        raise MedSegAIInputError(
            f"the labels ({labels.geometry_description()}) are not on the image's grid "
            f"({image.geometry_description()}); resample the labels onto the image first."
        )


def _prepare_views(
    image: Volume, labels: Volume, labels_spec: Any, window: tuple[float, float] | None
) -> tuple[list[tuple[str, np.ndarray, np.ndarray, float]], dict[int, tuple[float, float, float]], dict[int, str],
           set[int], tuple[float, float]]:
    """The three slices both renderers show.

    Returns:
        ``(views, colors, names, present, (low, high))``: ``views`` are ``(name, grey slice,
        label slice, pixel aspect = row spacing / column spacing)`` for axial, coronal and
        sagittal, oriented as the module docstring says; ``colors``/``names`` by label value (values
        the spec does not list are grey); ``present`` the label values in the volume; the display
        window.
    """
    _check_pair(image, labels)
    entries = [(e.value, e.name, e.color) for e in label_entries(labels_spec, max_value=255)]
    grey, spacing = canonical_lps_array(image)
    labelmap, _ = canonical_lps_array(labels)
    low, high = _display_window(grey, window)
    present = present_values(np.asarray(labelmap)) - {0}
    colors = {value: rgb for value, _, rgb in entries}
    for value in present - set(colors):
        colors[value] = (0.6, 0.6, 0.6)
    names = {value: name for value, name, _ in entries}
    cz, cy, cx = _slice_centre(labelmap)
    sx, sy, sz = spacing
    views = [
        ("axial", grey[cz], labelmap[cz], sy / sx),
        ("coronal", grey[::-1, cy, :], labelmap[::-1, cy, :], sz / sx),
        ("sagittal", grey[::-1, :, cx], labelmap[::-1, :, cx], sz / sy),
    ]
    return views, colors, names, present, (low, high)


def render_views(
    image: Volume,
    labels: Volume,
    labels_spec: Any,
    *,
    window: tuple[float, float] | None = None,
    max_pixels: int = 512,
) -> list[tuple[str, np.ndarray]]:
    """The preview's three views as RGB arrays, drawn with numpy and Pillow only (no matplotlib).

    Same slices, orientation, display window and colours as :func:`render_preview`; each view is
    resampled to square pixels (grey values bilinear, labels nearest) so that its longer side has
    ``max_pixels`` pixels, then the segments are blended over it.

    Args:
        image: the grey-value volume, ``array`` ``(z, y, x)``.
        labels: the label map on the same grid.
        labels_spec: as for :func:`render_preview`.
        window: grey-value display range; default as for :func:`render_preview`.
        max_pixels: size of each view's longer side, >= 16.

    Returns:
        ``[(name, rgb)]`` for ``axial``, ``coronal``, ``sagittal``; ``rgb`` is ``(rows, columns, 3)``
        uint8, row 0 at the top of the view.
    """
    if not isinstance(max_pixels, int) or max_pixels < 16:
        raise ValueError(f"max_pixels must be an integer >= 16, got {max_pixels!r}")
    from PIL import Image

    views, colors, _, _, (low, high) = _prepare_views(image, labels, labels_spec, window)
    result = []
    for name, grey2d, labels2d, aspect in views:
        rows, columns = grey2d.shape
        height, width = rows * aspect, float(columns)
        scale = max_pixels / max(height, width)
        size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        scaled = np.clip((np.asarray(grey2d, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
        grey_image = Image.fromarray(scaled).resize(size, Image.BILINEAR)
        grey = np.asarray(grey_image, dtype=np.float32)[..., None].repeat(3, axis=2)
        label_image = Image.fromarray(np.asarray(labels2d).astype(np.int32)).resize(size, Image.NEAREST)
        label_array = np.asarray(label_image)
        for value, rgb in colors.items():
            mask = label_array == value
            if mask.any():
                grey[mask] = (1.0 - _OVERLAY_ALPHA) * grey[mask] + _OVERLAY_ALPHA * np.asarray(rgb, dtype=np.float32)
        result.append((name, np.round(grey * 255.0).astype(np.uint8)))
    return result


def render_preview(
    image: Volume,
    labels: Volume,
    labels_spec: Any,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    window: tuple[float, float] | None = None,
    overwrite: bool = False,
    dpi: int = 100,
) -> Path:
    """Write a PNG with axial, coronal and sagittal slices, the segments overlaid, and a legend.

    Args:
        image: the grey-value volume, ``array`` ``(z, y, x)``.
        labels: the label map on the same grid as ``image`` (integer values, 0 = background).
        labels_spec: a :class:`~MedSegAILib.model.modelcard.ModelCard`, or a sequence of
            :class:`~MedSegAILib.model.modelcard.LabelSpec` or of dicts with ``name``, ``value`` and
            ``color`` (RGB in [0, 1]). Label values not listed are drawn in grey.
        path: the PNG to write (written to a temporary file, then renamed).
        title: optional figure title (never put patient data here).
        window: grey-value display range ``(low, high)``; default: a soft-tissue window (-160, 240)
            for CT in Hounsfield units (0.5 percentile below -500), else the 0.5–99.5 percentiles.
        overwrite: replace an existing file at ``path``.
        dpi: resolution of the PNG.

    Returns:
        The path written.

    Raises:
        TypeError / ValueError: bad arguments.
        MedSegAIInputError: the grids differ, or ``path`` exists and ``overwrite`` is false.
    """
    _check_pair(image, labels)
    if not isinstance(dpi, int) or dpi < 20:
        raise ValueError(f"dpi must be an integer >= 20, got {dpi!r}")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    if out.exists() and not overwrite:
        raise MedSegAIInputError(f"{out} already exists; choose another file name or allow overwriting.")
    views, colors, names, present, (low, high) = _prepare_views(image, labels, labels_spec, window)

    optional_import("matplotlib", "Drawing the preview image")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    widths = [v[1].shape[1] for v in views]
    heights = [v[1].shape[0] * v[3] for v in views]
    figure = Figure(figsize=(12, 4.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3, gridspec_kw={"width_ratios": [w / max(heights) for w in widths]})
    for axis, (name, grey2d, labels2d, aspect) in zip(axes, views):
        axis.imshow(np.asarray(grey2d, dtype=np.float32), cmap="gray", vmin=low, vmax=high, aspect=aspect,
                    interpolation="nearest")
        axis.imshow(_overlay_rgba(np.asarray(labels2d), colors), aspect=aspect, interpolation="nearest")
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0].text(0.01, 0.5, "R", color="yellow", transform=axes[0].transAxes, va="center")
    axes[0].text(0.97, 0.5, "L", color="yellow", transform=axes[0].transAxes, va="center")
    axes[0].text(0.5, 0.97, "A", color="yellow", transform=axes[0].transAxes, ha="center", va="top")
    axes[1].text(0.01, 0.5, "R", color="yellow", transform=axes[1].transAxes, va="center")
    axes[1].text(0.97, 0.5, "L", color="yellow", transform=axes[1].transAxes, va="center")
    axes[2].text(0.01, 0.5, "A", color="yellow", transform=axes[2].transAxes, va="center")
    axes[2].text(0.97, 0.5, "P", color="yellow", transform=axes[2].transAxes, va="center")
    handles = [
        Patch(facecolor=colors[value], edgecolor="black", label=names.get(value, f"label {value}"))
        for value in sorted(present)
    ]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    else:
        figure.text(0.5, 0.02, "no segments", ha="center")
    if title:
        figure.suptitle(title)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.9 if title else 0.95, bottom=0.1, wspace=0.03)

    with atomic_output(out, overwrite=overwrite) as temp:  # created with the user's umask, like the .seg.nrrd
        figure.savefig(temp, dpi=dpi, format="png")
    return out
