"""Review where the model is unsure, in Slicer: the uncertainty overlay, "Next uncertain region",
and ranking the volumes loaded in the scene ("which case next").

:class:`UncertaintyReview` holds one segmentation's review: the uncertainty map as a scalar volume
node on the input's exact grid (:func:`mrml.set_uncertainty_volume_node`), shown as the slice views'
foreground with a hot colour table and adjustable opacity; its uncertain regions ranked by
:func:`uncertain_regions.rank_regions`; and which of them the user visited
(:class:`uncertain_regions.RegionVisits`). :meth:`UncertaintyReview.next_region` centres every
slice view on the best-ranked region not visited yet and selects the region's segment in Segment
Editor. A new segmentation replaces the map and resets the list (:meth:`UncertaintyReview.load`).

:class:`RankRun` runs ``medsegai rank`` on scene volumes in a separate engine process, like
:class:`slicer_logic.SegmentationRun` (non-blocking, cancellable; the scene is never changed), and
:meth:`RankRun.finish` returns the volumes in the order to correct them.

Nothing here imports Qt; ``slicer`` is imported only inside functions (through :mod:`mrml`), so the
pytest suites drive it on ``slicer-core``'s real MRML scene.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import mrml
from .engine_process import (
    EngineFailedError,
    EngineProcess,
    check_python_executable,
    engine_environment,
)
from ..core.errors import MedSegAIInputError
from ..core.image import Volume
from ..report.uncertain_regions import DEFAULT_THRESHOLD, Region, RegionVisits, rank_regions
from ..inference.uncertainty import uncertain_level

__all__ = ["RankRun", "RankedCase", "UncertaintyReview", "rankable_volume_nodes", "ranking_text", "read_ranking"]


def _ijk_to_ras(node: Any) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def _world_ras(node: Any, ras: Sequence[float]) -> tuple[float, float, float]:
    """A point in the node's own RAS frame moved through its parent transforms to world RAS."""
    transform = node.GetParentTransformNode() if node is not None else None
    if transform is None:
        return tuple(float(v) for v in ras)  # type: ignore[return-value]
    import vtk

    to_world = vtk.vtkGeneralTransform()
    transform.GetTransformToWorld(to_world)
    return tuple(float(v) for v in to_world.TransformPoint([float(v) for v in ras]))  # type: ignore[return-value]


