"""DICOM folders: find the image series in a folder tree and read one as a 3D :class:`Volume`.

Headers are read with pydicom (``stop_before_pixels``); slices are sorted by their position along
the slice normal (``ImageOrientationPatient``), and a series is refused with a clear
:class:`MedSegAIInputError` rather than silently distorted when slices are missing, unevenly
spaced, sheared (gantry tilt), of mixed orientation or size, single-slice (2D), multi-frame or
RGB. Pixels are decoded with pydicom (pylibjpeg handles JPEG 2000 and JPEG) or, when pydicom has
no decoder for the transfer syntax, with SimpleITK/GDCM; ``RescaleSlope``/``RescaleIntercept``
are applied per slice. Only non-identifying metadata (modality, series description, series UID)
is kept.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MedSegAIInputError
from ..core.image import Volume

__all__ = ["DicomSeriesInfo", "scan_dicom_folder", "read_dicom_series", "read_series", "is_dicom_file", "describe_series"]

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_MIN_FILE_SIZE = 132
_HEADER_ERRORS = (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, IndexError, struct.error)


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One DICOM image series found in a folder.

    Attributes:
        uid: SeriesInstanceUID ("" when the files have none).
        description: SeriesDescription ("" when absent).
        modality: Modality such as ``CT`` or ``MR``.
        num_slices: number of images (frames) in the series.
        files: the series' files, in name order (not yet sorted by position).
    """

    uid: str
    description: str
    modality: str
    num_slices: int
    files: tuple[Path, ...]

    def summary(self) -> str:
        """One line: UID, description, modality and slice count (no patient data)."""
        uid = self.uid or "(no SeriesInstanceUID)"
        description = self.description or "(no description)"
        return f"{uid}  {description!r}  {self.modality or '?'}  {self.num_slices} slices"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file with the DICOM Part 10 ``DICM`` preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: Path) -> Any | None:
    """pydicom dataset without pixels, or None for non-DICOM, DICOMDIR and non-image files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if path.name.upper() == "DICOMDIR" or not is_dicom_file(path):
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError,) + _HEADER_ERRORS:
        return None  # damaged or non-image file: skipped (a damaged slice then shows as a missing slice)
    meta = getattr(header, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
        return None
    if "Rows" not in header or "Columns" not in header:
        return None
    return header


def _text(header: Any, keyword: str) -> str:
    value = header.get(keyword, "")
    return "" if value is None else str(value).strip()


def _frames(header: Any) -> int:
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def scan_dicom_folder(folder: str | os.PathLike) -> list[DicomSeriesInfo]:
    """Find the DICOM image series in ``folder`` and its sub-folders.

    Non-DICOM files, DICOMDIR files and non-image objects (reports, structure sets) are skipped.

    Returns:
        One :class:`DicomSeriesInfo` per SeriesInstanceUID, sorted by description then UID.

    Raises:
        MedSegAIInputError: ``folder`` is not a folder or contains no DICOM image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedSegAIInputError(f"DICOM folder {folder} does not exist or is not a folder; check the path.")
    groups: dict[str, dict[str, Any]] = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if not path.is_file() or path.stat().st_size < _MIN_FILE_SIZE:
                continue
            header = _read_header(path)
            if header is None:
                continue
            uid = _text(header, "SeriesInstanceUID")
            group = groups.setdefault(
                uid,
                {
                    "description": _text(header, "SeriesDescription"),
                    "modality": _text(header, "Modality"),
                    "frames": 0,
                    "files": [],
                },
            )
            group["frames"] += _frames(header)
            group["files"].append(path)
    if not groups:
        raise MedSegAIInputError(
            f"no DICOM image files found in {folder}; pass a folder that holds a DICOM series, "
            "or an image file (.nrrd, .nii, .nii.gz, .mha, .mhd)."
        )
    series = [
        DicomSeriesInfo(uid, g["description"], g["modality"], g["frames"], tuple(g["files"]))
        for uid, g in groups.items()
    ]
    return sorted(series, key=lambda s: (s.description, s.uid))


