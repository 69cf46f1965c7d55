"""The MedSegAI dataset folder: what the Slicer export and ``medsegai dataset add`` write and
what the training package reads.

Layout (nnU-Net style file naming)::

    DATASET/
      dataset.json                 {"format": "medsegai-dataset", "version": 1, "channels": ["CT"],
                                    "labels": {"background": 0, "liver": 1}, "file_ending": ".nrrd",
                                    "patient_salt": "<random hex>",
                                    "cases": [{"id": "case_0001", "patient": "p_3f2a...",
                                               "images": ["images/case_0001_0000.nrrd"],
                                               "label": "labels/case_0001.nrrd",
                                               "source_model": {"id": ..., "version": ...},
                                               "changed_voxels": 1234, "added": "2026-11-21"}]}
      images/case_0001_0000.nrrd   one file per channel (_0000, _0001, ... in channel order)
      labels/case_0001.nrrd        uint8 labelmap on exactly the images' grid

Rules kept by this module:

- Case ids are generated sequentially (``case_0001``, ``case_0002``, ...); an existing case or file
  is never overwritten. Every file is written to a temporary name and then linked/renamed into
  place; ``dataset.json`` is replaced atomically. A lock file serialises concurrent writers.
- Patient keys are stored only as a salted hash (``p_`` + 16 hex digits of HMAC-SHA256 with the
  dataset's random ``patient_salt``), so two cases of one patient share a key and the real id is
  never written. A case added without a key becomes its own anonymous patient.
- NRRD files are written through SimpleITK from bare arrays and geometry: the header holds only
  the NRRD geometry fields (no patient name, id, birth date or acquisition date); file names hold
  only case ids.

Arrays follow :class:`MedSegAILib.core.image.Volume`: ``(z, y, x)`` numpy order, spacing/origin in
``(x, y, z)`` mm, LPS direction.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.errors import MedSegAIInputError
from ..core.filelock import exclusive_lock
from ..core.image import Volume, present_values

__all__ = [
    "load_dataset_for_model",
    "DATASET_FORMAT",
    "DATASET_VERSION",
    "FILE_ENDING",
    "CaseInfo",
    "DatasetInfo",
    "DatasetProblem",
    "DatasetReport",
    "create_dataset",
    "add_case",
    "load_dataset",
    "read_case",
    "check_dataset",
    "hash_patient_key",
]

DATASET_FORMAT = "medsegai-dataset"
DATASET_VERSION = 1
FILE_ENDING = ".nrrd"
DATASET_JSON = "dataset.json"
IMAGES_DIR = "images"
LABELS_DIR = "labels"
_LOCK_NAME = ".medsegai-dataset.lock"
_LOCK_WAIT_S = 120.0
_CASE_ID_RE = re.compile(r"^case_(\d{4,})$")
_CASE_FILE_RE = re.compile(r"^(case_\d{4,})(?:_\d{4})?\.")


# ----------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------


@dataclass
class CaseInfo:
    """One case of a dataset.

    Attributes:
        id: generated case id, e.g. ``"case_0001"``.
        patient: salted patient hash (``"p_..."``); cases of one patient share it.
        images: absolute paths, one per channel, in the dataset's channel order.
        label: absolute path of the uint8 labelmap.
        source_model: ``{"id": ..., "version": ...}`` of the model that made the first mask, or None.
        changed_voxels: number of voxels the user changed after the model, or None.
        added: ISO date the case was added, or None.
    """

    id: str
    patient: str
    images: list[Path]
    label: Path
    source_model: dict[str, Any] | None = None
    changed_voxels: int | None = None
    added: str | None = None


@dataclass
class DatasetInfo:
    """A parsed ``dataset.json`` with absolute paths.

    Attributes:
        root: the dataset folder (absolute).
        channels: channel names in file order (``_0000``, ``_0001``, ...).
        labels: label name -> value, always including ``"background": 0``.
        file_ending: file suffix of every image and label (``".nrrd"``).
        cases: the cases in the order they were added.
    """

    root: Path
    channels: list[str]
    labels: dict[str, int]
    file_ending: str
    cases: list[CaseInfo]

    @property
    def num_classes(self) -> int:
        """Number of network output classes: the largest label value + 1."""
        return max(self.labels.values()) + 1

    @property
    def foreground_labels(self) -> dict[str, int]:
        """Labels without the background (value 0)."""
        return {name: value for name, value in self.labels.items() if value != 0}

    def case(self, case_id: str) -> CaseInfo:
        """Return the case with id ``case_id``.

        Raises:
            MedSegAIInputError: no such case.
        """
        for case in self.cases:
            if case.id == case_id:
                return case
        known = ", ".join(c.id for c in self.cases[:10]) or "none"
        raise MedSegAIInputError(
            f"Case {case_id!r} is not in dataset {self.root}; known cases: {known}."
        )

    def patients(self) -> dict[str, list[str]]:
        """Patient hash -> case ids (for patient-level splits)."""
        result: dict[str, list[str]] = {}
        for case in self.cases:
            result.setdefault(case.patient, []).append(case.id)
        return result


@dataclass
class DatasetProblem:
    """One problem found by :func:`check_dataset`.

    Attributes:
        message: what is wrong and what to do.
        case: case id, or None for dataset-wide problems.
        file: path relative to the dataset folder, or None.
    """

    message: str
    case: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        if self.case and self.file:
            return f"{self.case} ({self.file}): {self.message}"
        if self.case or self.file:
            return f"{self.case or self.file}: {self.message}"
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "file": self.file, "message": self.message}


@dataclass
class DatasetReport:
    """Result of :func:`check_dataset`.

    Attributes:
        dataset_dir: the checked folder.
        channels: channel names from ``dataset.json`` (empty if unreadable).
        labels: label name -> value from ``dataset.json``.
        num_cases: number of cases listed.
        num_patients: number of distinct patient hashes.
        errors: problems that make the dataset unusable for training.
        warnings: suspicious but usable things (e.g. a label with no voxels at all).
        label_voxels: label name -> total voxel count over all readable cases.
        cases_with_label: label name -> number of cases containing that label.
        case_label_voxels: case id -> {label name: voxel count}.
        case_corrections: case id -> ``{"changed_voxels": int | None, "source_model": "id version" | None}``:
            how many voxels the user corrected after the model (recorded at export; None when the
            case was added without a model's first mask, e.g. imported) — what a fine-tune learns from.
        geometry: summary: ``sizes_xyz`` (min/max), ``spacing_xyz`` (min/max), ``oblique_cases``.
    """

    dataset_dir: Path
    channels: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    num_cases: int = 0
    num_patients: int = 0
    errors: list[DatasetProblem] = field(default_factory=list)
    warnings: list[DatasetProblem] = field(default_factory=list)
    label_voxels: dict[str, int] = field(default_factory=dict)
    cases_with_label: dict[str, int] = field(default_factory=dict)
    case_label_voxels: dict[str, dict[str, int]] = field(default_factory=dict)
    case_corrections: dict[str, dict[str, Any]] = field(default_factory=dict)
    geometry: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when there are no errors."""
        return not self.errors

    def bad_cases(self) -> list[str]:
        """Ids of cases that have at least one error."""
        return sorted({p.case for p in self.errors if p.case})

    def raise_if_errors(self) -> None:
        """Raise one :class:`MedSegAIInputError` summarising the errors (for ``train``).

        Raises:
            MedSegAIInputError: when ``errors`` is not empty.
        """
        if not self.errors:
            return
        shown = "; ".join(str(p) for p in self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        raise MedSegAIInputError(
            f"Dataset {self.dataset_dir} has {len(self.errors)} problem(s): {shown}{more}; "
            f"run `medsegai dataset check {self.dataset_dir}` and fix or remove those cases."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.dataset_dir),
            "channels": list(self.channels),
            "labels": dict(self.labels),
            "num_cases": self.num_cases,
            "num_patients": self.num_patients,
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
            "label_voxels": dict(self.label_voxels),
            "cases_with_label": dict(self.cases_with_label),
            "case_label_voxels": {k: dict(v) for k, v in self.case_label_voxels.items()},
            "case_corrections": {k: dict(v) for k, v in self.case_corrections.items()},
            "geometry": dict(self.geometry),
        }

    def format(self) -> str:
        """Human-readable multi-line report (what ``medsegai dataset check`` prints)."""
        lines = [f"Dataset: {self.dataset_dir}"]
        lines.append(f"  cases: {self.num_cases}   patients: {self.num_patients}")
        if self.channels:
            lines.append(f"  channels: {', '.join(self.channels)}")
        if self.labels:
            lines.append("  labels:")
            for name, value in sorted(self.labels.items(), key=lambda item: item[1]):
                voxels = self.label_voxels.get(name, 0)
                cases = self.cases_with_label.get(name, 0)
                lines.append(f"    {value:3d} {name:<24s} {voxels:>12d} voxels in {cases} case(s)")
        if self.case_corrections:
            lines.append("  corrections (voxels the user changed after the model; what a fine-tune learns from):")
            for case_id, record in self.case_corrections.items():
                changed = record.get("changed_voxels")
                if changed is None:
                    lines.append(f"    {case_id:<12s} {'-':>12s}  not recorded (added without a model's first mask)")
                else:
                    source = record.get("source_model")
                    origin = f" of {source}'s mask" if source else ""
                    lines.append(f"    {case_id:<12s} {changed:>12d}  voxels corrected{origin}")
        geometry = self.geometry
        if geometry.get("sizes_xyz"):
            lines.append(
                "  geometry: size (x,y,z) {} .. {}; spacing (x,y,z) mm {} .. {}; oblique cases: {}".format(
                    tuple(geometry["sizes_xyz"]["min"]),
                    tuple(geometry["sizes_xyz"]["max"]),
                    tuple(round(s, 4) for s in geometry["spacing_xyz"]["min"]),
                    tuple(round(s, 4) for s in geometry["spacing_xyz"]["max"]),
                    geometry.get("oblique_cases", 0),
                )
            )
        lines.append(f"  errors: {len(self.errors)}")
        lines.extend(f"    ERROR {p}" for p in self.errors)
        lines.append(f"  warnings: {len(self.warnings)}")
        lines.extend(f"    warning {p}" for p in self.warnings)
        lines.append("  result: " + ("OK" if self.ok else "NOT USABLE for training until the errors are fixed"))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _normalise_channels(channel_names: Sequence[str]) -> list[str]:
    if isinstance(channel_names, (str, bytes)) or not isinstance(channel_names, Sequence):
        raise TypeError(f"channel_names must be a list of strings, got {channel_names!r}")
    names = list(channel_names)
    if not names:
        raise ValueError("channel_names must name at least one channel, got []")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"channel names must be non-empty strings, got {name!r} in {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"channel names must be unique, got {names!r}")
    return names


def _normalise_labels(labels: dict[str, int]) -> dict[str, int]:
    """Validate ``labels`` (name -> value) and add ``background: 0`` when no name has value 0."""
    if not isinstance(labels, dict):
        raise TypeError(f"labels must be a dict name -> value, got {labels!r}")
    result: dict[str, int] = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"label names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"label {name!r} must have an integer value, got {value!r}")
        if not 0 <= int(value) <= 255:
            raise ValueError(f"label {name!r} value {value} is outside 0..255 (labelmaps are uint8)")
        result[name] = int(value)
    values = list(result.values())
    if len(set(values)) != len(values):
        raise ValueError(f"label values must be unique, got {labels!r}")
    if 0 not in values:
        if "background" in result:
            raise ValueError(f"label 'background' must have value 0, got {labels!r}")
        result = {"background": 0, **result}
    if len(result) < 2:
        raise ValueError(f"labels must contain at least one label besides the background, got {labels!r}")
    return dict(sorted(result.items(), key=lambda item: item[1]))


def hash_patient_key(patient_key: str, salt: str) -> str:
    """Salted, one-way patient hash: ``"p_"`` + 16 hex digits of HMAC-SHA256(salt, key).

    Args:
        patient_key: any stable per-patient string (e.g. an internal pseudonym or the DICOM
            PatientID); it is never stored.
        salt: the dataset's ``patient_salt``.
    """
    if not isinstance(patient_key, str) or not patient_key.strip():
        raise ValueError(f"patient_key must be a non-empty string, got {patient_key!r}")
    digest = hmac.new(salt.encode("utf-8"), patient_key.strip().encode("utf-8"), hashlib.sha256)
    return "p_" + digest.hexdigest()[:16]


def _label_array(label: Volume, labels: dict[str, int], what: str) -> np.ndarray:
    """Return the label voxels as uint8, refusing non-integer or unknown values."""
    array = np.asarray(label.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise MedSegAIInputError(f"The {what} has {array.dtype} voxels; give an integer labelmap.")
        if not np.array_equal(array, np.round(array)):
            raise MedSegAIInputError(
                f"The {what} has non-integer voxel values; give a labelmap with integer label values."
            )
    present = present_values(array)
    unknown = sorted(present - set(labels.values()))
    if unknown:
        known = ", ".join(f"{n}={v}" for n, v in labels.items())
        raise MedSegAIInputError(
            f"The {what} contains label value(s) {unknown} that are not in the dataset's labels "
            f"({known}); add them to the labels or fix the labelmap."
        )
    return array.astype(np.uint8, copy=False)


def _check_volume_3d(volume: Any, what: str) -> None:
    if not isinstance(volume, Volume):
        raise TypeError(f"{what} must be a MedSegAILib.core.image.Volume, got {type(volume).__name__}")
    if np.asarray(volume.array).ndim != 3:
        raise MedSegAIInputError(
            f"The {what} has shape {np.asarray(volume.array).shape}; a 3D scalar volume (z, y, x) is needed."
        )
    if np.asarray(volume.array).size == 0:
        raise MedSegAIInputError(f"The {what} is empty (no voxels).")


# ----------------------------------------------------------------------------------------------
# File helpers (clean NRRD writing, reading, locking, atomic JSON)
# ----------------------------------------------------------------------------------------------


def _clean_sitk_image(volume: Volume, array: np.ndarray | None = None) -> Any:
    """A SimpleITK image with only geometry: no metadata dictionary entries at all."""
    data = np.asarray(volume.array if array is None else array)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    clean = Volume(array=np.ascontiguousarray(data), spacing=volume.spacing, origin=volume.origin,
                   direction=volume.direction)
    image = clean.to_sitk()
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return image


def _write_clean_nrrd(path: Path, volume: Volume, array: np.ndarray | None = None) -> None:
    """Write ``volume`` (or ``array`` on its grid) as a gzip NRRD without metadata; never overwrite.

    Written through :func:`MedSegAILib.io.imageio.atomic_output` (temporary file + rename), so readers
    never see a partial file; the caller holds the dataset lock, so no other export races for the name.
    """
    import SimpleITK as sitk

    from ..io.imageio import atomic_output

    path = Path(path)
    if path.exists():
        raise MedSegAIInputError(f"{path} already exists; MedSegAI never overwrites dataset files.")
    image = _clean_sitk_image(volume, array)
    with atomic_output(path, overwrite=False) as temp:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(temp))
        writer.SetUseCompression(True)
        writer.Execute(image)


def _read_volume(path: Path) -> Volume:
    """Read an image file with the engine's reader (geometry and voxel type unchanged)."""
    from ..io.imageio import read_volume

    return read_volume(path)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (temporary file + rename) with ``data`` as indented JSON."""
    from ..io.imageio import atomic_output

    with atomic_output(path, overwrite=True) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def _dataset_lock(root: Path) -> Iterator[None]:
    """Exclusive lock so that two exports never pick the same case id or lose an entry."""
    lock = root / _LOCK_NAME
    message = (
        f"Dataset {root} is busy with another export ({lock}); wait for it to finish and try again."
    )
    with exclusive_lock(lock, _LOCK_WAIT_S, message):
        yield


def _read_json(root: Path) -> dict[str, Any]:
    path = root / DATASET_JSON
    if not root.is_dir():
        raise MedSegAIInputError(f"Dataset folder {root} does not exist; check the path.")
    if not path.is_file():
        raise MedSegAIInputError(
            f"{path} is missing; {root} is not a MedSegAI dataset (create one with `medsegai dataset add` "
            f"or import one with `medsegai dataset import-nnunet`)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedSegAIInputError(f"{path} is not valid JSON ({e}); restore it from a backup.") from e
    if not isinstance(data, dict) or data.get("format") != DATASET_FORMAT:
        raise MedSegAIInputError(
            f"{path} is not a MedSegAI dataset description (\"format\" must be {DATASET_FORMAT!r}); "
            f"import nnU-Net/MSD folders with `medsegai dataset import-nnunet`."
        )
    if data.get("version") != DATASET_VERSION:
        raise MedSegAIInputError(
            f"{path} has dataset version {data.get('version')!r}; this MedSegAI reads version {DATASET_VERSION}."
        )
    return data


def _header_from_json(data: dict[str, Any], path: Path) -> tuple[list[str], dict[str, int], str]:
    try:
        channels = _normalise_channels(data.get("channels"))  # type: ignore[arg-type]
        labels_raw = data.get("labels")
        labels = _normalise_labels(labels_raw)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise MedSegAIInputError(f"{path} has invalid channels or labels: {e}.") from e
    if labels != labels_raw:
        raise MedSegAIInputError(f"{path} labels must include \"background\": 0, got {labels_raw!r}.")
    file_ending = data.get("file_ending", FILE_ENDING)
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise MedSegAIInputError(f"{path} has an invalid file_ending {file_ending!r}; use \".nrrd\".")
    return channels, labels, file_ending


def _safe_relative(root: Path, relative: Any) -> Path | None:
    """Absolute path of a dataset-relative entry, or None when it escapes the folder."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        return None
    candidate = (root / relative).resolve()
    try:
        candidate.relative_to(root.resolve())
    except ValueError:
        return None
    return candidate


def _parse_cases(
    root: Path, data: dict[str, Any], channels: list[str], problems: list[DatasetProblem] | None
) -> list[CaseInfo]:
    """Parse the case list. With ``problems`` given, collect structural problems; else raise."""

    def problem(message: str, case: str | None = None, file: str | None = None) -> None:
        item = DatasetProblem(message, case, file)
        if problems is None:
            raise MedSegAIInputError(f"{root / DATASET_JSON}: {item}")
        problems.append(item)

    raw_cases = data.get("cases", [])
    if not isinstance(raw_cases, list):
        problem("\"cases\" must be a list; restore dataset.json from a backup.", file=DATASET_JSON)
        return []
    cases: list[CaseInfo] = []
    seen: set[str] = set()
    for position, entry in enumerate(raw_cases):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            problem(f"case entry #{position + 1} has no id; remove or fix it in dataset.json.", file=DATASET_JSON)
            continue
        case_id = entry["id"]
        if case_id in seen:
            problem("the case id is listed twice in dataset.json; remove the duplicate entry.", case_id, DATASET_JSON)
            continue
        seen.add(case_id)
        images = entry.get("images")
        if not isinstance(images, list):
            problem("the case has no \"images\" list in dataset.json.", case_id, DATASET_JSON)
            continue
        if len(images) != len(channels):
            missing = channels[len(images):] if len(images) < len(channels) else []
            detail = f"channel(s) {missing} missing" if missing else "more image files than channels"
            problem(
                f"{detail}: the case lists {len(images)} image file(s) but the dataset has "
                f"{len(channels)} channel(s) ({', '.join(channels)}); add the missing channel or remove the case.",
                case_id,
                DATASET_JSON,
            )
            continue
        image_paths: list[Path] = []
        bad = False
        for rel in images:
            absolute = _safe_relative(root, rel)
            if absolute is None:
                problem(f"image path {rel!r} is not a relative path inside the dataset.", case_id, DATASET_JSON)
                bad = True
                break
            image_paths.append(absolute)
        label_path = _safe_relative(root, entry.get("label"))
        if label_path is None:
            problem(f"label path {entry.get('label')!r} is not a relative path inside the dataset.", case_id,
                    DATASET_JSON)
            bad = True
        if bad:
            continue
        patient = entry.get("patient")
        if not isinstance(patient, str) or not patient:
            patient = f"case:{case_id}"
        changed = entry.get("changed_voxels")
        cases.append(
            CaseInfo(
                id=case_id,
                patient=patient,
                images=image_paths,
                label=label_path,  # type: ignore[arg-type]
                source_model=entry.get("source_model") if isinstance(entry.get("source_model"), dict) else None,
                changed_voxels=int(changed) if isinstance(changed, int) and not isinstance(changed, bool) else None,
                added=entry.get("added") if isinstance(entry.get("added"), str) else None,
            )
        )
    return cases


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def create_dataset(dataset_dir: str | os.PathLike[str], channel_names: Sequence[str],
                   labels: dict[str, int]) -> Path:
    """Create an empty dataset folder (or return an existing one with the same channels/labels).

    Args:
        dataset_dir: folder to create; it may exist if it is empty.
        channel_names: channel names in file order, e.g. ``["T1post", "FLAIR"]``.
        labels: label name -> value (0..255); ``"background": 0`` is added when no label has value 0.

    Returns:
        The absolute dataset folder.

    Raises:
        MedSegAIInputError: the folder holds other files, or a dataset with different
            channels/labels.
        ValueError, TypeError: invalid ``channel_names`` or ``labels``.
    """
    channels = _normalise_channels(channel_names)
    label_map = _normalise_labels(labels)
    root = Path(dataset_dir).expanduser().resolve()
    if (root / DATASET_JSON).exists():
        data = _read_json(root)
        _check_same_header(root, data, channels, label_map)
        return root
    if root.exists():
        if not root.is_dir():
            raise MedSegAIInputError(f"{root} is a file; give a folder for the dataset.")
        leftovers = [p.name for p in root.iterdir() if p.name != _LOCK_NAME]
        if leftovers:
            raise MedSegAIInputError(
                f"{root} is not empty and has no dataset.json; choose a new or empty folder for the dataset."
            )
    root.mkdir(parents=True, exist_ok=True)
    (root / IMAGES_DIR).mkdir(exist_ok=True)
    (root / LABELS_DIR).mkdir(exist_ok=True)
    data = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "channels": channels,
        "labels": label_map,
        "file_ending": FILE_ENDING,
        "patient_salt": secrets.token_hex(16),
        "cases": [],
    }
    with _dataset_lock(root):
        if not (root / DATASET_JSON).exists():
            _write_json_atomic(root / DATASET_JSON, data)
    return root