class UncertaintyReview:
    """One segmentation's uncertainty review in a scene (the state behind the panel's buttons).

    Args:
        threshold: map values ``>= threshold`` (0..255 scale) are uncertain voxels; None: the
            engine's :func:`uncertainty.uncertain_level` for the model's class count (a voxel split
            90/10 between two classes), so the regions are those the measurements count.
        min_voxels: regions with fewer uncertain voxels are not listed.
        margin: shell (voxels) searched for the segment a region concerns.
    """

    def __init__(self, threshold: int | None = None, min_voxels: int = 1, margin: int = 2) -> None:
        if threshold is not None and not 1 <= int(threshold) <= 255:
            raise ValueError(f"threshold must be in 1..255 or None, got {threshold}")
        self.threshold = None if threshold is None else int(threshold)
        self.threshold_used = DEFAULT_THRESHOLD
        self.min_voxels = int(min_voxels)
        self.margin = int(margin)
        self.visits = RegionVisits()
        self.volume_node: Any = None
        self.reference_volume_node: Any = None
        self.segmentation_node: Any = None
        self.label_segments: dict[int, str] = {}

    # -- loading -----------------------------------------------------------------------------

    def load(self, uncertainty: Volume | str | os.PathLike[str], reference_volume_node: Any, segmentation_node: Any,
             labels_spec: Any, labels: Volume | None = None) -> list[Region]:
        """Take a new map (after a Segment run): fill the map node, rank its regions, forget all visits.

        Args:
            uncertainty: the uint8 map (``SceneResult.uncertainty``) or a file of it.
            reference_volume_node: the input volume node the map was computed on.
            segmentation_node: the segmentation the run filled.
            labels_spec: the model card (or its labels) of that run: label value -> segment name.
            labels: the run's label map on the same grid (``SceneResult.labels``); None reads
                the segmentation node as it is now.

        Returns:
            The ranked regions.

        Raises:
            MedSegAIInputError: the map is not on the input's grid, or cannot be read.
        """
        if reference_volume_node is None or segmentation_node is None:
            raise MedSegAIInputError("No segmentation to review; run Segment with Show uncertainty on first.")
        scene = reference_volume_node.GetScene()
        if not isinstance(uncertainty, Volume):
            uncertainty = self._read_map(Path(uncertainty))
        entries = mrml.label_entries(labels_spec)
        if labels is None:
            labels = mrml.labels_from_segmentation_node(segmentation_node, reference_volume_node, entries)
        if labels.array.shape != uncertainty.array.shape:
            raise MedSegAIInputError(
                f"The uncertainty map {uncertainty.array.shape} and the labels {labels.array.shape} differ in size; segment again.")
        node = self.volume_node if self._node_alive(self.volume_node, scene) else None
        self.volume_node = mrml.set_uncertainty_volume_node(
            scene, uncertainty.with_array(np.asarray(uncertainty.array, dtype=np.uint8)), reference_volume_node,
            name=f"{reference_volume_node.GetName()} uncertainty", node=node)
        self.reference_volume_node = reference_volume_node
        self.segmentation_node = segmentation_node
        segmentation = segmentation_node.GetSegmentation()
        self.label_segments = {}
        for entry in entries:
            segment_id = segmentation.GetSegmentIdBySegmentName(entry.name)
            if segment_id:
                self.label_segments[entry.value] = segment_id
        self.threshold_used = self.threshold if self.threshold is not None else uncertain_level(len(entries) + 1)
        regions = rank_regions(np.asarray(uncertainty.array), np.asarray(labels.array), uncertainty.spacing,
                               self.threshold_used, min_voxels=self.min_voxels, margin=self.margin,
                               ijk_to_ras=_ijk_to_ras(self.volume_node))
        self.visits.reset(regions)
        return regions

    def load_result(self, result: Any) -> list[Region]:
        """After a Segment run: review its map (``result.uncertainty``), or drop the last map when it has none.

        A map from an earlier run never stays on screen beside a new segmentation: without a new
        map, the old map node is removed from the scene and the list is emptied.

        Args:
            result: a :class:`slicer_logic.SceneResult`.

        Returns:
            The ranked regions (empty without a map).
        """
        segmentation_node = result.segmentation_node
        reference = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
        uncertainty = getattr(result, "uncertainty", None)
        if uncertainty is None:
            self.clear()
            return []
        return self.load(uncertainty, reference, segmentation_node, result.card, result.labels)

    def clear(self) -> None:
        """Forget the regions and remove the map node (MedSegAI's own) from its scene."""
        self.visits.reset()
        if self.has_map:
            scene = self.volume_node.GetScene()
            mrml.show_in_foreground(scene, self.volume_node, shown=False)
            display = self.volume_node.GetDisplayNode()
            scene.RemoveNode(self.volume_node)
            if display is not None and display.GetScene() is scene:
                scene.RemoveNode(display)
        self.volume_node = None

    @staticmethod
    def _read_map(path: Path) -> Volume:
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise MedSegAIInputError(f"The uncertainty map {path.name} could not be read ({e}); segment again.") from e
        volume = Volume.from_sitk(image)
        if volume.array.dtype != np.uint8:
            raise MedSegAIInputError(f"The uncertainty map {path.name} is {volume.array.dtype}, not uint8 (0..255); segment again.")
        return volume

    @staticmethod
    def _node_alive(node: Any, scene: Any) -> bool:
        return node is not None and scene is not None and node.GetScene() is scene

    def reset(self) -> None:
        """Forget the regions and visits (a new Segment run started); the map node stays until replaced."""
        self.visits.reset()

    @property
    def has_map(self) -> bool:
        """True when a map node is loaded and still in its scene."""
        return self.volume_node is not None and self.volume_node.GetScene() is not None

    # -- display -----------------------------------------------------------------------------

    def show(self, shown: bool, opacity: float) -> int:
        """Show or hide the map as the slice views' foreground at ``opacity``; returns views changed."""
        if not self.has_map:
            return 0
        return mrml.show_in_foreground(self.volume_node.GetScene(), self.volume_node, float(opacity), shown=bool(shown))

    # -- visiting ----------------------------------------------------------------------------

    @property
    def regions(self) -> list[Region]:
        return self.visits.regions

    def segment_id(self, region: Region) -> str | None:
        """The id of the segment a region concerns (None: background, or the segment was removed)."""
        segment_id = self.label_segments.get(region.label)
        if segment_id and self.segmentation_node is not None and \
                self.segmentation_node.GetSegmentation().GetSegment(segment_id) is not None:
            return segment_id
        return None

    def next_region(self, start_over: bool = False) -> Region | None:
        """Visit the best-ranked region not visited yet: centre the slice views on it, select its segment.

        Args:
            start_over: when every region was visited, forget the visits and go to the first again.

        Returns:
            The region, or None when there is none left to visit (nothing changes then).
        """
        index = self.visits.next_index()
        if index is None:
            if not (start_over and self.regions):
                return None
            self.visits.reset(self.regions)
            index = 0
        return self.go_to(index)

    def go_to(self, index: int) -> Region:
        """Visit region ``index`` (its rank): mark it, centre the slice views, select its segment."""
        if not self.has_map:
            raise MedSegAIInputError("No uncertainty map is loaded; run Segment with Show uncertainty on first.")
        region = self.visits.visit(index)
        if region is None or region.centre_ras is None:
            raise RuntimeError(f"region {index} has no position; load the map again")
        scene = self.volume_node.GetScene()
        mrml.jump_slices_to(scene, _world_ras(self.volume_node, region.centre_ras))
        if self.segmentation_node is not None and self.segmentation_node.GetScene() is scene:
            mrml.select_segment_in_editor(scene, self.segmentation_node, self.segment_id(region), self.reference_volume_node)
        return region

    def counter_text(self) -> str:
        """``"region 3 of 12"`` (see :meth:`RegionVisits.counter_text`)."""
        if not self.has_map:
            return "no uncertainty map"
        return self.visits.counter_text()

    def describe(self, region: Region) -> str:
        """One line for the panel: the region's segment, volume and mean uncertainty."""
        segment_id = self.segment_id(region)
        if segment_id:
            segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
        else:
            segment = "background" if region.label == 0 else f"label {region.label} (no segment)"
        return (f"{self.counter_text()}: near {segment}, {region.volume_ml:.2f} mL uncertain, "
                f"mean {100.0 * region.mean_uncertainty / 255.0:.0f}%")


