"""Bridge between MRML nodes (Slicer, RAS) and :class:`MedSegAILib.core.image.Volume` (LPS).

This is the only module that knows about Slicer's RAS convention. Every function imports
``slicer``/``vtk`` inside its body, so the module itself imports without Slicer; it works with the
full Slicer application and with the ``slicer-core`` wheel (a bare :class:`vtkMRMLScene`), because it
never touches ``slicer.mrmlScene``, ``slicer.app`` or ``slicer.modules``.

Geometry rules (exact, no re-composition of matrices):

- ``Volume.spacing`` = node spacing, ``Volume.origin`` = ``diag(-1, -1, 1) @ node origin``,
  ``Volume.direction`` = ``diag(-1, -1, 1) @ node IJKToRAS directions``. Negating is exact in
  floating point, so a volume survives node -> Volume -> node bit for bit.
- Arrays: a volume node's voxels as numpy are ``(k, j, i)`` = ``(z, y, x)``, the same layout as
  ``Volume.array``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..core.errors import MedSegAIInputError
from ..core.image import LPS_TO_RAS, Volume, present_values
from ..core.labels import DEFAULT_ANATOMIC_CONTEXT, DEFAULT_TERMINOLOGY_CONTEXT, LabelEntry, terminology_string
from ..core.labels import label_entries as _label_entries

__all__ = [
    "DEFAULT_ANATOMIC_CONTEXT",
    "DEFAULT_TERMINOLOGY_CONTEXT",
    "LabelEntry",
    "label_entries",
    "terminology_string",
    "volume_from_node",
    "add_volume_node",
    "update_segmentation_node",
    "labels_from_segmentation_node",
    "place_in_study",
    "measurements_table_node",
    "MEASUREMENT_COLUMNS",
    "uncertainty_color_node",
    "set_uncertainty_volume_node",
    "show_in_foreground",
    "jump_slices_to",
    "select_segment_in_editor",
]

# (column title, key in a measurements row, VTK array kind)
MEASUREMENT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Segment", "name", "string"),
    ("Label value", "value", "int"),
    ("Volume (mL)", "volume_ml", "double"),
    ("Max diameter (mm)", "max_diameter_mm", "double"),
    ("Voxels", "voxel_count", "int"),
)


def label_entries(labels_spec: Any) -> list[LabelEntry]:
    """:func:`MedSegAILib.core.labels.label_entries` for the scene's labelmaps, which are uint8 (values 1..255)."""
    return _label_entries(labels_spec, max_value=255)


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


def _node_label(node: Any) -> str:
    """A node's name for messages (node names are user-chosen; never a patient field)."""
    try:
        return f'"{node.GetName()}"'
    except AttributeError:
        return "the selected node"