def _check_same_header(root: Path, data: dict[str, Any], channels: list[str], labels: dict[str, int]) -> None:
    existing_channels, existing_labels, _ = _header_from_json(data, root / DATASET_JSON)
    if existing_channels != channels:
        raise MedSegAIInputError(
            f"Dataset {root} has channels {existing_channels} but this case has {channels}; "
            f"export to a new dataset folder or use the same channels in the same order."
        )
    if existing_labels != labels:
        raise MedSegAIInputError(
            f"Dataset {root} has labels {existing_labels} but this case uses {labels}; "
            f"export to a new dataset folder or use the same label names and values."
        )


def _next_case_number(root: Path, data: dict[str, Any]) -> int:
    """One more than the largest case number in dataset.json or on disk (ids are never reused)."""
    numbers = [0]
    for entry in data.get("cases", []):
        match = _CASE_ID_RE.match(str(entry.get("id", ""))) if isinstance(entry, dict) else None
        if match:
            numbers.append(int(match.group(1)))
    for sub in (IMAGES_DIR, LABELS_DIR):
        folder = root / sub
        if folder.is_dir():
            for path in folder.iterdir():
                match = _CASE_FILE_RE.match(path.name)
                if match:
                    numbers.append(int(_CASE_ID_RE.match(match.group(1)).group(1)))  # type: ignore[union-attr]
    return max(numbers) + 1