def describe_series(series: list[DicomSeriesInfo]) -> str:
    """Multi-line listing of ``series`` (one :meth:`DicomSeriesInfo.summary` per line)."""
    return "\n".join(f"  {info.summary()}" for info in series)


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one DICOM series of ``folder`` (searched recursively) as a 3D volume.

    Args:
        folder: folder holding the series, possibly among other series and files.
        series_uid: SeriesInstanceUID to read; required when the folder holds several series.

    Returns:
        Volume, array ``(z, y, x)`` with rescale slope/intercept applied (integer type when the
        rescale is integral, e.g. int16 Hounsfield units, else float32); ``origin`` is the first
        slice's position, ``direction`` columns are the row, column and slice-normal directions
        (LPS). ``metadata`` holds ``modality``, ``series_description`` and ``series_uid``.

    Raises:
        MedSegAIInputError: no series, several series and no ``series_uid``, unknown
            ``series_uid``, or a series that is not a regular 3D grey-value volume.
    """
    series = scan_dicom_folder(folder)
    if series_uid is not None:
        wanted = str(series_uid).strip()
        chosen = [info for info in series if info.uid == wanted]
        if not chosen:
            raise MedSegAIInputError(
                f"DICOM series {wanted} is not in {folder}; pass --series with one of these UIDs:\n"
                + describe_series(series)
            )
        info = chosen[0]
    elif len(series) > 1:
        raise MedSegAIInputError(
            f"DICOM folder {folder} holds {len(series)} series; choose one by passing --series UID "
            "with one of these UIDs (UID, description, modality, slices):\n" + describe_series(series)
        )
    else:
        info = series[0]
    return read_series(info)


def read_series(info: DicomSeriesInfo) -> Volume:
    """Read the series described by ``info`` (see :func:`read_dicom_series`)."""
    import pydicom

    name = f"DICOM series {info.description or info.uid or '(unnamed)'!r}"
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in info.files]
    _check_pixel_format(headers, name)
    geometry = _series_geometry(headers, name)
    order = geometry.pop("order")
    files = [info.files[i] for i in order]
    headers = [headers[i] for i in order]
    try:
        array = _read_pixels_pydicom(files, headers, name)
    except _DecoderMissing:
        array = _read_pixels_sitk(files, name)
    return Volume(
        array=array,
        metadata={"modality": info.modality, "series_description": info.description, "series_uid": info.uid},
        **geometry,
    )


def _check_pixel_format(headers: list[Any], name: str) -> None:
    first = headers[0]
    if any(_frames(h) > 1 for h in headers):
        raise MedSegAIInputError(
            f"{name} is a multi-frame (enhanced) DICOM object, which MedSegAI does not read; convert it to "
            "a .nrrd or .nii.gz volume (for example in 3D Slicer) and pass that file."
        )
    if any(int(h.get("SamplesPerPixel", 1) or 1) != 1 for h in headers) or not _text(
        first, "PhotometricInterpretation"
    ).startswith("MONOCHROME"):
        raise MedSegAIInputError(
            f"{name} holds colour (RGB) images ({_text(first, 'PhotometricInterpretation') or 'unknown'}), but "
            "MedSegAI needs a grey-value 3D volume; pass a greyscale series."
        )
    if len(headers) == 1:
        raise MedSegAIInputError(
            f"{name} has a single slice (a 2D image), but MedSegAI needs a 3D volume; pass a series with "
            "several slices."
        )
    sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(sizes) > 1:
        raise MedSegAIInputError(
            f"{name} mixes slice sizes {sorted(sizes)}, so it is not one 3D volume; pass a series whose "
            "slices all have the same size."
        )


def _vector(header: Any, keyword: str, length: int, name: str) -> np.ndarray:
    value = header.get(keyword)
    try:
        vector = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        vector = np.array([])
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise MedSegAIInputError(
            f"{name} lacks a valid {keyword} (e.g. a screenshot or secondary capture), so it has no 3D "
            "geometry; pass an original image series."
        )
    return vector


def _series_geometry(headers: list[Any], name: str) -> dict[str, Any]:
    """Sort order, spacing, origin and direction of the slices; refuse irregular stacks."""
    orientations = np.array([_vector(h, "ImageOrientationPatient", 6, name) for h in headers])
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise MedSegAIInputError(
            f"{name} mixes slice orientations (e.g. a localizer), so it is not one 3D volume; pass a series "
            "whose slices are parallel."
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    pixel_spacings = np.array([_vector(h, "PixelSpacing", 2, name) for h in headers])
    if not np.allclose(pixel_spacings, pixel_spacings[0], rtol=1e-3) or np.any(pixel_spacings[0] <= 0):
        raise MedSegAIInputError(f"{name} mixes pixel spacings, so it is not one 3D volume; pass a regular series.")
    positions = np.array([_vector(h, "ImagePositionPatient", 3, name) for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        raise MedSegAIInputError(
            f"{name} has several slices at the same position (it holds several volumes, e.g. time points, "
            "echoes or repeated scans); split it into one series per volume and pass one of them."
        )
    step = float(np.median(steps))
    tolerance = 0.01 * step + 0.01
    irregular = np.flatnonzero(np.abs(steps - step) > tolerance)
    if irregular.size:
        worst = int(irregular[np.argmax(np.abs(steps[irregular] - step))])
        gap = float(steps[worst])
        multiple = round(gap / step)
        if multiple >= 2 and abs(gap - multiple * step) <= multiple * tolerance:
            raise MedSegAIInputError(
                f"{name} has missing slices: a gap of {gap:.3g} mm ({multiple - 1} slice(s) missing) "
                f"between sorted slices {worst + 1} and {worst + 2} where the spacing is {step:.3g} mm; "
                "export the complete series."
            )
        raise MedSegAIInputError(
            f"{name} has unevenly spaced slices ({float(steps.min()):.3g} to {float(steps.max()):.3g} mm apart); "
            "resample it to even spacing (for example in 3D Slicer) and pass the resulting file."
        )
    offsets = positions - positions[0]
    lateral = offsets - np.outer(offsets @ normal, normal)
    if float(np.max(np.linalg.norm(lateral, axis=1))) > 0.1 * float(pixel_spacings[0].min()) + 0.01:
        raise MedSegAIInputError(
            f"{name} has sheared slices (gantry tilt or shifted slice positions), which MedSegAI does not "
            "correct; resample it to a regular grid (for example with 3D Slicer's DICOM import) and pass that file."
        )
    return {
        "order": order,
        "spacing": (float(pixel_spacings[0][1]), float(pixel_spacings[0][0]), step),
        "origin": tuple(float(v) for v in positions[0]),
        "direction": np.column_stack([row, col, normal]),
    }


class _DecoderMissing(Exception):
    """pydicom cannot decode this transfer syntax; fall back to SimpleITK/GDCM."""


def _rescale(header: Any) -> tuple[float, float]:
    def number(keyword: str, default: float) -> float:
        value = header.get(keyword)
        try:
            return float(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            return default

    return number("RescaleSlope", 1.0), number("RescaleIntercept", 0.0)


def _output_dtype(raw_dtype: np.dtype, low: float, high: float, integral: bool) -> np.dtype:
    """Smallest sensible voxel type holding the rescaled range ``[low, high]``."""
    if not integral:
        return np.dtype(np.float32)
    candidates = [raw_dtype] if raw_dtype.kind in "iu" else []
    candidates += [np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32)]
    for dtype in candidates:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return np.dtype(np.float32)


def _read_pixels_pydicom(files: list[Path], headers: list[Any], name: str) -> np.ndarray:
    """Stack the (sorted) slices with pydicom and apply rescale slope/intercept per slice."""
    import pydicom

    raw: np.ndarray | None = None
    for index, path in enumerate(files):
        try:
            pixels = pydicom.dcmread(path).pixel_array
        except (NotImplementedError, RuntimeError, ImportError) as e:
            raise _DecoderMissing(str(e)) from e
        except (ValueError, OSError, EOFError, AttributeError, KeyError) as e:
            raise MedSegAIInputError(
                f"{name}: slice {index + 1} has unreadable pixel data (damaged or truncated file); "
                "export the series again."
            ) from e
        if raw is None:
            raw = np.empty((len(files),) + pixels.shape, dtype=pixels.dtype)
        if pixels.shape != raw.shape[1:]:
            raise MedSegAIInputError(f"{name}: slice {index + 1} has a different size; pass a regular series.")
        raw[index] = pixels
    if raw is None:
        raise ValueError("no slices to read")
    rescales = [_rescale(h) for h in headers]
    if all(r == (1.0, 0.0) for r in rescales):
        return raw
    integral = all(s.is_integer() and i.is_integer() for s, i in rescales)
    flat = raw.reshape(len(files), -1)
    ends = np.stack([flat.min(axis=1), flat.max(axis=1)], axis=1).astype(float)
    scaled = ends * np.array([[s] for s, _ in rescales]) + np.array([[i] for _, i in rescales])
    low, high = float(scaled.min()), float(scaled.max())
    dtype = _output_dtype(raw.dtype, low, high, integral)
    out = raw if dtype == raw.dtype else np.empty(raw.shape, dtype=dtype)
    work = np.float64 if dtype.kind == "f" or not integral else np.int64
    for k, (slope, intercept) in enumerate(rescales):
        out[k] = (raw[k].astype(work) * work(slope) + work(intercept)).astype(dtype)
    return out


def _read_pixels_sitk(files: list[Path], name: str) -> np.ndarray:
    """Stack the (sorted) slices with SimpleITK/GDCM, which applies rescale slope/intercept itself."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise MedSegAIInputError(
            f"{name} could not be decoded (unsupported compression or damaged files); convert it to "
            ".nrrd or .nii.gz (for example in 3D Slicer) and pass that file."
        ) from e
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedSegAIInputError(f"{name} holds colour images, but MedSegAI needs a grey-value 3D volume.")
    return sitk.GetArrayFromImage(image)