def _ras_directions(node: Any) -> np.ndarray:
    """3x3 IJK-to-RAS direction matrix of a volume node, columns = i, j, k axes."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)], dtype=float)


def volume_from_node(volume_node: Any, name: str = "input", copy: bool = True) -> Volume:
    """Copy a scalar volume node into a :class:`Volume` (LPS geometry, ``(z, y, x)`` array).

    Only voxels and geometry are copied: no node attributes, no DICOM fields, so no patient data.
    A parent transform of the node is not applied (the engine works in the node's own frame;
    :func:`update_segmentation_node` puts the result under the same transform).

    Args:
        volume_node: a ``vtkMRMLScalarVolumeNode`` (label map volumes are accepted too).
        name: what to call the input in messages, e.g. the channel name ``"FLAIR"``.
        copy: False gives a read-only view of the node's voxels instead of a copy (for a caller
            that only writes them to a file at once and keeps the geometry).

    Returns:
        A new :class:`Volume` whose array is a copy (or a read-only view) of the node's voxels.

    Raises:
        MedSegAIInputError: no node, not a scalar volume, no image data, 2D, or more than one
            component per voxel (RGB, vector, 4D).
    """
    import slicer

    if volume_node is None:
        raise MedSegAIInputError(f"No volume is selected for {name}; select a 3D scalar volume for it.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        kind = volume_node.GetClassName()
        raise MedSegAIInputError(
            f"{_node_label(volume_node)} selected for {name} is a {kind}, not a scalar volume; "
            "select a 3D grey-value volume (split multi-component or 4D data into single volumes first)."
        )
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise MedSegAIInputError(f"{_node_label(volume_node)} selected for {name} has no voxels; load image data into it or select another volume.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise MedSegAIInputError(
            f"{_node_label(volume_node)} selected for {name} has {components} values per voxel (colour, vector or 4D data); "
            "select a single-component 3D volume."
        )
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise MedSegAIInputError(
            f"{_node_label(volume_node)} selected for {name} is 2D ({dims[0]}x{dims[1]}x{dims[2]} voxels); "
            "MedSegAI needs a 3D volume with at least 2 voxels along each axis."
        )
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=copy)
    if not copy:
        array.flags.writeable = False
    if array.shape != (dims[2], dims[1], dims[0]):
        raise MedSegAIInputError(f"{_node_label(volume_node)} selected for {name} has inconsistent image data; reload it and try again.")
    spacing = tuple(float(s) for s in volume_node.GetSpacing())
    origin_ras = np.array(volume_node.GetOrigin(), dtype=float)
    return Volume(
        array=array,
        spacing=spacing,
        origin=tuple(LPS_TO_RAS @ origin_ras),
        direction=LPS_TO_RAS @ _ras_directions(volume_node),
    )


def _set_node_geometry(node: Any, volume: Volume) -> None:
    """Set spacing, origin and directions of a volume node from an LPS :class:`Volume`."""
    ras_directions = LPS_TO_RAS @ volume.direction
    node.SetSpacing(*volume.spacing)
    node.SetOrigin(*(LPS_TO_RAS @ np.asarray(volume.origin, dtype=float)))
    # vtkMRMLVolumeNode.SetIJKToRASDirections takes rows: (ir, jr, kr, ia, ...).
    node.SetIJKToRASDirections(*[float(v) for v in ras_directions.reshape(-1)])


def _image_data_from_array(array: np.ndarray) -> Any:
    """A deep-copied ``vtkImageData`` of a ``(z, y, x)`` array, extent starting at 0."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.reshape(-1), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def add_volume_node(scene: Any, volume: Volume, name: str, labelmap: bool = False) -> Any:
    """Add a volume node holding a copy of ``volume`` (LPS geometry converted to RAS).

    Args:
        scene: the ``vtkMRMLScene`` to add to.
        volume: the image; ``array`` ``(z, y, x)``.
        name: node name (never a patient name; callers pass series or channel names).
        labelmap: create a ``vtkMRMLLabelMapVolumeNode`` instead of a scalar volume.

    Returns:
        The new node (already in ``scene``; display nodes are created when the scene can).
    """
    if scene is None:
        raise ValueError("scene must be a vtkMRMLScene, got None")
    if volume.array.ndim != 3:
        raise ValueError(f"volume array must be 3D (z, y, x), got shape {volume.array.shape}")
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(class_name, name)
    _set_node_geometry(node, volume)
    node.SetAndObserveImageData(_image_data_from_array(volume.array))
    node.CreateDefaultDisplayNodes()
    return node


# --------------------------------------------------------------------------------------------
# Segmentations
# --------------------------------------------------------------------------------------------


def _oriented_image_from_node_geometry(reference_volume_node: Any, array: np.ndarray | None = None) -> Any:
    """``vtkOrientedImageData`` on the reference volume's grid (voxels from ``array`` if given)."""
    import slicer

    dims = reference_volume_node.GetImageData().GetDimensions()
    if array is None:
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*dims)
        image.AllocateScalars(3, 1)  # VTK_UNSIGNED_CHAR
        image.GetPointData().GetScalars().Fill(0)
    else:
        source = _image_data_from_array(array)
        image = slicer.vtkOrientedImageData()
        image.ShallowCopy(source)
    import vtk

    directions = vtk.vtkMatrix4x4()
    reference_volume_node.GetIJKToRASDirectionMatrix(directions)
    image.SetSpacing(*reference_volume_node.GetSpacing())
    image.SetOrigin(*reference_volume_node.GetOrigin())
    image.SetDirectionMatrix(directions)
    return image