def add_case(
    dataset_dir: str | os.PathLike[str],
    images: list[Volume],
    label: Volume,
    channel_names: list[str],
    labels: dict[str, int],
    patient_key: str | None = None,
    source_model: dict[str, Any] | None = None,
    changed_voxels: int | None = None,
) -> str:
    """Add one case (one image per channel + its labelmap) to a dataset, creating it if needed.

    Args:
        dataset_dir: the dataset folder (created when absent).
        images: one :class:`Volume` per channel, arrays ``(z, y, x)``, all on the same grid.
        label: labelmap ``(z, y, x)`` on exactly the images' grid; values must be label values.
        channel_names: channel names in the order of ``images``; must equal the dataset's.
        labels: label name -> value; must equal the dataset's (``background: 0`` implied).
        patient_key: a stable per-patient key; stored only as a salted hash. None makes the case
            its own anonymous patient.
        source_model: ``{"id": ..., "version": ...}`` of the model that produced the first mask.
        changed_voxels: how many voxels the user changed after the model.

    Returns:
        The new case id (``"case_0001"``, ...).

    Raises:
        MedSegAIInputError: grid mismatch, unknown label values, channel/label mismatch with the
            existing dataset, or an unwritable folder.
        TypeError, ValueError: malformed arguments.
    """
    channels = _normalise_channels(channel_names)
    label_map = _normalise_labels(labels)
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of Volume, got {type(images).__name__}")
    if len(images) != len(channels):
        raise MedSegAIInputError(
            f"{len(images)} image(s) given for {len(channels)} channel(s) ({', '.join(channels)}); "
            f"give one volume per channel."
        )
    for name, image in zip(channels, images):
        _check_volume_3d(image, f"image for channel {name!r}")
    _check_volume_3d(label, "label volume")
    reference = images[0]
    for name, image in zip(channels[1:], images[1:]):
        if not image.same_grid(reference):
            raise MedSegAIInputError(
                f"Channel {name!r} ({image.geometry_description()}) is not on the grid of channel "
                f"{channels[0]!r} ({reference.geometry_description()}); resample it onto the first channel first."
            )
    if not label.same_grid(reference):
        raise MedSegAIInputError(
            f"The label volume ({label.geometry_description()}) is not on the image grid "
            f"({reference.geometry_description()}); export the labelmap on the input volume's grid."
        )
    label_array = _label_array(label, label_map, "label volume")
    if changed_voxels is not None and (isinstance(changed_voxels, bool) or not isinstance(changed_voxels, (int, np.integer))
                                       or changed_voxels < 0):
        raise ValueError(f"changed_voxels must be a non-negative int or None, got {changed_voxels!r}")
    if source_model is not None and not isinstance(source_model, dict):
        raise TypeError(f"source_model must be a dict or None, got {source_model!r}")

    root = create_dataset(dataset_dir, channels, label_map)
    with _dataset_lock(root):
        data = _read_json(root)
        _check_same_header(root, data, channels, label_map)
        salt = data.get("patient_salt")
        if not isinstance(salt, str) or not salt:
            salt = secrets.token_hex(16)
            data["patient_salt"] = salt
        if patient_key is None:
            patient = hash_patient_key(secrets.token_hex(16), salt)
        else:
            patient = hash_patient_key(patient_key, salt)
        number = _next_case_number(root, data)
        case_id = f"case_{number:04d}"
        image_rel = [f"{IMAGES_DIR}/{case_id}_{index:04d}{FILE_ENDING}" for index in range(len(channels))]
        label_rel = f"{LABELS_DIR}/{case_id}{FILE_ENDING}"
        written: list[Path] = []
        try:
            (root / IMAGES_DIR).mkdir(exist_ok=True)
            (root / LABELS_DIR).mkdir(exist_ok=True)
            for rel, image in zip(image_rel, images):
                _write_clean_nrrd(root / rel, image)
                written.append(root / rel)
            _write_clean_nrrd(root / label_rel, reference, label_array)
            written.append(root / label_rel)
            entry: dict[str, Any] = {"id": case_id, "patient": patient, "images": image_rel, "label": label_rel}
            if source_model is not None:
                entry["source_model"] = {str(k): v for k, v in source_model.items()}
            if changed_voxels is not None:
                entry["changed_voxels"] = int(changed_voxels)
            entry["added"] = datetime.date.today().isoformat()
            data.setdefault("cases", []).append(entry)
            _write_json_atomic(root / DATASET_JSON, data)
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
    return case_id


