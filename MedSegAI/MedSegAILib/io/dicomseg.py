"""DICOM Segmentation objects (DICOM SEG) of a labelmap computed on a DICOM series.

A SEG is made with highdicom: one binary segment per model label (name, colour, SNOMED-CT
category and type from the model card), the algorithm's identification (model id and version),
the source series' frame of reference, geometry, study and patient identifiers (the SEG belongs to
the patient's study: it is the one output that keeps them), a reference to every source image,
and only the frames that hold a segment. highdicom is imported when a SEG is made, so the rest of
the engine runs without it (Slicer's Python has no highdicom).

Array layout: labelmaps are ``(z, y, x)`` on the source series' grid (``dicom.read_series``
order: slices sorted along the slice normal); SEG frames follow the source images.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MedSegAIInputError
from ..core.image import Volume, present_values
from ..core.labels import LabelEntry, label_entries

__all__ = ["SEG_SOP_CLASS_UID", "build_dicom_seg", "check_source_headers", "require_highdicom", "read_dicom_seg_labels", "read_source_headers", "write_dicom_seg"]

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
_FALLBACK_CATEGORY = ("85756007", "SCT", "Tissue")
_FALLBACK_TYPE = ("85756007", "SCT", "Tissue")
_SERIES_NUMBER = 9000
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
_INSTALL_HINT = "install it with `pip install highdicom` (or `pip install -e .[dicom]` in the MedSegAI folder)"


def require_highdicom() -> Any:
    """highdicom, or one clear error naming what to install."""
    try:
        import highdicom
    except ImportError as e:
        raise MedSegAIInputError(f"writing or reading a DICOM SEG needs the highdicom package; {_INSTALL_HINT}.") from e
    return highdicom


def read_source_headers(folder: str | os.PathLike, series_uid: str) -> list[Any]:
    """The headers (no pixels) of the series ``series_uid`` in ``folder`` (searched recursively).

    Raises:
        MedSegAIInputError: the folder holds no such series.
    """
    import pydicom

    from .dicom import scan_dicom_folder

    chosen = [info for info in scan_dicom_folder(folder) if info.uid == series_uid]
    if not chosen:
        raise MedSegAIInputError(f"DICOM series {series_uid} is no longer in {folder}; the folder changed during the run.")
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in chosen[0].files]


def _slice_indices(headers: Sequence[Any], labels: Volume) -> list[int]:
    """Index along ``labels``' slice axis of each header's image (by its position)."""
    normal = labels.direction[:, 2]
    origin = np.asarray(labels.origin, dtype=float)
    step = float(labels.spacing[2])
    indices = []
    for header in headers:
        position = np.array([float(v) for v in header.ImagePositionPatient], dtype=float)
        along = float((position - origin) @ normal) / step
        index = int(round(along))
        if abs(along - index) > 0.05 or not 0 <= index < labels.shape[0]:
            raise ValueError("the labels are not on the source series' grid (a slice position does not match)")
        indices.append(index)
    if sorted(indices) != list(range(labels.shape[0])):
        raise ValueError("the labels are not on the source series' grid (slice count or positions differ)")
    return indices


def check_source_headers(headers: Sequence[Any]) -> list[Any]:
    """Copies of ``headers`` with the SOP class/instance UIDs a SEG references.

    An empty SOPClassUID/SOPInstanceUID is taken from the file meta information (the same values
    by definition); a series without StudyInstanceUID, SeriesInstanceUID or FrameOfReferenceUID
    (removed by some anonymisers) cannot be referenced, which is one clear error.
    """
    out = []
    for header in headers:
        header = copy.copy(header)
        meta = getattr(header, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(header.get(keyword, "") or "") and meta is not None and str(meta.get(meta_keyword, "") or ""):
                setattr(header, keyword, str(meta.get(meta_keyword)))
        missing = [k for k in _REQUIRED_UIDS if not str(header.get(k, "") or "").strip()]
        if missing:
            raise MedSegAIInputError(
                f"the DICOM series has no {' and no '.join(missing)} (removed by anonymisation?), so a DICOM SEG "
                "cannot reference it; write a .seg.nrrd output instead, or give the series its UIDs back."
            )
        out.append(header)
    return out


def _code(triple: Any) -> Any:
    """A pydicom ``Code`` from a ``{scheme, code, meaning}`` dict or a ``(code, scheme, meaning)`` triple."""
    from pydicom.sr.coding import Code

    if isinstance(triple, dict):
        return Code(str(triple["code"]), str(triple["scheme"]), str(triple["meaning"]))
    value, scheme, meaning = triple
    return Code(value, scheme, meaning)


def _segment_descriptions(hd: Any, entries: Sequence[LabelEntry], model_id: str, model_version: str) -> list[Any]:
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_id, family=codes.cid7162.ArtificialIntelligence, version=model_version, source="MedSegAI"
    )
    descriptions = []
    for number, entry in enumerate(entries, start=1):
        terminology = entry.terminology or {}
        category = _code(terminology.get("category", _FALLBACK_CATEGORY))
        kind = _code(terminology.get("type", _FALLBACK_TYPE))
        red, green, blue = (int(round(255 * float(c))) for c in entry.color)
        color = hd.color.CIELabColor.from_rgb(red, green, blue)
        regions = [_code(terminology["anatomic_region"])] if "anatomic_region" in terminology else None
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(entry.name)[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=regions,
            display_color=color,
        )
        if "type_modifier" in terminology:
            modifier = CodedConcept.from_code(_code(terminology["type_modifier"]))
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
        descriptions.append(description)
    return descriptions


def build_dicom_seg(
    labels: Volume,
    labels_spec: Any,
    source_headers: Sequence[Any],
    model_id: str,
    model_version: str,
    model_name: str = "",
) -> Any:
    """Make the DICOM SEG dataset of ``labels`` computed on the series ``source_headers``.

    Args:
        labels: integer labelmap, array ``(z, y, x)``, on exactly the source series' grid.
        labels_spec: the model's labels (``labels.label_entries`` forms): every label becomes a
            segment (numbered 1.. in this order) with its name, colour and terminology.
        source_headers: pydicom datasets (pixels not needed) of every image of the source series.
        model_id: algorithm name recorded in each segment.
        model_version: algorithm version.
        model_name: human-readable model name for the series description.

    Returns:
        A ``highdicom.seg.Segmentation`` (a pydicom Dataset), binary, empty frames omitted.

    Raises:
        MedSegAIInputError: highdicom is missing.
        ValueError: the labels are not on the source grid or hold values no label names.
    """
    from .. import __version__

    hd = require_highdicom()
    if not isinstance(labels, Volume) or labels.array.ndim != 3 or labels.array.dtype.kind not in "iub":
        raise TypeError("labels must be a 3D integer Volume")
    if not source_headers:
        raise ValueError("source_headers is empty")
    entries = label_entries(labels_spec)
    source_headers = check_source_headers(source_headers)
    first = source_headers[0]
    if (int(first.Rows), int(first.Columns)) != labels.shape[1:]:
        raise ValueError(f"the labels' slices {labels.shape[1:]} do not match the source images ({first.Rows}, {first.Columns})")
    indices = _slice_indices(source_headers, labels)
    top = max(e.value for e in entries)
    numbers = np.zeros(max(top, int(labels.array.max(initial=0))) + 1, dtype=np.uint16)
    for number, entry in enumerate(entries, start=1):
        numbers[entry.value] = number
    unnamed = present_values(labels.array) - {0} - {e.value for e in entries}
    if unnamed:
        raise ValueError(f"labels contain values {sorted(unnamed)} that labels_spec does not name")
    frames = numbers[np.asarray(labels.array)[indices]]
    if len(entries) < 256:
        frames = frames.astype(np.uint8)
    software = f"MedSegAI {__version__}; {model_id} {model_version}"
    return hd.seg.Segmentation(
        source_images=list(source_headers),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(hd, entries, model_id, model_version),
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MedSegAI",
        manufacturer_model_name=model_id[:64],
        software_versions=software[:64],
        device_serial_number="0",
        content_label="MEDSEGAI",
        content_description=f"AI segmentation by {model_id} {model_version}"[:64],
        series_description=f"MedSegAI {model_name or model_id}"[:64],
        omit_empty_frames=True,
    )


def write_dicom_seg(path: str | os.PathLike, dataset: Any, overwrite: bool = False) -> Path:
    """Write a SEG dataset as a DICOM Part 10 file, atomically.

    Raises:
        MedSegAIInputError: ``path`` exists (without ``overwrite``) or is a folder.
    """
    import pydicom

    from .imageio import atomic_output

    path = Path(path)
    with atomic_output(path, overwrite) as temp:
        try:
            pydicom.dcmwrite(str(temp), dataset, enforce_file_format=True)
        except TypeError:  # pydicom < 3
            pydicom.dcmwrite(str(temp), dataset, write_like_original=False)
    return path


def read_dicom_seg_labels(path: str | os.PathLike, source_headers: Sequence[Any], labels_spec: Any) -> np.ndarray:
    """A SEG read back with highdicom as a labelmap ``(z, y, x)`` on the source grid.

    Frames are placed by their referenced source images, ordered like ``source_headers`` sorted
    along the slice normal (the order of ``dicom.read_series``); segment ``n`` becomes the value
    of the ``n``-th entry of ``labels_spec``.
    """

    hd = require_highdicom()
    seg = hd.seg.segread(str(path))
    first = source_headers[0]
    row, col = (np.array([float(v) for v in first.ImageOrientationPatient[i : i + 3]]) for i in (0, 3))
    normal = np.cross(row, col)
    ordered = sorted(source_headers, key=lambda h: float(np.array([float(v) for v in h.ImagePositionPatient]) @ normal))
    uids = [str(h.SOPInstanceUID) for h in ordered]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True, ignore_spatial_locations=True
    )
    entries = label_entries(labels_spec)
    values = np.zeros(len(entries) + 1, dtype=np.uint16)
    for number, entry in enumerate(entries, start=1):
        values[number] = entry.value
    return values[np.asarray(pixels)]
