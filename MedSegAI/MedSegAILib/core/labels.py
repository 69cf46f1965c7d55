"""A model's labels, one normalised entry per foreground label, and Slicer's terminology string.

Every writer of segments (the ``.seg.nrrd`` file, the Slicer scene, the DICOM SEG, the preview,
the measurements) reads labels through :func:`label_entries`, so a label gets the same name, value,
colour and terminology context whichever path wrote it. A label without a colour gets a stable
one from its value; a terminology without a context gets :data:`DEFAULT_TERMINOLOGY_CONTEXT`,
Slicer's DICOM master list, the one of Slicer's lists that holds every code the shipped models use
(its "3D Slicer General Anatomy list" has no *Neoplasm*).
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_ANATOMIC_CONTEXT",
    "DEFAULT_TERMINOLOGY_CONTEXT",
    "LabelEntry",
    "default_color",
    "label_entries",
    "terminology_string",
]

DEFAULT_TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
DEFAULT_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
MAX_LABEL_VALUE = 65535  # a .seg.nrrd layer holds uint16; writers of uint8 maps pass max_value=255


@dataclass(frozen=True)
class LabelEntry:
    """One foreground label.

    Attributes:
        name: segment name (e.g. ``"liver"``).
        value: integer label value in the labelmap (1..65535, or less where the writer says).
        color: RGB in [0, 1] (the model's, or :func:`default_color` of the value).
        terminology: the model card's terminology (``category``, ``type``, optional
            ``type_modifier``, ``anatomic_region``, ``context``; codes as ``{scheme, code,
            meaning}``), or None when the model gives none.
    """

    name: str
    value: int
    color: tuple[float, float, float]
    terminology: Mapping[str, Any] | None = None

    @property
    def terminology_string(self) -> str:
        """Slicer's serialized terminology entry of this label, ``""`` without a terminology."""
        return terminology_string(self.terminology)


def _field(obj: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a mapping or an attribute of an object."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def default_color(value: int) -> tuple[float, float, float]:
    """A stable, distinguishable colour for a label value without one (golden-angle hue)."""
    hue = (value * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.65, 0.9)


def _code_triple(code: Any) -> tuple[str, str, str]:
    """``(scheme, code, meaning)`` of a code given as dict/object, empty strings when absent."""
    if code is None:
        return ("", "", "")
    return tuple(str(_field(code, key, "") or "") for key in ("scheme", "code", "meaning"))  # type: ignore[return-value]


def terminology_string(terminology: Any) -> str:
    """Slicer's serialized terminology entry for a model-card terminology.

    Args:
        terminology: mapping/object with ``category`` and ``type`` codes (each ``scheme``, ``code``,
            ``meaning``), optional ``type_modifier``, ``anatomic_region`` and ``context``; or an
            already serialized string (returned unchanged); or None.

    Returns:
        ``"<context>~SCHEME^code^meaning~<type>~<modifier>~<anatomic context>~<region>~<region modifier>"``,
        the format of ``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry``, or ``""``.

    Raises:
        ValueError: a code part holds ``~`` or ``^``.
    """
    if terminology is None:
        return ""
    if isinstance(terminology, str):
        return terminology

    def triple(code: Any) -> str:
        parts = _code_triple(code)
        for part in parts:
            if "~" in part or "^" in part:
                raise ValueError(f"terminology code part {part!r} must not contain '~' or '^'")
        return "^".join(parts)

    region = _field(terminology, "anatomic_region", None)
    return "~".join([
        str(_field(terminology, "context", None) or DEFAULT_TERMINOLOGY_CONTEXT),
        triple(_field(terminology, "category")),
        triple(_field(terminology, "type")),
        triple(_field(terminology, "type_modifier")),
        DEFAULT_ANATOMIC_CONTEXT if region is not None else "",
        triple(region),
        triple(None),
    ])


def _color(item: Any, name: str, value: int) -> tuple[float, float, float]:
    color = _field(item, "color", None)
    if color is None:
        return default_color(value)
    try:
        rgb = tuple(float(c) for c in color)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad label colour: color of {name!r} must be 3 numbers in 0..1, got {color!r}") from e
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise ValueError(f"bad label colour: color of {name!r} must be 3 numbers in 0..1, got {color!r}")
    return rgb  # type: ignore[return-value]


def label_entries(labels_spec: Any, *, max_value: int = MAX_LABEL_VALUE) -> list[LabelEntry]:
    """Normalise a label specification into :class:`LabelEntry` objects, sorted by value.

    Args:
        labels_spec: a model card (anything with a ``labels`` attribute), a sequence of label
            mappings/objects with ``name``, ``value``, optional ``color`` and ``terminology`` (the
            ``model.json`` form), or a mapping ``{name: value}`` (``background``/0 is skipped).
        max_value: the largest value the caller's labelmap can hold (255 for uint8 maps).

    Returns:
        The foreground labels, sorted by value.

    Raises:
        TypeError: ``labels_spec`` has none of the accepted forms, or an entry has no name or value.
        ValueError: a value outside ``1..max_value``, a bad colour, or repeated names or values.
    """
    items: list[Any]
    if hasattr(labels_spec, "labels") and not isinstance(labels_spec, Mapping):
        items = list(labels_spec.labels)
    elif isinstance(labels_spec, Mapping):
        items = [{"name": name, "value": value} for name, value in labels_spec.items() if value != 0]
    elif isinstance(labels_spec, Sequence) and not isinstance(labels_spec, (str, bytes)):
        items = list(labels_spec)
    else:
        raise TypeError(
            f"labels_spec must be a model card, a list of labels or a name->value mapping, got {type(labels_spec).__name__}"
        )
    entries = []
    for item in items:
        name, value = _field(item, "name", None), _field(item, "value", None)
        if name is None or value is None:
            raise TypeError(f"label entry {item!r} needs a name and a value")
        if not isinstance(name, str) or not name:
            raise ValueError(f"label name must be a non-empty string, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= int(value) <= max_value:
            raise ValueError(f"label {name!r} has value {value!r}; label values must be integers in 1..{max_value}")
        terminology = _field(item, "terminology", None)
        entries.append(LabelEntry(name, int(value), _color(item, name, int(value)), terminology or None))
    names = [e.name for e in entries]
    values = [e.value for e in entries]
    if len(set(names)) != len(names) or len(set(values)) != len(values):
        raise ValueError(f"label names and values must be unique; they repeat in {list(zip(names, values))}")
    return sorted(entries, key=lambda e: e.value)