def _check_labels_on_reference(labels: Volume, reference_volume_node: Any) -> None:
    reference = volume_from_node(reference_volume_node, "the reference volume")
    if labels.array.ndim != 3 or not labels.same_grid(reference):
        raise MedSegAIInputError(
            f"The label map ({labels.geometry_description()}) is not on the grid of {_node_label(reference_volume_node)} "
            f"({reference.geometry_description()}); segment that volume again."
        )


def update_segmentation_node(segmentation_node: Any, labels: Volume, labels_spec: Any, reference_volume_node: Any) -> list[str]:
    """Fill a segmentation node with one segment per label of a labelmap.

    Existing segments with a label's name are replaced (ids kept, so Segment Editor selections stay
    valid); segments with other names are left alone. All new label segments share one binary
    labelmap layer (as Slicer does on import), each with its label value.

    Args:
        segmentation_node: a ``vtkMRMLSegmentationNode`` in a scene.
        labels: integer labelmap, ``(z, y, x)``, exactly on ``reference_volume_node``'s grid.
        labels_spec: model card / label list / ``{name: value}`` (see :func:`label_entries`).
        reference_volume_node: the input volume; becomes the segmentation's reference image
            geometry (needed by DICOM SEG export), its parent transform is copied.

    Returns:
        Segment ids, in label order.

    Raises:
        MedSegAIInputError: the labelmap is not on the reference grid.
    """
    import slicer

    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"segmentation_node must be a vtkMRMLSegmentationNode, got {segmentation_node!r}")
    entries = label_entries(labels_spec)
    _check_labels_on_reference(labels, reference_volume_node)
    values = np.asarray(labels.array)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got {values.dtype}")
    unknown = sorted(present_values(values) - {0} - {e.value for e in entries})
    if unknown:
        raise ValueError(f"label map contains values {unknown} that the label specification does not name")

    shared = _oriented_image_from_node_geometry(reference_volume_node, values.astype(np.uint8))
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    was_modifying = segmentation_node.StartModify()
    try:
        # The transform first: Slicer converts a reference geometry set under another parent
        # transform into the node's frame, which would shift it by the input's transform.
        segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        segmentation = segmentation_node.GetSegmentation()
        if segmentation.GetSourceRepresentationName() != labelmap_name:
            segmentation.SetSourceRepresentationName(labelmap_name)
        segment_ids = []
        for entry in entries:
            existing_id = segmentation.GetSegmentIdBySegmentName(entry.name)
            if existing_id:
                segmentation.RemoveSegment(existing_id)
            segment = slicer.vtkSegment()
            segment.SetName(entry.name)
            segment.SetColor(*entry.color)
            segment.SetLabelValue(entry.value)
            segment.AddRepresentation(labelmap_name, shared)
            if entry.terminology:
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry.terminology_string)
            segment_id = existing_id or segmentation.GenerateUniqueSegmentID(entry.name)
            segmentation.AddSegment(segment, segment_id)
            segment_ids.append(segment_id)
    finally:
        segmentation_node.EndModify(was_modifying)
    if segmentation_node.GetDisplayNode() is None and segmentation_node.GetScene() is not None:
        segmentation_node.CreateDefaultDisplayNodes()
    return segment_ids


def labels_from_segmentation_node(segmentation_node: Any, reference_volume_node: Any, labels_spec: Any) -> Volume:
    """Export a (possibly user-edited) segmentation back to a labelmap on the reference grid.

    Label values come from segment *names*: the segment named like a label gets that label's
    value; segments with other names are ignored; a missing segment leaves its label empty.
    Where segments overlap, the later label (higher value) wins.

    Args:
        segmentation_node: a ``vtkMRMLSegmentationNode``.
        reference_volume_node: the volume whose grid the labelmap must have.
        labels_spec: model card / label list / ``{name: value}`` (see :func:`label_entries`).

    Returns:
        uint8 :class:`Volume` ``(z, y, x)`` on the reference volume's grid (LPS geometry).
    """
    import slicer
    import vtk

    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise MedSegAIInputError("No segmentation is selected; select the segmentation to export.")
    reference = volume_from_node(reference_volume_node, "the reference volume")
    entries = label_entries(labels_spec)
    segmentation = segmentation_node.GetSegmentation()
    segment_ids = vtk.vtkStringArray()
    label_values = vtk.vtkIntArray()
    for entry in entries:
        segment_id = segmentation.GetSegmentIdBySegmentName(entry.name)
        if segment_id:
            segment_ids.InsertNextValue(segment_id)
            label_values.InsertNextValue(entry.value)
    output = np.zeros(reference.array.shape, dtype=np.uint8)
    if segment_ids.GetNumberOfValues() == 0:
        return reference.with_array(output)
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(labelmap_name):
        segmentation.CreateRepresentation(labelmap_name)
    geometry = _oriented_image_from_node_geometry(reference_volume_node)
    # One segment at a time onto the reference grid: exact nearest-neighbour placement, and the
    # value assignment stays in our hands (overlaps: higher value wins).
    for index in range(segment_ids.GetNumberOfValues()):
        segment_id = segment_ids.GetValue(index)
        one = vtk.vtkStringArray()
        one.InsertNextValue(segment_id)
        merged = slicer.vtkOrientedImageData()
        ok = segmentation_node.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry, one)
        if not ok:
            raise MedSegAIInputError(f"Segment {segment_id!r} could not be converted to a label map; check it in Segment Editor and try again.")
        mask = _array_on_reference(merged, geometry, reference_volume_node)
        output[mask > 0] = label_values.GetValue(index)
    return reference.with_array(output)


