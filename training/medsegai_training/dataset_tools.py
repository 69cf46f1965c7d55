"""Filling MedSegAI dataset folders: importing nnU-Net v2 / Medical Segmentation Decathlon raw
folders, and adding one case from image files (``medsegai dataset add``).

Every case goes through :func:`MedSegAILib.data.dataset.add_case`, the same code the Slicer module's
"Export corrected labels" uses, so the folder format, the no-overwrite rule, the salted patient
keys and the clean NRRD headers are the same whichever way a case arrives.

Accepted raw layouts:

- nnU-Net v2: ``dataset.json`` with ``channel_names`` (``{"0": "CT"}``), ``labels``
  (``{"background": 0, "liver": 1}``) and ``file_ending``; ``imagesTr/NAME_XXXX{file_ending}``
  (one file per channel) and ``labelsTr/NAME{file_ending}``; an optional ``dataset`` mapping
  ``NAME -> {"images": [...], "label": ...}`` is honoured. Region-based labels (lists of values)
  are refused.
- MSD (and nnU-Net v1): ``dataset.json`` with ``modality`` (``{"0": "FLAIR", ...}``), ``labels``
  (``{"0": "background", "1": "edema"}``) and ``training`` (``[{"image": ..., "label": ...}]``).
  A 4D image with one volume per modality is split into its channels; nnU-Net v1 split files
  (``NAME_0000.nii.gz``) are found too.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.protocol import IMPORT

__all__ = ["RawCase", "ImportResult", "read_raw_description", "import_nnunet", "add_from_files"]


@dataclass
class RawCase:
    """One training case of a raw folder.

    Attributes:
        name: the raw case identifier (e.g. ``"BRATS_001"``); used only as the patient key,
            which the dataset stores as a salted hash.
        images: one path per channel, or a single 4D path (``split_4d``).
        label: label file.
        split_4d: ``images`` is one 4D file holding all channels.
    """

    name: str
    images: list[Path]
    label: Path
    split_4d: bool = False


@dataclass
class ImportResult:
    """What :func:`import_nnunet` did."""

    dataset_dir: Path
    layout: str
    channels: list[str]
    labels: dict[str, int]
    case_ids: list[str]


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MedSegAIInputError(
            f"{path} is missing; give the nnU-Net raw dataset folder (the one holding dataset.json, imagesTr, labelsTr)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedSegAIInputError(f"{path} is not valid JSON ({e}); fix the file.") from e
    if not isinstance(data, dict):
        raise MedSegAIInputError(f"{path} must hold a JSON object.")
    return data


def _indexed_names(mapping: Any, what: str, path: Path) -> list[str]:
    """``{"0": "CT", "1": "PET"}`` -> ``["CT", "PET"]`` (keys must be 0..n-1)."""
    if not isinstance(mapping, dict) or not mapping:
        raise MedSegAIInputError(f"{path}: {what} must be a non-empty object like {{\"0\": \"CT\"}}.")
    try:
        items = sorted(((int(k), str(v)) for k, v in mapping.items()), key=lambda item: item[0])
    except ValueError as e:
        raise MedSegAIInputError(f"{path}: {what} keys must be channel numbers \"0\", \"1\", ...") from e
    if [k for k, _ in items] != list(range(len(items))):
        raise MedSegAIInputError(f"{path}: {what} keys must be 0..{len(items) - 1}, got {sorted(mapping)}.")
    return [name for _, name in items]


def _strip_dot(path: str) -> str:
    return path[2:] if path.startswith("./") else path


def read_raw_description(raw_dir: str | os.PathLike[str]) -> tuple[str, list[str], dict[str, int], list[RawCase]]:
    """Parse a raw nnU-Net v2 or MSD folder without reading images.

    Returns:
        ``(layout, channels, labels, cases)``; layout is ``"nnunet-v2"`` or ``"msd"``; labels map
        name -> value including background.

    Raises:
        MedSegAIInputError: unknown layout, region-based labels, or missing files (names the case
            and file).
    """
    raw = Path(raw_dir).expanduser().resolve()
    if not raw.is_dir():
        raise MedSegAIInputError(f"raw dataset folder {raw} does not exist; check the path.")
    json_path = raw / "dataset.json"
    data = _load_json(json_path)
    if "channel_names" in data:
        return _read_nnunet_v2(raw, data, json_path)
    if "modality" in data:
        return _read_msd(raw, data, json_path)
    raise MedSegAIInputError(
        f"{json_path} has neither \"channel_names\" (nnU-Net v2) nor \"modality\" (MSD / nnU-Net v1); "
        f"this folder is not an nnU-Net or Decathlon raw dataset."
    )


def _read_nnunet_v2(raw: Path, data: dict[str, Any], json_path: Path) -> tuple[str, list[str], dict[str, int], list[RawCase]]:
    channels = _indexed_names(data["channel_names"], "channel_names", json_path)
    labels_raw = data.get("labels")
    if not isinstance(labels_raw, dict) or not labels_raw:
        raise MedSegAIInputError(f"{json_path}: labels must be an object like {{\"background\": 0, \"liver\": 1}}.")
    labels: dict[str, int] = {}
    for name, value in labels_raw.items():
        if isinstance(value, (list, tuple)):
            raise MedSegAIInputError(
                f"{json_path}: label {name!r} is region-based ({value}); MedSegAI needs one value per label, "
                f"so convert the regions to plain labels first."
            )
        try:
            labels[str(name)] = int(value)
        except (TypeError, ValueError) as e:
            raise MedSegAIInputError(f"{json_path}: label {name!r} has a non-integer value {value!r}.") from e
    ending = data.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise MedSegAIInputError(f"{json_path}: file_ending must be given, e.g. \".nii.gz\", got {ending!r}.")

    cases: list[RawCase] = []
    explicit = data.get("dataset")
    if isinstance(explicit, dict) and explicit:
        for name, entry in sorted(explicit.items()):
            images = [(raw / _strip_dot(p)).resolve() for p in entry.get("images", [])]
            label = (raw / _strip_dot(str(entry.get("label", "")))).resolve()
            cases.append(RawCase(str(name), images, label))
    else:
        images_dir, labels_dir = raw / "imagesTr", raw / "labelsTr"
        if not images_dir.is_dir() or not labels_dir.is_dir():
            raise MedSegAIInputError(f"{raw} needs imagesTr/ and labelsTr/ folders (nnU-Net v2 raw layout).")
        pattern = re.compile(r"^(.+)_0000" + re.escape(ending) + "$")
        names = sorted(m.group(1) for p in images_dir.iterdir() if (m := pattern.match(p.name)))
        for name in names:
            images = [images_dir / f"{name}_{index:04d}{ending}" for index in range(len(channels))]
            cases.append(RawCase(name, images, labels_dir / f"{name}{ending}"))
    _check_raw_files(raw, cases, channels)
    return "nnunet-v2", channels, labels, cases


def _read_msd(raw: Path, data: dict[str, Any], json_path: Path) -> tuple[str, list[str], dict[str, int], list[RawCase]]:
    channels = _indexed_names(data["modality"], "modality", json_path)
    label_names = _indexed_names(data.get("labels"), "labels", json_path) if isinstance(data.get("labels"), dict) \
        else None
    if label_names is None:
        raise MedSegAIInputError(f"{json_path}: labels must be an object like {{\"0\": \"background\", \"1\": \"tumour\"}}.")
    labels = {name: value for value, name in enumerate(label_names)}
    training = data.get("training")
    if not isinstance(training, list) or not training:
        raise MedSegAIInputError(f"{json_path}: \"training\" must list the cases ([{{\"image\": ..., \"label\": ...}}]).")
    cases: list[RawCase] = []
    for position, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise MedSegAIInputError(f"{json_path}: training entry #{position + 1} needs \"image\" and \"label\".")
        image = (raw / _strip_dot(str(entry["image"]))).resolve()
        label = (raw / _strip_dot(str(entry["label"]))).resolve()
        name = image.name.split(".")[0]
        if image.is_file():
            cases.append(RawCase(name, [image], label, split_4d=len(channels) > 1))
            continue
        suffix = image.name[len(name):]
        split = [image.parent / f"{name}_{index:04d}{suffix}" for index in range(len(channels))]
        cases.append(RawCase(name, split, label))
    _check_raw_files(raw, cases, channels)
    return "msd", channels, labels, cases


def _check_raw_files(raw: Path, cases: list[RawCase], channels: list[str]) -> None:
    if not cases:
        raise MedSegAIInputError(f"{raw} holds no training cases (imagesTr/*_0000 files or a training list).")
    for case in cases:
        if not case.split_4d and len(case.images) != len(channels):
            raise MedSegAIInputError(
                f"case {case.name}: {len(case.images)} image file(s) for {len(channels)} channel(s) "
                f"({', '.join(channels)}); list one file per channel."
            )
        for index, path in enumerate(case.images):
            if not path.is_file():
                channel = "all channels" if case.split_4d else f"channel {channels[index]!r}"
                raise MedSegAIInputError(
                    f"case {case.name}: {channel} file {_rel(raw, path)} is missing; add it or remove the case."
                )
        if not case.label.is_file():
            raise MedSegAIInputError(f"case {case.name}: label file {_rel(raw, case.label)} is missing.")


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_4d_channels(path: Path, channels: list[str], case_name: str) -> list[Volume]:
    """Split a 4D file (x, y, z, channel) into one 3D Volume per channel."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise MedSegAIInputError(f"case {case_name}: {path.name} cannot be read (damaged or not an image).") from e
    size = image.GetSize()
    if image.GetDimension() != 4 or size[3] != len(channels):
        raise MedSegAIInputError(
            f"case {case_name}: {path.name} has size {size} but the dataset lists {len(channels)} modalities "
            f"({', '.join(channels)}); expected a 4D image with one volume per modality."
        )
    volumes = []
    for index in range(len(channels)):
        part = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, index])
        volumes.append(Volume.from_sitk(part))
    return volumes


