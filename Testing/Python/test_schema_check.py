"""MedSegAILib.model.schema_check gives jsonschema's verdict on model cards (Slicer ships no jsonschema).

Every shipped and test model card is mutated at every place it has (key deleted, value replaced by
values of other types and out of range, unknown key added) and each mutant is judged by both
checkers: valid for one means valid for the other, and each problem path names the same place.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

jsonschema = pytest.importorskip("jsonschema")

from MedSegAILib.model import modelcard  # noqa: E402
from MedSegAILib.model.schema_check import iter_problems  # noqa: E402

REPLACEMENTS: list[Any] = [None, True, 0, -1, 1.5, 256, 1e9, "", "x", "LPS", [], [0], [1, 2, 3], {}, {"a": 1}]


# Free-form sections (any JSON object is allowed there): mutated at their root only.
FREE_FORM = {"metrics", "provenance", "training", "architecture", "description"}


def _places(document: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if path and path[0] in FREE_FORM:
        return
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _places(value, (*path, key))
    elif isinstance(document, list) and document:  # items share one schema: the first stands for all
        yield from _places(document[0], (*path, 0))


def _mutants(document: dict) -> Iterator[dict]:
    for path in _places(document):
        if not path:
            continue
        parent_path, last = path[:-1], path[-1]
        for replacement in REPLACEMENTS:
            mutant = copy.deepcopy(document)
            parent = mutant
            for part in parent_path:
                parent = parent[part]
            parent[last] = copy.deepcopy(replacement)
            yield mutant
        mutant = copy.deepcopy(document)
        parent = mutant
        for part in parent_path:
            parent = parent[part]
        if isinstance(parent, dict):
            del parent[last]
            yield mutant
            extra = copy.deepcopy(document)
            target = extra
            for part in parent_path:
                target = target[part]
            target["unexpected_key"] = 1
            yield extra


def _cards(analytic_model_dir: Path) -> list[dict]:
    folders = [analytic_model_dir, *sorted(p for p in modelcard.builtin_models_dir().iterdir() if p.is_dir())]
    return [json.loads((folder / "model.json").read_text(encoding="utf-8")) for folder in folders]


def test_verdicts_and_places_agree_with_jsonschema(analytic_model_dir: Path) -> None:
    schema = modelcard._schema()  # noqa: SLF001 - the schema the engine uses
    validator = jsonschema.Draft202012Validator(schema)
    checked = 0
    for card in _cards(analytic_model_dir):
        assert list(iter_problems(card, schema)) == [] and not list(validator.iter_errors(card))
        for mutant in _mutants(card):
            ours = {problem.path for problem in iter_problems(mutant, schema)}
            theirs = {tuple(error.absolute_path) for error in validator.iter_errors(mutant)}
            assert bool(ours) == bool(theirs), (mutant, sorted(map(str, ours)), sorted(map(str, theirs)))
            assert ours <= theirs, (mutant, sorted(map(str, ours - theirs)))
            checked += 1
    assert checked > 1000


def test_unknown_schema_keywords_are_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        list(iter_problems({"a": 1}, {"type": "object", "patternProperties": {"^a$": {"type": "integer"}}}))


def test_messages_name_the_place_and_the_rule(analytic_model_dir: Path) -> None:
    card = json.loads((analytic_model_dir / "model.json").read_text(encoding="utf-8"))
    card["labels"][0]["color"] = [300, 0, 0]
    card["spatial"]["mode"] = "4d"
    del card["files"]
    problems = modelcard.validate_model_dict(card)
    assert "labels/0/color/0: 300 is greater than 1" in problems
    assert any(p.startswith("spatial/mode:") and "4d" in p for p in problems)
    assert "(top level): 'files' is a required property" in problems