# --------------------------------------------------------------------------------------------
# Which case next: medsegai rank on the scene's volumes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedCase:
    """One ranked case: the scene volume and its score (higher = correct it first).

    Attributes:
        volume_node: the scene volume.
        name: its node name.
        score: the ranking score ``medsegai rank`` wrote (expected error; NaN when it gave none).
        rank: 1 = correct first.
    """

    volume_node: Any
    name: str
    score: float
    rank: int


def rankable_volume_nodes(scene: Any) -> list[Any]:
    """The scene's grey-value volumes, in scene order: single-component 3D scalar volumes that are
    neither label maps nor MedSegAI's uncertainty maps."""
    if scene is None:
        raise ValueError("scene must be a vtkMRMLScene, got None")
    nodes = []
    collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for index in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(index)
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(mrml.UNCERTAINTY_ATTRIBUTE):
            continue
        image = node.GetImageData()
        if image is None or image.GetNumberOfScalarComponents() != 1 or min(image.GetDimensions()) < 2:
            continue  # no voxels, colour/vector/4D data or 2D: not a case the model can take
        nodes.append(node)
    return nodes


def ranking_text(cases: Sequence[RankedCase]) -> str:
    """The panel's list: one line per case, the one to correct first on top."""
    if not cases:
        return "No volumes were ranked."
    lines = ["Correct in this order (highest expected error first):"]
    for case in cases:
        score = "" if math.isnan(case.score) else f" (score {case.score:.3g})"
        lines.append(f"{case.rank}. {case.name}{score}")
    return "\n".join(lines)