def load_dataset(dataset_dir: str | os.PathLike[str]) -> DatasetInfo:
    """Read ``dataset.json`` (files are not opened; use :func:`check_dataset` for that).

    Returns:
        :class:`DatasetInfo` with absolute paths.

    Raises:
        MedSegAIInputError: missing/invalid ``dataset.json`` or a malformed case entry (message
            names the case).
    """
    root = Path(dataset_dir).expanduser().resolve()
    data = _read_json(root)
    channels, labels, file_ending = _header_from_json(data, root / DATASET_JSON)
    cases = _parse_cases(root, data, channels, None)
    return DatasetInfo(root=root, channels=channels, labels=labels, file_ending=file_ending, cases=cases)


def load_dataset_for_model(dataset_dir: str | os.PathLike[str], card: Any, purpose: str) -> DatasetInfo:
    """:func:`load_dataset` of a dataset that must feed ``card``'s channels and hold cases.

    Args:
        dataset_dir: the dataset folder.
        card: the model card (``channels``, ``channel_names``, ``id``).
        purpose: what the cases are for, ending the message (e.g. ``"to calibrate"``).

    Raises:
        MedSegAIInputError: the channel count differs from the model's, or there are no cases.
    """
    dataset = load_dataset(dataset_dir)
    if len(dataset.channels) != len(card.channels):
        raise MedSegAIInputError(
            f"dataset {dataset_dir} has {len(dataset.channels)} channel(s) ({', '.join(dataset.channels)}) but model "
            f"'{card.id}' needs {len(card.channels)} ({', '.join(card.channel_names)}); give a dataset for this model."
        )
    if not dataset.cases:
        raise MedSegAIInputError(f"dataset {dataset_dir} has no cases; add cases before using it {purpose}.")
    return dataset


