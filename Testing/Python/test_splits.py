"""Patient-level splits (medsegai_training.splits): k-fold, held-out test list, fixed seed, and never
one patient on two sides — on the real brain-tumour dataset (two studies of PGBM-003) and on
property-based random datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from MedSegAILib.data.dataset import add_case, load_dataset
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.io.imageio import read_volume
from medsegai_training.splits import check_split, group_by_patient, kfold_patients, make_split


@dataclass
class FakeCase:
    id: str
    patient: str


@pytest.fixture(scope="module")
def brain_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five NRRD brain studies (4 with T1post) as a dataset, patient key = PGBM-xxx."""
    root = tmp_path_factory.mktemp("splits") / "brain"
    for study in sorted((shared_data / "mr-brain-tumor").glob("PGBM-*/*")):
        if not (study / "T1post.nrrd").is_file():
            continue
        image = read_volume(study / "T1post.nrrd")
        label = image.with_array(read_volume(study / "MaskTumor.nrrd").array)
        add_case(root, [image], label, ["T1post"], {"tumor": 1}, patient_key=study.parent.name)
    return root


def test_real_dataset_keeps_the_two_pgbm003_studies_together(brain_dataset: Path) -> None:
    info = load_dataset(brain_dataset)
    assert len(info.cases) == 4
    groups = group_by_patient(info.cases)
    assert sorted(len(ids) for ids in groups.values()) == [1, 1, 2]
    pgbm003 = next(ids for ids in groups.values() if len(ids) == 2)
    for folds in (2, 3):
        seen_validation: list[str] = []
        for fold in range(folds):
            split = make_split(info.cases, folds=folds, fold=fold, seed=7)
            sides = [set(split.train), set(split.validation)]
            assert any(set(pgbm003) <= side for side in sides), f"PGBM-003 split in fold {fold}/{folds}"
            assert set(split.train).isdisjoint(split.validation)
            assert set(split.train) | set(split.validation) == {c.id for c in info.cases}
            seen_validation.extend(split.validation)
        assert sorted(seen_validation) == sorted(c.id for c in info.cases)  # every case validated once


def test_seed_fixes_the_split_and_changes_it(brain_dataset: Path) -> None:
    info = load_dataset(brain_dataset)
    first = make_split(info.cases, folds=3, fold=0, seed=1)
    again = make_split(info.cases, folds=3, fold=0, seed=1)
    assert first == again
    assignments = {tuple(make_split(info.cases, folds=3, fold=0, seed=s).validation) for s in range(12)}
    assert len(assignments) > 1


def test_held_out_test_list_takes_the_whole_patient(brain_dataset: Path) -> None:
    info = load_dataset(brain_dataset)
    groups = group_by_patient(info.cases)
    pgbm003 = next(ids for ids in groups.values() if len(ids) == 2)
    split = make_split(info.cases, test_cases=[pgbm003[0]], validation_fraction=0.5, seed=3)
    assert set(split.test) == set(pgbm003)
    assert set(split.test).isdisjoint(set(split.train) | set(split.validation))
    assert len(split.train) == 1 and len(split.validation) == 1
    record = split.to_dict()
    assert record["unit"] == "patient" and record["test_cases"] == sorted(pgbm003)
    assert not any(key.startswith("p_") for key in map(str, record.values()))  # no patient hashes


def test_validation_cases_pin_their_patients(brain_dataset: Path) -> None:
    info = load_dataset(brain_dataset)
    groups = group_by_patient(info.cases)
    pgbm003 = next(ids for ids in groups.values() if len(ids) == 2)
    split = make_split(info.cases, validation_cases=[pgbm003[1]])
    assert set(split.validation) == set(pgbm003)
    assert len(split.train) == 2


def test_single_patient_validates_on_training_cases() -> None:
    cases = [FakeCase("case_0001", "p_a"), FakeCase("case_0002", "p_a")]
    split = make_split(cases)
    assert split.validation_is_train and split.train == split.validation == ("case_0001", "case_0002")


def test_user_errors_are_clear() -> None:
    cases = [FakeCase(f"case_{i:04d}", f"p_{i % 2}") for i in range(4)]
    with pytest.raises(MedSegAIInputError, match="needs at least 3 patients"):
        make_split(cases, folds=3, fold=0)
    with pytest.raises(MedSegAIInputError, match="not in the dataset"):
        make_split(cases, test_cases=["case_9999"])
    with pytest.raises(MedSegAIInputError, match="no cases"):
        make_split([])
    with pytest.raises(ValueError, match="fold"):
        make_split(cases, folds=2, fold=2)


def test_case_without_patient_key_is_its_own_patient() -> None:
    cases = [FakeCase("case_0001", ""), FakeCase("case_0002", ""), FakeCase("case_0003", "p_x")]
    assert len(group_by_patient(cases)) == 3


@settings(max_examples=60, deadline=None)
@given(
    patients=st.lists(st.integers(min_value=1, max_value=4), min_size=3, max_size=14),
    folds=st.integers(min_value=2, max_value=5),
    seed=st.integers(min_value=0, max_value=2**31),
    test_fraction=st.sampled_from([0.0, 0.2]),
)
def test_no_patient_on_two_sides_and_balanced_folds(
    patients: list[int], folds: int, seed: int, test_fraction: float
) -> None:
    cases = []
    for p, count in enumerate(patients):
        for _ in range(count):
            cases.append(FakeCase(f"case_{len(cases) + 1:04d}", f"p_{p}"))
    owner = {c.id: c.patient for c in cases}
    remaining_patients = len(patients) - (max(1, round(test_fraction * len(patients))) if test_fraction else 0)
    if remaining_patients < folds:
        with pytest.raises(MedSegAIInputError):
            make_split(cases, folds=folds, fold=0, test_fraction=test_fraction, seed=seed)
        return
    union: list[str] = []
    for fold in range(folds):
        split = make_split(cases, folds=folds, fold=fold, test_fraction=test_fraction, seed=seed)
        check_split(split, cases)
        sides = {name: {owner[c] for c in ids} for name, ids in
                 (("train", split.train), ("validation", split.validation), ("test", split.test))}
        assert sides["train"].isdisjoint(sides["validation"])
        assert sides["test"].isdisjoint(sides["train"] | sides["validation"])
        assert len(split.train) + len(split.validation) + len(split.test) == len(cases)
        union.extend(split.validation)
    assert len(union) == len(set(union))  # each non-test case is validated exactly once
    groups = {p: [c.id for c in cases if c.patient == p] for p in {c.patient for c in cases}}
    assignment = kfold_patients(groups, folds, seed)
    sizes = [sum(len(groups[p]) for p in fold) for fold in assignment]
    assert max(sizes) - min(sizes) <= max(len(ids) for ids in groups.values())  # greedy balance bound