def read_ranking(path: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """``(input file, score)`` rows of a ``medsegai rank`` CSV, in the file's order (best first).

    The input column is the first of ``input``/``case``/``path``, the score the first of
    ``score``/``expected_error``; a ``rank`` column, when present, orders the rows.

    Raises:
        EngineFailedError: the file is missing or has no input column.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as e:
        raise EngineFailedError(f"The ranking could not be read ({e}); rank again.") from e
    if not rows:
        return []
    columns = list(rows[0])
    input_column = next((c for c in ("input", "case", "path") if c in columns), None)
    if input_column is None:
        raise EngineFailedError(f"The ranking has no input column (columns: {', '.join(columns)}); report this problem.")
    score_column = next((c for c in ("score", "expected_error") if c in columns), None)
    if "rank" in columns:
        rows.sort(key=lambda row: float(row["rank"]) if row["rank"] not in ("", None) else math.inf)

    def score(row: dict[str, str]) -> float:
        try:
            return float(row[score_column]) if score_column else math.nan
        except (TypeError, ValueError):
            return math.nan

    return [(row[input_column], score(row)) for row in rows]


class RankRun(EngineProcess):
    """``medsegai rank`` over scene volumes (one case per volume) in a separate engine process.

    The volumes go to the engine as ``case_0000.nrrd`` … (never node names: they may hold patient
    names); the engine's CSV (columns ``rank``, ``case``, ``input``, ``expected_error`` …) is
    mapped back to the nodes by those file names.

    Args:
        volume_nodes: scalar volume nodes, one case each (a one-channel model).
        model: a ModelCard, model id or model folder.
        options: :class:`slicer_logic.EngineOptions` (device, backend, engine Python).
        temp_root: where the run's temporary folder goes.
    """

    # overall progress = cases read / cases (``medsegai rank`` reports stage "read" once per case)
    stage_weights: ClassVar[dict[str, float]] = {"read": 1.0}

    def __init__(self, volume_nodes: Sequence[Any], model: Any, options: Any = None,
                 temp_root: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.volume_nodes = [node for node in (volume_nodes or []) if node is not None]
        self.model = model
        self.options = options
        self.temp_root = temp_root
        self.card: Any = None
        self.files: dict[str, Any] = {}
        self.ranking_path: Path | None = None

    def start(self) -> RankRun:
        """Validate, write each volume to a temporary file and start ``medsegai rank``; returns self."""
        from .slicer_logic import EngineOptions, resolve_model

        if self.process is not None:
            raise RuntimeError("this run was already started")
        options = self.options or EngineOptions()
        options.validate()
        self.card = resolve_model(self.model)
        if len(self.card.channel_names) != 1:
            raise MedSegAIInputError(
                f"Rank loaded volumes takes one volume per case; {self.card.name} needs {len(self.card.channel_names)} "
                f"({', '.join(self.card.channel_names)}). Rank those cases with `medsegai rank` on their study folders.")
        if len(self.volume_nodes) < 2:
            raise MedSegAIInputError(f"Rank loaded volumes needs at least 2 volumes in the scene, found {len(self.volume_nodes)}; load more cases.")
        volumes = [mrml.volume_from_node(node, node.GetName(), copy=False) for node in self.volume_nodes]
        python = check_python_executable(options.python_executable)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="medsegai-rank-", dir=self.temp_root))
        try:
            import SimpleITK as sitk

            for index, (node, volume) in enumerate(zip(self.volume_nodes, volumes)):
                path = self.temp_dir / f"case_{index:04d}.nrrd"  # no node names in file names
                sitk.WriteImage(volume.to_sitk(), str(path), False)
                self.files[path.name] = node
            self.ranking_path = self.temp_dir / "ranking.csv"
            command = [python, "-m", "MedSegAILib.cli", "rank", *(str(self.temp_dir / name) for name in self.files),
                       "-o", str(self.ranking_path), "--model", str(self.card.folder), "--progress", "json",
                       *options.inference_arguments()]
            self._launch(command, engine_environment(options.python_executable), cwd=str(self.temp_dir))
        except BaseException:
            self.cleanup()
            raise
        return self

    def finish(self) -> list[RankedCase]:
        """The volumes in the order to correct them (the scene is not changed).

        Raises:
            EngineFailedError: the run failed or was cancelled, or its ranking names no scene volume.
        """
        self.check_succeeded("The ranking", "The ranking was cancelled.")
        try:
            if self.ranking_path is None or not self.ranking_path.is_file():
                raise EngineFailedError("The ranking finished without writing its table; see the log and rank again.")
            ranked = []
            for input_name, score in read_ranking(self.ranking_path):
                node = self.files.get(Path(input_name).name)
                if node is not None and all(case.volume_node is not node for case in ranked):
                    ranked.append(RankedCase(node, node.GetName(), score, len(ranked) + 1))
            if len(ranked) != len(self.files):
                raise EngineFailedError(
                    f"The ranking lists {len(ranked)} of the {len(self.files)} volumes; see the log and rank again.")
            return ranked
        finally:
            self.cleanup()