def _relative(info_root: Path, path: Path) -> str:
    try:
        return path.relative_to(info_root).as_posix()
    except ValueError:
        return str(path)


def read_case(info: DatasetInfo, case: CaseInfo | str) -> tuple[list[Volume], Volume]:
    """Read one case's images (one per channel) and labelmap.

    Args:
        info: from :func:`load_dataset`.
        case: a :class:`CaseInfo` or a case id.

    Returns:
        ``(images, label)``: volumes with ``(z, y, x)`` arrays; ``label.array`` is uint8.

    Raises:
        MedSegAIInputError: a missing/corrupt file, grid mismatch or unknown label value; the
            message names the case id and the file.
    """
    if isinstance(case, str):
        case = info.case(case)
    if not isinstance(case, CaseInfo):
        raise TypeError(f"case must be a CaseInfo or a case id, got {case!r}")

    def load(path: Path, what: str) -> Volume:
        rel = _relative(info.root, path)
        if not path.is_file():
            raise MedSegAIInputError(f"{case.id} ({rel}): {what} file is missing; restore it or remove the case.")
        try:
            volume = _read_volume(path)
        except (MedSegAIInputError, RuntimeError, OSError, ValueError) as e:
            raise MedSegAIInputError(
                f"{case.id} ({rel}): {what} file cannot be read ({e}); replace it or remove the case."
            ) from e
        if np.asarray(volume.array).ndim != 3:
            raise MedSegAIInputError(f"{case.id} ({rel}): {what} is not a 3D scalar volume.")
        return volume

    images = [load(path, f"channel {name!r} image") for name, path in zip(info.channels, case.images)]
    label = load(case.label, "label")
    for name, path, image in zip(info.channels, case.images, images):
        if not image.same_grid(images[0]):
            raise MedSegAIInputError(
                f"{case.id} ({_relative(info.root, path)}): channel {name!r} is not on the grid of the first channel."
            )
    if not label.same_grid(images[0]):
        raise MedSegAIInputError(
            f"{case.id} ({_relative(info.root, case.label)}): label grid ({label.geometry_description()}) "
            f"differs from the image grid ({images[0].geometry_description()})."
        )
    try:
        array = _label_array(label, info.labels, "label")
    except MedSegAIInputError as e:
        raise MedSegAIInputError(f"{case.id} ({_relative(info.root, case.label)}): {e}") from e
    return images, label.with_array(array)