def _array_on_reference(image: Any, geometry: Any, reference_volume_node: Any) -> np.ndarray:
    """Voxels of an oriented image resampled (nearest) onto the reference extent, ``(z, y, x)``."""
    import slicer
    from vtk.util import numpy_support

    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, geometry, resampled, False)
    dims = reference_volume_node.GetImageData().GetDimensions()
    extent = resampled.GetExtent()
    if (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1) != tuple(dims):
        raise RuntimeError(f"resampled segment extent {extent} does not match the reference dimensions {dims}")
    scalars = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0])


# --------------------------------------------------------------------------------------------
# Subject hierarchy and tables
# --------------------------------------------------------------------------------------------


def place_in_study(node: Any, reference_node: Any) -> int:
    """Put ``node`` next to ``reference_node`` in the subject hierarchy (same parent: its study).

    Args:
        node: the data node to move (e.g. the new segmentation or table).
        reference_node: the input volume.

    Returns:
        The subject hierarchy item id of the parent (the scene item when the input has no study).
    """
    import slicer

    scene = node.GetScene()
    if scene is None or reference_node is None or reference_node.GetScene() is not scene:
        raise ValueError("node and reference_node must be in the same scene")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    parent = hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        item = hierarchy.CreateItem(parent, node)
    else:
        hierarchy.SetItemParent(item, parent)
    return int(parent)


