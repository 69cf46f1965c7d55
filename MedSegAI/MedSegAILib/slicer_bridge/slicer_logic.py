"""The Slicer module's logic, on any ``vtkMRMLScene``: segment, fill the scene, export, fine-tune.

``MedSegAI.py`` (the scripted module) is a thin GUI over this module and its neighbours
(:mod:`engine_process`, :mod:`dependencies`, :mod:`MedSegAILib.model.store`); the pytest suites drive it with
``slicer-core``'s real MRML. Nothing here imports Qt, and ``slicer`` is imported only inside
functions (through :mod:`MedSegAILib.slicer_bridge.mrml`).

A segmentation runs the engine in its own process (:class:`SegmentationRun`)::

    python -m MedSegAILib.cli segment CH0.nrrd [CH1.nrrd ...] -o TMP/labels.nrrd --model FOLDER
           --progress json --measurements TMP/measurements.json --device D --backend B --overlap X
           [--tta] [--batch-size N] [post-processing switches]

and a fine-tune runs ``python -m MedSegAILib.cli train DATASET -o TMP/model --init FOLDER
--progress json`` (:class:`FineTuneRun`). The scene is changed only by
:meth:`SegmentationRun.finish` after a successful run; failure and cancel leave it as it was.

Arrays follow :class:`MedSegAILib.core.image.Volume`: ``(z, y, x)``, LPS geometry.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import mrml
from ..model.backends import BACKENDS, DEVICES
from ..model.precision import PRECISIONS
from .engine_process import (
    EngineFailedError,
    EngineProcess,
    ProgressEvent,
    check_python_executable,
    engine_environment,
    import_training_module,
)
from ..core.errors import MedSegAIInputError, ModelFolderError
from ..core.image import Volume
from ..model.store import install_model_folder
from ..protocol import TRAINING_STAGE_WEIGHTS

__all__ = [
    "EngineOptions",
    "SegmentationRun",
    "SceneResult",
    "FineTuneRun",
    "SOURCE_MODEL_ATTRIBUTE",
    "resolve_model",
    "run_segmentation_blocking",
    "segments_to_be_replaced",
    "export_for_training",
    "dataset_case_count",
    "dataset_case_changed_voxels",
    "start_fine_tune",
    "fine_tune_plan",
    "write_case_report",
]

# Segmentation node attribute recording which model produced the first mask (JSON).
SOURCE_MODEL_ATTRIBUTE = "MedSegAI.SourceModel"




@dataclass
class EngineOptions:
    """What the Advanced section of the panel sets.

    Attributes:
        device: ``"auto"``, ``"cpu"`` or ``"gpu"``.
        backend: ``"auto"``, ``"tensorflow"`` or ``"onnx"``.
        overlap: sliding-window overlap in [0, 1).
        tta: flip test-time augmentation.
        batch_size: windows per network call; None = the model's default.
        postprocessing: False = plain argmax (no post-processing at all).
        largest_component: keep the largest component of each label; None = model default.
        fill_holes: fill holes in each label; None = model default.
        min_island_mm3: remove islands smaller than this; None = model default.
        python_executable: the engine's Python; None/"" = Slicer's own (or this interpreter).
        uncertainty: also compute the uncertainty map (``segment --uncertainty``); the result's
            ``uncertainty`` is then a uint8 Volume on the first input's grid (0 certain … 255 maximal).
        precision: ``"auto"``, ``"fp32"`` or ``"int8"`` (the model folder's validated int8 file).
    """

    device: str = "auto"
    backend: str = "auto"
    overlap: float = 0.5
    tta: bool = False
    batch_size: int | None = None
    postprocessing: bool = True
    largest_component: bool | None = None
    fill_holes: bool | None = None
    min_island_mm3: float | None = None
    python_executable: str | None = None
    uncertainty: bool = False
    precision: str = "auto"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        if self.device not in DEVICES:
            raise ValueError(f"device must be auto, cpu or gpu, got {self.device!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 <= float(self.overlap) < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32 or int8, got {self.precision!r}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size!r}")
        if self.min_island_mm3 is not None and float(self.min_island_mm3) < 0:
            raise ValueError(f"min_island_mm3 must be >= 0 or None, got {self.min_island_mm3!r}")

    def inference_arguments(self) -> list[str]:
        """How the network runs: the options ``medsegai segment`` and ``medsegai rank`` share."""
        self.validate()
        args = ["--device", self.device, "--backend", self.backend, "--overlap", repr(float(self.overlap))]
        if self.precision != "auto":
            args += ["--precision", self.precision]
        if self.tta:
            args.append("--tta")
        if self.batch_size:
            args += ["--batch-size", str(int(self.batch_size))]
        return args

    def cli_arguments(self) -> list[str]:
        """The ``medsegai segment`` options for these settings."""
        args = self.inference_arguments()
        if not self.postprocessing:
            args.append("--no-postprocessing")
            return args
        if self.largest_component is not None:
            args.append("--largest-component" if self.largest_component else "--no-largest-component")
        if self.fill_holes is not None:
            args.append("--fill-holes" if self.fill_holes else "--no-fill-holes")
        if self.min_island_mm3 is not None:
            args += ["--min-island-mm3", repr(float(self.min_island_mm3))]
        return args


def resolve_model(model: Any) -> Any:
    """A :class:`MedSegAILib.model.modelcard.ModelCard` from a card, a model id or a model folder.

    Raises:
        ModelFolderError: unknown id, or a folder that fails validation.
    """
    from ..model.modelcard import ModelCard, find_model

    if isinstance(model, ModelCard):
        return model
    if model is None or (isinstance(model, str) and not model.strip()):
        raise ModelFolderError("No model is selected; select an installed model or import one.")
    return find_model(str(model))


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


@dataclass
class SceneResult:
    """What :meth:`SegmentationRun.finish` put into the scene.

    Attributes:
        segmentation_node: the filled ``vtkMRMLSegmentationNode``.
        table_node: the measurements ``vtkMRMLTableNode`` (None when the engine wrote none).
        labels: the AI labelmap (uint8 ``(z, y, x)`` on the first input's grid), kept to count
            the voxels the user changes before export.
        measurements: measurement rows as the engine wrote them.
        card: the model card used.
        segment_ids: ids of the label segments, in label order.
        seconds: wall time of the run.
        uncertainty: with ``EngineOptions.uncertainty``, the uint8 uncertainty map (``(z, y, x)``
            on the first input's grid, 0 certain … 255 maximal; read before the temporary folder
            goes, so it is a Volume, not a path), else None. Not added to the scene here.
    """

    segmentation_node: Any
    table_node: Any
    labels: Volume
    measurements: list[dict[str, Any]]
    card: Any
    segment_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    uncertainty: Volume | None = None


def _write_input(path: Path, volume: Volume) -> None:
    """Uncompressed NRRD with only geometry in the header (fast to write and read)."""
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path), False)


def _read_labels(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise EngineFailedError(f"The engine finished but its result could not be read ({e}); run the segmentation again.") from e
    return Volume.from_sitk(image)


class SegmentationRun(EngineProcess):
    """One segmentation of the selected volume nodes in a separate engine process.

    Args:
        volume_nodes: one scalar volume node per model channel, in the model's channel order.
        model: a ModelCard, model id or model folder.
        output_segmentation_node: segmentation node to fill; None creates
            ``"<first volume name> MedSegAI"`` in :meth:`finish`.
        options: :class:`EngineOptions`.
        temp_root: where the run's temporary folder goes (default: the system temp folder).

    Raises:
        MedSegAIInputError: (from :meth:`start`) missing/wrong volumes, wrong channel count,
            invalid model, bad engine Python.
    """

    def __init__(self, volume_nodes: Sequence[Any], model: Any, output_segmentation_node: Any = None,
                 options: EngineOptions | None = None, temp_root: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.volume_nodes = list(volume_nodes) if volume_nodes is not None else []
        self.model = model
        self.output_segmentation_node = output_segmentation_node
        self.options = options or EngineOptions()
        self.temp_root = temp_root
        self.card: Any = None
        self.input_volumes: list[Volume] = []
        self.python_executable = ""
        self.labels_path: Path | None = None
        self.measurements_path: Path | None = None
        self.uncertainty_path: Path | None = None

    def prepare(self) -> None:
        """Validate model, options and inputs (no files written, nothing started)."""
        self.options.validate()
        self.card = resolve_model(self.model)
        channels = list(self.card.channel_names)
        nodes = self.volume_nodes
        if not nodes or all(node is None for node in nodes):
            raise MedSegAIInputError(f"No input volume is selected; select a volume for {channels[0]}.")
        if len(nodes) < len(channels) or any(node is None for node in nodes[: len(channels)]):
            missing = [name for index, name in enumerate(channels) if index >= len(nodes) or nodes[index] is None]
            raise MedSegAIInputError(
                f"Model {self.card.name} needs {len(channels)} input volumes ({', '.join(channels)}); "
                f"select a volume for {', '.join(missing)}."
            )
        if len(nodes) > len(channels) and any(node is not None for node in nodes[len(channels):]):
            raise MedSegAIInputError(
                f"Model {self.card.name} takes {len(channels)} input volume(s) ({', '.join(channels)}) but "
                f"{sum(node is not None for node in nodes)} are selected; clear the extra selections."
            )
        self.volume_nodes = list(nodes[: len(channels)])
        # views, not copies: start() writes them to files at once; afterwards only their geometry is used
        self.input_volumes = [
            mrml.volume_from_node(node, name, copy=False) for node, name in zip(self.volume_nodes, channels)
        ]
        self.python_executable = check_python_executable(self.options.python_executable)

    def start(self) -> "SegmentationRun":
        """Validate, write the inputs to a temporary folder and start the engine; returns self."""
        if self.process is not None:
            raise RuntimeError("this run was already started")
        self.prepare()
        self.temp_dir = Path(tempfile.mkdtemp(prefix="medsegai-run-", dir=self.temp_root))
        try:
            files = []
            for index, volume in enumerate(self.input_volumes):
                path = self.temp_dir / f"channel_{index:04d}.nrrd"
                _write_input(path, volume)
                files.append(str(path))
            self.labels_path = self.temp_dir / "labels.nrrd"
            self.measurements_path = self.temp_dir / "measurements.json"
            command = [
                self.python_executable, "-m", "MedSegAILib.cli", "segment", *files,
                "-o", str(self.labels_path), "--model", str(self.card.folder), "--progress", "json",
                "--measurements", str(self.measurements_path), *self.options.cli_arguments(),
            ]
            if self.options.uncertainty:
                self.uncertainty_path = self.temp_dir / "uncertainty.nrrd"
                command += ["--uncertainty", str(self.uncertainty_path)]
            self._launch(command, engine_environment(self.options.python_executable), cwd=str(self.temp_dir))
        except BaseException:
            self.cleanup()
            raise
        return self

    def finish(self, scene: Any = None) -> SceneResult:
        """After a successful run: fill the output segmentation node and add the measurements table.

        Raises:
            EngineFailedError: the run failed or was cancelled (the scene is not changed).
        """
        self.check_succeeded("The segmentation engine", "The segmentation was cancelled; nothing was added to the scene.")
        try:
            if self.labels_path is None or not self.labels_path.is_file():
                raise EngineFailedError("The engine finished without writing a result; see the log and run it again.")
            labels = _read_labels(self.labels_path)
            reference_volume = self.input_volumes[0]
            if not labels.same_grid(reference_volume):
                raise EngineFailedError(
                    f"The engine result ({labels.geometry_description()}) is not on the input grid "
                    f"({reference_volume.geometry_description()}); report this problem."
                )
            labels = reference_volume.with_array(np.asarray(labels.array).astype(np.uint8, copy=False))
            uncertainty = self._read_uncertainty(reference_volume)
            rows = self._read_measurements()
            scene = scene or self.volume_nodes[0].GetScene()
            result = self._fill_scene(scene, labels, rows)
            result.uncertainty = uncertainty
        finally:
            self.cleanup()
        result.seconds = time.monotonic() - self.start_time
        return result

    def _read_uncertainty(self, reference_volume: Volume) -> Volume | None:
        if self.uncertainty_path is None:
            return None
        if not self.uncertainty_path.is_file():
            raise EngineFailedError("The engine finished without writing the uncertainty map; see the log and run it again.")
        uncertainty = _read_labels(self.uncertainty_path)
        if not uncertainty.same_grid(reference_volume):
            raise EngineFailedError(
                f"The uncertainty map ({uncertainty.geometry_description()}) is not on the input grid "
                f"({reference_volume.geometry_description()}); report this problem."
            )
        return reference_volume.with_array(np.asarray(uncertainty.array).astype(np.uint8, copy=False))

    def _read_measurements(self) -> list[dict[str, Any]]:
        if self.measurements_path is None or not self.measurements_path.is_file():
            return []
        try:
            data = json.loads(self.measurements_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return []
        rows = data.get("segments", []) if isinstance(data, dict) else data
        return [dict(row) for row in rows if isinstance(row, Mapping)] if isinstance(rows, list) else []

    def _fill_scene(self, scene: Any, labels: Volume, rows: list[dict[str, Any]]) -> SceneResult:
        reference_node = self.volume_nodes[0]
        created: list[Any] = []
        try:
            segmentation_node = self.output_segmentation_node
            if segmentation_node is None:
                segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference_node.GetName()} MedSegAI")
                created.append(segmentation_node)
            segment_ids = mrml.update_segmentation_node(segmentation_node, labels, self.card, reference_node)
            segmentation_node.SetAttribute(SOURCE_MODEL_ATTRIBUTE, json.dumps(
                {"id": self.card.id, "version": self.card.version, "folder": str(self.card.folder)}))
            mrml.place_in_study(segmentation_node, reference_node)
            table_node = None
            if rows:
                table_node = mrml.measurements_table_node(scene, rows, f"{segmentation_node.GetName()} measurements")
                created.append(table_node)
                mrml.place_in_study(table_node, reference_node)
        except BaseException:
            for node in reversed(created):
                with contextlib.suppress(Exception):
                    _remove_node(scene, node)
            raise
        return SceneResult(segmentation_node, table_node, labels, rows, self.card, segment_ids)


def segments_to_be_replaced(segmentation_node: Any, model: Any) -> list[str]:
    """Names of segments in ``segmentation_node`` that a run of ``model`` would replace.

    The panel asks before replacing them (a user's corrections are never overwritten silently).
    """
    if segmentation_node is None:
        return []
    card = resolve_model(model)
    segmentation = segmentation_node.GetSegmentation()
    return [label.name for label in card.labels if segmentation.GetSegmentIdBySegmentName(label.name)]


def _remove_node(scene: Any, node: Any) -> None:
    display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
    scene.RemoveNode(node)
    if display is not None and display.GetScene() is scene:
        scene.RemoveNode(display)


def run_segmentation_blocking(volume_nodes: Sequence[Any], model: Any, output_segmentation_node: Any = None,
                              options: EngineOptions | None = None, progress: Callable[[ProgressEvent], None] | None = None,
                              timeout: float | None = None, temp_root: str | os.PathLike[str] | None = None) -> SceneResult:
    """Segment and wait (for tests, scripts and the in-Slicer self-test).

    Raises:
        MedSegAIInputError: bad input, invalid model or engine failure (scene unchanged).
        TimeoutError: the engine ran longer than ``timeout`` seconds (stopped, scene unchanged).
    """
    run = SegmentationRun(volume_nodes, model, output_segmentation_node, options, temp_root).start()
    try:
        run.wait(timeout=timeout, progress=progress)
    except BaseException:
        run.cancel()
        raise
    return run.finish()


def write_case_report(path: str | os.PathLike[str], segmentation_node: Any, volume_nodes: Sequence[Any], model: Any,
                      overwrite: bool = False) -> Path:
    """The one-page PDF case report of the segmentation as it is now (corrections included).

    The labels are read back from the segmentation node (segments named like the model's labels,
    on the first volume's grid) and measured again; no patient name, id or birth date is printed.
    Written in this process with numpy and Pillow only (:mod:`MedSegAILib.report.case_report`).

    Raises:
        MedSegAIInputError: no segmentation or volume, wrong channel count, bad path.
    """
    from ..report.measurements import compute_measurements
    from ..report.case_report import check_report_path, write_case_report as write_report

    if segmentation_node is None:
        raise MedSegAIInputError("No segmentation is selected; run Segment first.")
    card = resolve_model(model)
    nodes = [node for node in (volume_nodes or []) if node is not None][: len(card.channels)]
    if len(nodes) != len(card.channels):
        raise MedSegAIInputError(
            f"The report needs the {len(card.channels)} input volume(s) of {card.name} ({', '.join(card.channel_names)}); "
            "select them."
        )
    report_path = check_report_path(path, overwrite)
    images = [mrml.volume_from_node(node, name, copy=False) for node, name in zip(nodes, card.channel_names)]
    labels = mrml.labels_from_segmentation_node(segmentation_node, nodes[0], card)
    rows = compute_measurements(labels, card)
    return Path(write_report(report_path, images[0], labels, card, inputs=images, measurements=rows, overwrite=overwrite))


# --------------------------------------------------------------------------------------------
# Export for training
# --------------------------------------------------------------------------------------------


def _resample_onto(volume: Volume, reference: Volume) -> Volume:
    """Linear resampling of ``volume`` onto ``reference``'s grid (for extra channels)."""
    import SimpleITK as sitk

    resampled = sitk.Resample(volume.to_sitk(), reference.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    return reference.with_array(sitk.GetArrayFromImage(resampled))


def _patient_key(scene: Any, volume_node: Any) -> str | None:
    """The DICOM patient id of the volume's patient item (hashed later by the dataset), or None."""
    import slicer

    if scene is None:
        return None
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return None
    item = hierarchy.GetItemByDataNode(volume_node)
    scene_item = hierarchy.GetSceneItemID()
    while item and item != scene_item:
        for attribute in ("DICOM.PatientID", "DICOM.PatientName"):
            value = hierarchy.GetItemAttribute(item, attribute)
            if value:
                return value
        item = hierarchy.GetItemParent(item)
    return None


def _source_model(segmentation_node: Any, card: Any) -> dict[str, Any] | None:
    text = segmentation_node.GetAttribute(SOURCE_MODEL_ATTRIBUTE) if segmentation_node is not None else None
    if text:
        with contextlib.suppress(json.JSONDecodeError, TypeError):
            data = json.loads(text)
            if isinstance(data, dict) and data.get("id"):
                return {"id": data["id"], "version": data.get("version")}
    if card is not None and getattr(card, "id", None):
        return {"id": card.id, "version": card.version}
    return None


def export_for_training(scene: Any, segmentation_node: Any, volume_nodes: Sequence[Any], dataset_dir: str | os.PathLike[str],
                        model_card_info: Any, original_labels: Volume | None = None) -> str:
    """Add the current (corrected) case to a training dataset folder.

    The labels are the segments named like the model's labels, exported on the first input's grid.
    Extra channels on other grids are resampled (linear) onto it. Only voxels and geometry are
    written (no names, ids or dates); the patient is recorded as a salted hash by the dataset.

    Args:
        scene: the scene (used to find the patient of the input in the subject hierarchy).
        segmentation_node: the (edited) segmentation.
        volume_nodes: one volume node per model channel.
        dataset_dir: the dataset folder (created when missing).
        model_card_info: the model card (or anything with ``labels``/``channels``) defining label
            names/values and channel names.
        original_labels: the AI labelmap from :class:`SceneResult`, to count changed voxels.

    Returns:
        The new case id.

    Raises:
        MedSegAIInputError: no segmentation/volume/folder, wrong channel count, nothing segmented.
    """
    from ..data import dataset

    if not dataset_dir or not str(dataset_dir).strip():
        raise MedSegAIInputError("No dataset folder is selected; choose a folder for the training cases.")
    card = resolve_model(model_card_info) if isinstance(model_card_info, (str, os.PathLike)) else model_card_info
    if card is None:
        raise MedSegAIInputError("No model is selected; select the model whose labels the dataset uses.")
    channels = list(getattr(card, "channel_names", None) or [c.name for c in card.channels])
    nodes = [node for node in (volume_nodes or []) if node is not None]
    if len(nodes) != len(channels):
        raise MedSegAIInputError(
            f"The dataset needs {len(channels)} image(s) ({', '.join(channels)}) but {len(nodes)} volume(s) are selected; "
            "select one volume per channel."
        )
    if segmentation_node is None:
        raise MedSegAIInputError("No segmentation is selected; run Segment first or select the segmentation to export.")
    images = [mrml.volume_from_node(node, name) for node, name in zip(nodes, channels)]
    reference = images[0]
    images = [reference] + [image if image.same_grid(reference) else _resample_onto(image, reference) for image in images[1:]]
    label = mrml.labels_from_segmentation_node(segmentation_node, nodes[0], card)
    if not np.any(label.array):
        raise MedSegAIInputError(
            "The segmentation has no voxels in segments named like the model's labels; "
            "segment the case (or restore the segment names) before exporting."
        )
    changed = None
    if original_labels is not None:
        if not original_labels.same_grid(label):
            raise MedSegAIInputError("The AI result is not on the input grid any more; run Segment again before exporting.")
        changed = int(np.count_nonzero(np.asarray(original_labels.array).astype(np.int64) != label.array.astype(np.int64)))
    labels_map = {"background": 0, **{entry.name: entry.value for entry in mrml.label_entries(card)}}
    return dataset.add_case(
        dataset_dir, images, label, channels, labels_map,
        patient_key=_patient_key(scene, nodes[0]), source_model=_source_model(segmentation_node, card),
        changed_voxels=changed,
    )


def dataset_case_count(dataset_dir: str | os.PathLike[str] | None) -> int:
    """Number of cases in a dataset folder (0 when the folder has no ``dataset.json`` yet)."""
    if not dataset_dir or not (Path(dataset_dir).expanduser() / "dataset.json").is_file():
        return 0
    from ..data.dataset import load_dataset

    return len(load_dataset(dataset_dir).cases)


def dataset_case_changed_voxels(dataset_dir: str | os.PathLike[str], case_id: str) -> int | None:
    """The recorded number of user-changed voxels of one case (None when not recorded)."""
    from ..data.dataset import load_dataset

    return load_dataset(dataset_dir).case(case_id).changed_voxels


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


class FineTuneRun(EngineProcess):
    """Training from a model on a dataset folder, in a separate process (``medsegai train``).

    Progress events have stage ``"train"``; their message carries the epoch and validation Dice.
    On success :meth:`finish` validates the new model folder and moves it into the model store as
    ``<id>-<version>`` (existing versions are never touched).
    """

    stage_weights = TRAINING_STAGE_WEIGHTS

    def __init__(self, dataset_dir: str | os.PathLike[str], model: Any, store_dir: str | os.PathLike[str] | None = None,
                 python_executable: str | None = None, extra_arguments: Sequence[str] = ()) -> None:
        super().__init__()
        self.dataset_dir = Path(dataset_dir).expanduser() if dataset_dir else None
        self.model = model
        self.store_dir = Path(store_dir).expanduser() if store_dir else None
        self.python_executable = python_executable
        self.extra_arguments = [str(a) for a in extra_arguments]
        self.card: Any = None
        self.output_dir: Path | None = None

    def start(self) -> "FineTuneRun":
        """Validate and start ``python -m MedSegAILib.cli train DATASET -o NEW --init MODEL --progress json``."""
        if self.process is not None:
            raise RuntimeError("this run was already started")
        if self.dataset_dir is None or not (self.dataset_dir / "dataset.json").is_file():
            raise MedSegAIInputError(
                f"{self.dataset_dir or 'No folder'} is not a MedSegAI dataset (no dataset.json); "
                "export corrected cases to it first."
            )
        count = dataset_case_count(self.dataset_dir)
        if count < 1:
            raise MedSegAIInputError(f"The dataset {self.dataset_dir} has no cases; export corrected cases first.")
        self.card = resolve_model(self.model)
        if self.store_dir is None:
            from ..model.modelcard import user_models_dir

            self.store_dir = user_models_dir()
        python = check_python_executable(self.python_executable)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f".{self.card.id}-training-", dir=self.store_dir))
        self.output_dir = self.temp_dir / "model"
        command = [python, "-m", "MedSegAILib.cli", "train", str(self.dataset_dir), "-o", str(self.output_dir),
                   "--init", str(self.card.folder), "--progress", "json", *self.extra_arguments]
        try:
            self._launch(command, engine_environment(self.python_executable), cwd=str(self.temp_dir))
        except BaseException:
            self.cleanup()
            raise
        return self

    def finish(self) -> Any:
        """Register the trained model; returns its ModelCard.

        Raises:
            EngineFailedError: training failed or was cancelled.
            ModelFolderError: the trained model fails validation or its version is installed already.
        """
        self.check_succeeded("Fine-tuning", "Fine-tuning was cancelled; no model was added.")
        try:
            if self.store_dir is None or self.output_dir is None or not self.output_dir.is_dir():
                raise EngineFailedError("Fine-tuning finished without writing a model folder; see the log.")
            return install_model_folder(self.output_dir, self.store_dir)
        finally:
            self.cleanup()


def fine_tune_plan(dataset_dir: str | os.PathLike[str], model: Any) -> Any:
    """What Fine-tune will do on ``dataset_dir`` from ``model`` and how long it should take (no TensorFlow).

    The same :class:`medsegai_training.finetune.FineTunePlan` the engine's ``train --init`` applies;
    the panel shows ``plan.describe()`` before it starts.

    Raises:
        MedSegAIInputError: no dataset folder, or one without cases; invalid model.
    """
    if not dataset_dir or not (Path(dataset_dir).expanduser() / "dataset.json").is_file():
        raise MedSegAIInputError(
            f"{dataset_dir or 'No folder'} is not a MedSegAI dataset (no dataset.json); export corrected cases to it first."
        )
    card = resolve_model(model)
    return import_training_module("medsegai_training.finetune").fine_tune_plan(Path(dataset_dir).expanduser(), card)


def start_fine_tune(dataset_dir: str | os.PathLike[str], model: Any, store_dir: str | os.PathLike[str] | None = None,
                    python_executable: str | None = None, extra_arguments: Sequence[str] = ()) -> FineTuneRun:
    """Start fine-tuning ``model`` on ``dataset_dir`` in the background; poll/cancel/finish the result."""
    return FineTuneRun(dataset_dir, model, store_dir, python_executable, extra_arguments).start()
