"""A small JSON Schema (draft 2020-12) checker for the keywords ``model.schema.json`` uses.

3D Slicer's Python ships no ``jsonschema``, and listing the installed models must work in a fresh
Slicer before anything is installed, so the model card is checked with this module everywhere (the
CLI, the panel, the training package). It implements exactly the keywords the schema uses —
``type``, ``const``, ``enum``, ``properties``, ``required``, ``additionalProperties``,
``minProperties``, ``items``, ``minItems``, ``maxItems``, ``minimum``, ``maximum``,
``exclusiveMinimum``, ``exclusiveMaximum``, ``minLength``, ``pattern``, ``oneOf`` and local
``$ref`` (``#/$defs/...``) — and refuses a schema with any other keyword, so a schema edit can
never be silently ignored. The test suite checks its verdicts against ``jsonschema`` itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SchemaProblem", "iter_problems", "SUPPORTED_KEYWORDS"]

# Keywords that only annotate; they never make an instance invalid.
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description", "default", "examples", "$comment"})
SUPPORTED_KEYWORDS = frozenset({
    "type", "const", "enum", "properties", "required", "additionalProperties", "minProperties", "items",
    "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
    "pattern", "oneOf", "$ref",
}) | _ANNOTATIONS


@dataclass(frozen=True)
class SchemaProblem:
    """One way an instance breaks the schema.

    Attributes:
        path: keys and indices from the document root to the bad value.
        keyword: the schema keyword that failed (e.g. ``"required"``).
        message: what is wrong, in the words a user can act on.
    """

    path: tuple[Any, ...]
    keyword: str
    message: str


def _is_type(value: Any, name: str) -> bool:
    if name == "object":
        return isinstance(value, Mapping)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if name == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise ValueError(f"unsupported JSON Schema type {name!r}")


def _equal(first: Any, second: Any) -> bool:
    """JSON equality: 1 == 1.0, but True != 1."""
    if isinstance(first, bool) or isinstance(second, bool):
        return type(first) is type(second) and first == second
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(_equal(a, b) for a, b in zip(first, second))
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(_equal(first[k], second[k]) for k in first)
    return first == second


def _resolve(reference: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not reference.startswith("#/"):
        raise ValueError(f"only local references (#/...) are supported, got {reference!r}")
    node: Any = root
    for part in reference[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def iter_problems(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
                  path: tuple[Any, ...] = ()) -> Iterator[SchemaProblem]:
    """Every problem of ``instance`` against ``schema``, depth first.

    Args:
        instance: a parsed JSON document (dicts, lists, str, int, float, bool, None).
        schema: the (sub)schema to check against.
        root: the whole schema, for ``$ref`` (default: ``schema``).
        path: where ``instance`` sits in the document (for the messages).

    Raises:
        ValueError: the schema uses a keyword this checker does not implement.
    """
    root = schema if root is None else root
    unknown = set(schema) - SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} are not supported by MedSegAILib.model.schema_check")
    if "$ref" in schema:
        yield from iter_problems(instance, _resolve(schema["$ref"], root), root, path)
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, name) for name in names):
            yield SchemaProblem(path, "type", f"{json.dumps(instance)[:60]} is not of type {' or '.join(map(repr, names))}")
            return
    if "const" in schema and not _equal(instance, schema["const"]):
        yield SchemaProblem(path, "const", f"{json.dumps(schema['const'])} was expected")
    if "enum" in schema and not any(_equal(instance, option) for option in schema["enum"]):
        yield SchemaProblem(path, "enum", f"{json.dumps(instance)[:60]} is not one of {json.dumps(schema['enum'])}")
    if "oneOf" in schema:
        matching = sum(not any(True for _ in iter_problems(instance, option, root, path)) for option in schema["oneOf"])
        if matching != 1:
            yield SchemaProblem(path, "oneOf", "does not match any allowed form (see schemas/model.schema.json)"
                                if matching == 0 else "matches more than one allowed form")
    if isinstance(instance, Mapping):
        yield from _object_problems(instance, schema, root, path)
    elif isinstance(instance, list):
        yield from _array_problems(instance, schema, root, path)
    elif isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            yield SchemaProblem(path, "minLength", f"{instance!r} is shorter than {schema['minLength']} character(s)")
        if "pattern" in schema and re.search(schema["pattern"], instance) is None:
            yield SchemaProblem(path, "pattern", f"{instance!r} does not match {schema['pattern']!r}")
    elif _is_type(instance, "number"):
        yield from _number_problems(instance, schema, path)


def _object_problems(instance: Mapping[str, Any], schema: Mapping[str, Any], root: Mapping[str, Any],
                     path: tuple[Any, ...]) -> Iterator[SchemaProblem]:
    for name in schema.get("required", []):
        if name not in instance:
            yield SchemaProblem(path, "required", f"{name!r} is a required property")
    if "minProperties" in schema and len(instance) < schema["minProperties"]:
        yield SchemaProblem(path, "minProperties", f"needs at least {schema['minProperties']} propert(ies)")
    properties = schema.get("properties", {})
    for name, value in instance.items():
        if name in properties:
            yield from iter_problems(value, properties[name], root, (*path, name))
        elif schema.get("additionalProperties") is False:
            yield SchemaProblem(path, "additionalProperties", f"additional property {name!r} is not allowed")
        elif isinstance(schema.get("additionalProperties"), Mapping):
            yield from iter_problems(value, schema["additionalProperties"], root, (*path, name))


def _array_problems(instance: list[Any], schema: Mapping[str, Any], root: Mapping[str, Any],
                    path: tuple[Any, ...]) -> Iterator[SchemaProblem]:
    if "minItems" in schema and len(instance) < schema["minItems"]:
        yield SchemaProblem(path, "minItems", f"has {len(instance)} item(s), needs at least {schema['minItems']}")
    if "maxItems" in schema and len(instance) > schema["maxItems"]:
        yield SchemaProblem(path, "maxItems", f"has {len(instance)} item(s), allows at most {schema['maxItems']}")
    if isinstance(schema.get("items"), Mapping):
        for index, value in enumerate(instance):
            yield from iter_problems(value, schema["items"], root, (*path, index))


def _number_problems(instance: float, schema: Mapping[str, Any], path: tuple[Any, ...]) -> Iterator[SchemaProblem]:
    bounds = (
        ("minimum", lambda bound: instance >= bound, "less than"),
        ("maximum", lambda bound: instance <= bound, "greater than"),
        ("exclusiveMinimum", lambda bound: instance > bound, "less than or equal to"),
        ("exclusiveMaximum", lambda bound: instance < bound, "greater than or equal to"),
    )
    for keyword, holds, words in bounds:
        if keyword in schema and not holds(schema[keyword]):
            yield SchemaProblem(path, keyword, f"{instance} is {words} {schema[keyword]}")