def check_dataset(dataset_dir: str | os.PathLike[str]) -> DatasetReport:
    """Open every file of a dataset and report all problems (never raises for dataset problems).

    Checks: ``dataset.json`` present and valid, at least one case, every channel file and label
    present and readable, 3D, channels and label on one grid, label values listed in
    ``dataset.json``. Warnings: labels never present, cases with an empty label, files on disk
    that no case lists.

    Returns:
        :class:`DatasetReport` with per-case problems (case id + file), voxel counts per label
        and a geometry summary.
    """
    root = Path(dataset_dir).expanduser().resolve()
    report = DatasetReport(dataset_dir=root)
    try:
        data = _read_json(root)
        channels, labels, _ = _header_from_json(data, root / DATASET_JSON)
    except MedSegAIInputError as e:
        report.errors.append(DatasetProblem(str(e), None, DATASET_JSON))
        return report
    report.channels, report.labels = channels, labels
    problems: list[DatasetProblem] = []
    cases = _parse_cases(root, data, channels, problems)
    report.errors.extend(problems)
    raw_cases = data.get("cases") if isinstance(data.get("cases"), list) else []
    report.num_cases = len(raw_cases)
    report.num_patients = len({c.patient for c in cases})
    if not raw_cases:
        report.errors.append(
            DatasetProblem("the dataset has no cases; add cases with `medsegai dataset add` or the Slicer export.",
                           None, DATASET_JSON)
        )
    report.label_voxels = {name: 0 for name in labels}
    report.cases_with_label = {name: 0 for name in labels}
    value_to_name = {value: name for name, value in labels.items()}
    sizes: list[tuple[int, int, int]] = []
    spacings: list[tuple[float, float, float]] = []
    oblique = 0
    referenced: set[Path] = set()

    for case in cases:
        referenced.update(case.images)
        referenced.add(case.label)
        source = case.source_model if isinstance(case.source_model, dict) else None
        report.case_corrections[case.id] = {
            "changed_voxels": case.changed_voxels,
            "source_model": " ".join(str(source[k]) for k in ("id", "version") if source.get(k)) or None
            if source else None,
        }
        volumes: list[tuple[str, Volume]] = []
        case_ok = True
        for name, path in zip(channels, case.images):
            rel = _relative(root, path)
            volume = _check_file(report, case.id, rel, path, f"channel {name!r} image")
            if volume is None:
                case_ok = False
                continue
            volumes.append((rel, volume))
        label_rel = _relative(root, case.label)
        label = _check_file(report, case.id, label_rel, case.label, "label")
        if label is None or not volumes:
            continue
        first_rel, first = volumes[0]
        for rel, volume in volumes[1:]:
            if not volume.same_grid(first):
                case_ok = False
                report.errors.append(DatasetProblem(
                    f"image grid ({volume.geometry_description()}) differs from {first_rel} "
                    f"({first.geometry_description()}); resample the channels onto one grid.", case.id, rel))
        if not label.same_grid(first):
            report.errors.append(DatasetProblem(
                f"label grid ({label.geometry_description()}) differs from the image grid "
                f"({first.geometry_description()}, {first_rel}); export the label on the image grid.",
                case.id, label_rel))
            case_ok = False
        array = np.asarray(label.array)
        if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
            if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
                report.errors.append(DatasetProblem(
                    "label has non-integer voxel values; store an integer labelmap.", case.id, label_rel))
                continue
        values, counts = np.unique(array.astype(np.int64), return_counts=True)
        unknown = [int(v) for v in values if int(v) not in value_to_name]
        if unknown:
            known = ", ".join(f"{n}={v}" for n, v in labels.items())
            report.errors.append(DatasetProblem(
                f"label value(s) {unknown} are not in dataset.json labels ({known}); fix the labelmap or the labels.",
                case.id, label_rel))
            case_ok = False
        per_case: dict[str, int] = {}
        for value, count in zip(values, counts):
            name = value_to_name.get(int(value))
            if name is None:
                continue
            per_case[name] = int(count)
            report.label_voxels[name] += int(count)
            report.cases_with_label[name] += 1
        report.case_label_voxels[case.id] = per_case
        if not any(count for name, count in per_case.items() if labels[name] != 0):
            report.warnings.append(DatasetProblem("label contains only background.", case.id, label_rel))
        if case_ok:
            sizes.append(first.size_xyz)
            spacings.append(first.spacing)
            if not np.allclose(np.abs(first.direction), np.eye(3), atol=1e-3) and not _is_permutation(first.direction):
                oblique += 1

    for name, value in labels.items():
        if value != 0 and report.case_label_voxels and report.label_voxels.get(name, 0) == 0:
            report.warnings.append(DatasetProblem(
                f"label {name!r} (value {value}) has no voxels in any case.", None, DATASET_JSON))
    for sub in (IMAGES_DIR, LABELS_DIR):
        folder = root / sub
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_file() and not path.name.startswith(".") and path.resolve() not in referenced:
                    report.warnings.append(DatasetProblem(
                        "file is not listed in dataset.json (ignored).", None, _relative(root, path.resolve())))
    if sizes:
        report.geometry = {
            "sizes_xyz": {"min": [int(v) for v in np.min(sizes, axis=0)], "max": [int(v) for v in np.max(sizes, axis=0)]},
            "spacing_xyz": {"min": [float(v) for v in np.min(spacings, axis=0)],
                            "max": [float(v) for v in np.max(spacings, axis=0)]},
            "oblique_cases": oblique,
        }
    return report


def _is_permutation(direction: np.ndarray) -> bool:
    rounded = np.round(np.abs(direction))
    return bool(np.allclose(np.abs(direction), rounded, atol=1e-3) and np.allclose(rounded.sum(axis=0), 1))


def _check_file(report: DatasetReport, case_id: str, rel: str, path: Path, what: str) -> Volume | None:
    if not path.is_file():
        report.errors.append(DatasetProblem(f"{what} file is missing; restore it or remove the case.", case_id, rel))
        return None
    try:
        volume = _read_volume(path)
    except (MedSegAIInputError, RuntimeError, OSError, ValueError) as e:
        report.errors.append(DatasetProblem(
            f"{what} file is corrupt or unreadable ({_short(e)}); replace it or remove the case.", case_id, rel))
        return None
    if np.asarray(volume.array).ndim != 3:
        report.errors.append(DatasetProblem(f"{what} is not a 3D scalar volume.", case_id, rel))
        return None
    return volume


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 160 else text[:157] + "..."