def import_nnunet(
    raw_dir: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str],
    progress: Callable[[str, int, int, str], None] | None = None,
) -> ImportResult:
    """Import an nnU-Net v2 or MSD raw folder's training cases into a NEW MedSegAI dataset.

    The dataset is built in a temporary sibling folder and renamed into place at the end, so an
    interrupted import leaves nothing half-written.

    Args:
        raw_dir: raw folder with ``dataset.json``, ``imagesTr``, ``labelsTr``.
        dataset_dir: the dataset folder to create; must not exist (or be empty).
        progress: optional ``(stage, done, total, message)`` callback, stage ``"import"``.

    Returns:
        :class:`ImportResult` with the new case ids. Each raw case name becomes the patient key
        (stored salted-hashed), so cases of one raw name never straddle a split.

    Raises:
        MedSegAIInputError: unsupported layout, missing/corrupt files, grid mismatch or unknown
            label values (the message names the raw case and file), or an existing dataset folder.
    """
    from MedSegAILib.data.dataset import add_case
    from MedSegAILib.io.imageio import read_volume

    layout, channels, labels, cases = read_raw_description(raw_dir)
    target = Path(dataset_dir).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise MedSegAIInputError(
            f"{target} already exists; import into a new dataset folder (existing datasets are never changed)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.importing-{secrets.token_hex(4)}"
    case_ids: list[str] = []
    try:
        for done, case in enumerate(cases):
            if progress is not None:
                progress(IMPORT, done, len(cases), case.name)
            try:
                if case.split_4d:
                    images = _read_4d_channels(case.images[0], channels, case.name)
                else:
                    images = [read_volume(path) for path in case.images]
                label = read_volume(case.label)
                case_ids.append(add_case(staging, images, label, channels, labels, patient_key=case.name))
            except MedSegAIInputError as e:
                raise MedSegAIInputError(f"case {case.name}: {e}") from e
        if progress is not None:
            progress(IMPORT, len(cases), len(cases), "")
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    from MedSegAILib.data.dataset import load_dataset

    info = load_dataset(target)
    return ImportResult(target, layout, info.channels, info.labels, case_ids)


def _parse_labels(labels: dict[str, int] | str | None) -> dict[str, int] | None:
    if labels is None or isinstance(labels, dict):
        return labels
    text = labels
    if os.path.isfile(text):
        text = Path(text).read_text(encoding="utf-8")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise MedSegAIInputError(
            f"--labels must be JSON like '{{\"liver\": 1, \"spleen\": 2}}' or a JSON file, got {labels!r}."
        ) from e
    if not isinstance(parsed, dict):
        raise MedSegAIInputError(f"--labels must be a JSON object name -> value, got {labels!r}.")
    return parsed


def add_from_files(
    dataset_dir: str | os.PathLike[str],
    image_paths: Sequence[str | os.PathLike[str]],
    label_path: str | os.PathLike[str],
    patient_key: str | None = None,
    channel_names: Sequence[str] | None = None,
    labels: dict[str, int] | str | None = None,
    source_model: dict[str, Any] | None = None,
) -> str:
    """Add one case from files (``medsegai dataset add``); same code path as the Slicer export.

    Args:
        dataset_dir: dataset folder (created when absent).
        image_paths: one image file or DICOM folder per channel, in channel order.
        label_path: labelmap file on the first image's grid.
        patient_key: per-patient key, stored only as a salted hash (None: its own anonymous patient).
        channel_names: channel names; default: the existing dataset's, else ``channel_0``, ...
        labels: name -> value (dict, JSON text or JSON file); default: the existing dataset's,
            else ``label_<value>`` for each non-zero value found in the label file.
        source_model: ``{"id": ..., "version": ...}`` if a model made the first mask.

    Returns:
        The new case id.

    Raises:
        MedSegAIInputError: unreadable files, grid mismatch, label values not in the labels,
            or channels/labels that differ from the existing dataset.
    """
    import numpy as np

    from MedSegAILib.data.dataset import DATASET_JSON, add_case, load_dataset
    from MedSegAILib.io.imageio import read_volume

    if isinstance(image_paths, (str, os.PathLike)):
        image_paths = [image_paths]
    if not image_paths:
        raise MedSegAIInputError("no image given; pass one image file per channel with --images.")
    label_map = _parse_labels(labels)
    root = Path(dataset_dir).expanduser()
    existing = load_dataset(root) if (root / DATASET_JSON).is_file() else None
    if channel_names is None:
        channel_names = existing.channels if existing else [f"channel_{i}" for i in range(len(image_paths))]
    channel_names = list(channel_names)
    if len(channel_names) != len(image_paths):
        raise MedSegAIInputError(
            f"{len(image_paths)} image(s) given but the dataset has {len(channel_names)} channel(s) "
            f"({', '.join(channel_names)}); pass one image per channel in that order."
        )
    images = [read_volume(path) for path in image_paths]
    label = read_volume(label_path)
    if label_map is None:
        if existing is not None:
            label_map = existing.labels
        else:
            values = sorted(int(v) for v in np.unique(np.asarray(label.array)) if int(v) != 0)
            if not values:
                raise MedSegAIInputError(
                    f"{label_path} contains only background and no --labels were given; give the label names with --labels."
                )
            label_map = {"background": 0, **{f"label_{v}": v for v in values}}
    return add_case(root, images, label, channel_names, label_map, patient_key=patient_key, source_model=source_model)