def measurements_table_node(scene: Any, rows: Sequence[Mapping[str, Any]], name: str = "MedSegAI measurements", table_node: Any = None) -> Any:
    """Create (or refill) a table node with one row per segment.

    Columns: ``Segment``, ``Label value``, ``Volume (mL)``, ``Max diameter (mm)``, ``Voxels``
    (keys ``name``, ``value``, ``volume_ml``, ``max_diameter_mm``, ``voxel_count`` (or ``voxels``) of
    :func:`MedSegAILib.report.measurements.compute_measurements` rows; a missing value shows as NaN/0).

    Args:
        scene: the ``vtkMRMLScene``.
        rows: measurement rows.
        name: node name for a new table.
        table_node: an existing ``vtkMRMLTableNode`` to overwrite instead of creating one.

    Returns:
        The table node.
    """
    import vtk

    if table_node is None:
        if scene is None:
            raise ValueError("scene must be a vtkMRMLScene when no table_node is given")
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    was_modifying = table_node.StartModify()
    try:
        table.Initialize()
        kinds = {"string": vtk.vtkStringArray, "int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray}
        columns = []
        for title, _, kind in MEASUREMENT_COLUMNS:
            column = kinds[kind]()
            column.SetName(title)
            column.SetNumberOfValues(len(rows))
            columns.append(column)
        for index, row in enumerate(rows):
            for column, (_, key, kind) in zip(columns, MEASUREMENT_COLUMNS):
                value = row.get(key)
                if value is None and key == "voxel_count":
                    value = row.get("voxels")
                if kind == "string":
                    column.SetValue(index, str(value if value is not None else ""))
                elif kind == "int":
                    column.SetValue(index, int(value) if value is not None else 0)
                else:
                    column.SetValue(index, float(value) if value is not None else math.nan)
        for column in columns:
            table.AddColumn(column)
        for title, _, _ in MEASUREMENT_COLUMNS:
            table_node.SetColumnTitle(title, title)
        table_node.SetColumnUnitLabel("Volume (mL)", "mL")
        table_node.SetColumnUnitLabel("Max diameter (mm)", "mm")
        table.Modified()
    finally:
        table_node.EndModify(was_modifying)
    return table_node


# --------------------------------------------------------------------------------------------
# Uncertainty overlay and review (the Next uncertain region button)
# --------------------------------------------------------------------------------------------

UNCERTAINTY_COLOR_NODE_NAME = "MedSegAI uncertainty"
# Attribute marking the colour table and the volume nodes MedSegAI made for uncertainty maps.
UNCERTAINTY_ATTRIBUTE = "MedSegAI.Uncertainty"
# Singleton tag of the Segment Editor module's parameter node (Modules/Scripted/SegmentEditor/SegmentEditor.py).
SEGMENT_EDITOR_SINGLETON_TAG = "SegmentEditor"


def _hot(value: int) -> tuple[float, float, float]:
    """Black-body "hot" ramp: black -> red -> yellow -> white over 0..255."""
    t = value / 255.0
    return (min(1.0, 3.0 * t), min(1.0, max(0.0, 3.0 * t - 1.0)), min(1.0, max(0.0, 3.0 * t - 2.0)))


def uncertainty_color_node(scene: Any) -> Any:
    """The scene's uncertainty colour table (created once): 256 entries, hot ramp, entry 0 transparent.

    A slice view shows a voxel only where the table's alpha is not 0 (Slicer ANDs the table's
    alpha with the display threshold), so certain voxels (0) never cover the image.
    """
    import slicer

    if scene is None:
        raise ValueError("scene must be a vtkMRMLScene, got None")
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(UNCERTAINTY_ATTRIBUTE) == "color":
            return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(UNCERTAINTY_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for value in range(256):
        red, green, blue = _hot(value)
        node.SetColor(value, f"uncertainty {value}", red, green, blue, 0.0 if value == 0 else 1.0)
    node.SetAttribute(UNCERTAINTY_ATTRIBUTE, "color")
    node.SetHideFromEditors(False)
    scene.AddNode(node)
    return node


def set_uncertainty_volume_node(scene: Any, uncertainty: Volume, reference_volume_node: Any, name: str | None = None,
                                node: Any = None, display_minimum: int = 1) -> Any:
    """Put a uint8 uncertainty map into a scalar volume node with the reference volume's geometry.

    The node's IJK-to-RAS matrix is copied from ``reference_volume_node`` (spacing, origin and
    directions, bit for bit), after checking that the map lies on that grid; its display uses
    :func:`uncertainty_color_node` with the full 0..255 window, and hides voxels below
    ``display_minimum``.

    Args:
        scene: the ``vtkMRMLScene``.
        uncertainty: the map, uint8 ``(z, y, x)`` (0 certain … 255 maximal) with LPS geometry.
        reference_volume_node: the input volume node it was computed on.
        name: the node's name (default ``"<input name> uncertainty"``).
        node: an existing scalar volume node to refill (and rename) instead of creating one.
        display_minimum: smallest map value shown (1..255).

    Returns:
        The volume node.

    Raises:
        MedSegAIInputError: the map is not on the reference volume's grid.
        ValueError, TypeError: bad arguments.
    """
    import vtk

    if scene is None:
        raise ValueError("scene must be a vtkMRMLScene, got None")
    if not isinstance(uncertainty, Volume) or uncertainty.array.ndim != 3:
        raise TypeError(f"uncertainty must be a 3D Volume, got {type(uncertainty).__name__}")
    if uncertainty.array.dtype != np.uint8:
        raise TypeError(f"uncertainty must be uint8 (0 certain .. 255 maximal), got {uncertainty.array.dtype}")
    if not 1 <= int(display_minimum) <= 255:
        raise ValueError(f"display_minimum must be in 1..255, got {display_minimum}")
    reference = volume_from_node(reference_volume_node, "the reference volume", copy=False)
    if not uncertainty.same_grid(reference):
        raise MedSegAIInputError(
            f"The uncertainty map ({uncertainty.geometry_description()}) is not on the grid of "
            f"{_node_label(reference_volume_node)} ({reference.geometry_description()}); segment that volume again."
        )
    name = name or f"{reference_volume_node.GetName()} uncertainty"
    if node is None or node.GetScene() is not scene:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    else:
        node.SetName(name)
    matrix = vtk.vtkMatrix4x4()
    reference_volume_node.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(_image_data_from_array(uncertainty.array))
    node.SetAttribute(UNCERTAINTY_ATTRIBUTE, "map")
    transform = reference_volume_node.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    was_modifying = display.StartModify()
    try:
        display.SetAndObserveColorNodeID(uncertainty_color_node(scene).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 255.0)
        display.AutoThresholdOff()
        display.SetThreshold(float(display_minimum), 255.0)
        display.ApplyThresholdOn()
        display.SetInterpolate(False)
    finally:
        display.EndModify(was_modifying)
    return node


def show_in_foreground(scene: Any, volume_node: Any, opacity: float | None = None, shown: bool = True) -> int:
    """Show (or take away) a volume as the foreground layer of every slice view.

    Args:
        scene: the ``vtkMRMLScene`` (its ``vtkMRMLSliceCompositeNode`` nodes are the slice views).
        volume_node: the volume to show; with ``shown=False`` it is removed from the views showing it.
        opacity: foreground opacity in [0, 1]; None keeps each view's.
        shown: False removes it instead.

    Returns:
        The number of slice views changed.
    """
    if scene is None:
        raise ValueError("scene must be a vtkMRMLScene, got None")
    if opacity is not None and not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    node_id = volume_node.GetID() if volume_node is not None else None
    changed = 0
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        if shown and node_id:
            composite.SetForegroundVolumeID(node_id)
            if opacity is not None:
                composite.SetForegroundOpacity(float(opacity))
            changed += 1
        elif node_id and composite.GetForegroundVolumeID() == node_id:
            composite.SetForegroundVolumeID(None)
            changed += 1
    return changed


def jump_slices_to(scene: Any, ras: Sequence[float]) -> int:
    """Centre every slice view on a RAS point (``vtkMRMLSliceNode.JumpAllSlices``, centred mode).

    Returns:
        The number of slice views in the scene.
    """
    import slicer

    if scene is None:
        raise ValueError("scene must be a vtkMRMLScene, got None")
    r, a, s = (float(v) for v in ras)
    if not all(math.isfinite(v) for v in (r, a, s)):
        raise ValueError(f"ras must be 3 finite numbers, got {tuple(ras)!r}")
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")


def select_segment_in_editor(scene: Any, segmentation_node: Any, segment_id: str | None, source_volume_node: Any = None) -> Any:
    """Make ``segment_id`` of ``segmentation_node`` the segment selected in Segment Editor.

    Uses the Segment Editor module's parameter node (singleton tag ``"SegmentEditor"``), created as
    that module creates it when it does not exist yet, and points it at the segmentation (and the
    source volume, when given) first.

    Returns:
        The ``vtkMRMLSegmentEditorNode``.
    """
    if scene is None or segmentation_node is None:
        raise ValueError("scene and segmentation_node are needed")
    if segment_id and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise MedSegAIInputError(f"{_node_label(segmentation_node)} has no segment {segment_id!r} any more; segment again.")
    import slicer

    editor = scene.GetSingletonNode(SEGMENT_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
    if editor is None:
        editor = slicer.vtkMRMLSegmentEditorNode()
        editor.SetSingletonTag(SEGMENT_EDITOR_SINGLETON_TAG)
        editor = scene.AddNode(editor)
    if editor.GetSegmentationNode() is not segmentation_node:
        editor.SetAndObserveSegmentationNode(segmentation_node)
    if source_volume_node is not None:
        if hasattr(editor, "SetAndObserveSourceVolumeNode"):
            if editor.GetSourceVolumeNode() is not source_volume_node:
                editor.SetAndObserveSourceVolumeNode(source_volume_node)
        elif editor.GetMasterVolumeNode() is not source_volume_node:
            editor.SetAndObserveMasterVolumeNode(source_volume_node)
    editor.SetSelectedSegmentID(segment_id or None)
    return editor
