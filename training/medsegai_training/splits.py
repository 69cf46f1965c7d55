"""Patient-level data splits: held-out test list, k-fold cross-validation, single validation split.

Every split is made on *patients* (``case.patient``, the salted key in ``dataset.json``), never
on cases, studies or slices, so two studies of one patient always land on the same side. A case
without a patient key counts as its own patient. The same seed always gives the same split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from MedSegAILib.core.errors import MedSegAIInputError

__all__ = ["Split", "patient_of", "group_by_patient", "kfold_patients", "make_split", "check_split"]


@dataclass(frozen=True)
class Split:
    """Case ids on each side of a split (sorted), plus how the split was made.

    Attributes:
        train: training case ids.
        validation: validation case ids (may equal ``train`` when there is only one patient,
            see ``validation_is_train``).
        test: held-out test case ids (never used for training or model selection).
        folds: k of k-fold cross-validation, or None.
        fold: the validation fold (0-based), or None.
        seed: the seed used.
        validation_is_train: True when the dataset has a single patient and validation had to
            reuse the training cases.
    """

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...] = ()
    folds: int | None = None
    fold: int | None = None
    seed: int = 0
    validation_is_train: bool = False
    patients: dict[str, int] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (for ``model.json["training"]["split"]``).

        Holds case ids and patient *counts* only, never patient keys.
        """
        return {
            "method": "k-fold" if self.folds else "holdout",
            "unit": "patient",
            "folds": self.folds,
            "fold": self.fold,
            "seed": self.seed,
            "train_cases": list(self.train),
            "validation_cases": list(self.validation),
            "test_cases": list(self.test),
            "validation_is_train": self.validation_is_train,
            **{f"{side}_patients": count for side, count in self.patients.items()},
        }


def patient_of(case: Any) -> str:
    """The patient key of ``case`` (its own id when it has none)."""
    patient = getattr(case, "patient", None)
    if patient is None and isinstance(case, dict):
        patient = case.get("patient")
    case_id = case_id_of(case)
    return str(patient) if patient not in (None, "") else f"case:{case_id}"


def case_id_of(case: Any) -> str:
    """The id of ``case`` (an object with ``.id`` or a dict with ``"id"``)."""
    case_id = getattr(case, "id", None)
    if case_id is None and isinstance(case, dict):
        case_id = case.get("id")
    if case_id is None:
        raise TypeError(f"case {case!r} has no 'id'")
    return str(case_id)


def group_by_patient(cases: Iterable[Any]) -> dict[str, list[str]]:
    """Map patient key -> sorted case ids. Raises ValueError on a repeated case id."""
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for case in cases:
        case_id = case_id_of(case)
        if case_id in seen:
            raise ValueError(f"case id {case_id!r} appears twice")
        seen.add(case_id)
        groups.setdefault(patient_of(case), []).append(case_id)
    return {patient: sorted(ids) for patient, ids in sorted(groups.items())}


def _shuffled(patients: Sequence[str], seed: int, salt: int) -> list[str]:
    order = sorted(patients)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, salt])
    return [order[i] for i in rng.permutation(len(order))]


def kfold_patients(groups: dict[str, list[str]], folds: int, seed: int = 0) -> list[list[str]]:
    """Assign patients to ``folds`` folds, balancing the number of cases per fold.

    Patients are shuffled with ``seed``, then each (largest first, stable) goes to the fold that
    holds the fewest cases so far; the folds are then put in a seeded order (so fold 0 is not
    always the one with the largest patient). Returns the patient keys of each fold (sorted).

    Raises:
        MedSegAIInputError: fewer patients than folds.
    """
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if len(groups) < folds:
        raise MedSegAIInputError(
            f"{folds}-fold cross-validation needs at least {folds} patients but the dataset has "
            f"{len(groups)}; use fewer folds or add cases."
        )
    order = _shuffled(list(groups), seed, 1)
    order.sort(key=lambda p: -len(groups[p]))  # stable: ties keep the seeded order
    assignment: list[list[str]] = [[] for _ in range(folds)]
    sizes = [0] * folds
    for patient in order:
        target = min(range(folds), key=lambda k: (sizes[k], len(assignment[k]), k))
        assignment[target].append(patient)
        sizes[target] += len(groups[patient])
    order_of_folds = np.random.default_rng([int(seed) & 0xFFFFFFFF, 4]).permutation(folds)
    return [sorted(assignment[int(k)]) for k in order_of_folds]


def make_split(
    cases: Sequence[Any],
    folds: int | None = None,
    fold: int | None = None,
    validation_fraction: float = 0.2,
    validation_cases: Iterable[str] = (),
    test_cases: Iterable[str] = (),
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Split:
    """Split ``cases`` by patient.

    Order of operations: the held-out test list is taken first (every patient owning a case in
    ``test_cases`` — the whole patient goes to test — then ``test_fraction`` of the remaining
    patients); the rest is split into train/validation by ``folds``/``fold`` or, without folds,
    by ``validation_fraction`` of the patients (at least one patient when the fraction is > 0).

    Args:
        cases: objects with ``.id`` and ``.patient`` (``MedSegAILib.data.dataset`` cases) or dicts.
        folds: k for k-fold cross-validation, or None.
        fold: validation fold index (0-based) when ``folds`` is given.
        validation_fraction: share of patients for validation without folds.
        validation_cases: case ids whose patients form the validation set (not with folds).
        test_cases: case ids to hold out (their patients' other cases go with them).
        test_fraction: share of patients to hold out as the test list.
        seed: seed of every random choice.

    Returns:
        the :class:`Split`.

    Raises:
        MedSegAIInputError: no cases, unknown test case ids, too few patients for the request.
    """
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if folds is None and fold is not None:
        raise ValueError(f"fold={fold!r} given without folds")
    if folds is not None and (fold is None or not 0 <= int(fold) < int(folds)):
        raise ValueError(f"fold must be in 0..{folds - 1} for {folds} folds, got {fold!r}")
    groups = group_by_patient(cases)
    if not groups:
        raise MedSegAIInputError("the dataset has no cases; add cases before training.")
    owner = {case_id: patient for patient, ids in groups.items() for case_id in ids}

    test_cases = [str(c) for c in test_cases]
    missing = sorted(set(test_cases) - set(owner))
    if missing:
        raise MedSegAIInputError(f"test case(s) {missing} are not in the dataset; check the case ids.")
    test_patients = {owner[c] for c in test_cases}
    remaining = [p for p in groups if p not in test_patients]
    if test_fraction > 0 and remaining:
        count = int(round(test_fraction * (len(remaining) + len(test_patients)))) - len(test_patients)
        count = max(count, 1 if not test_patients else 0)
        test_patients |= set(_shuffled(remaining, seed, 2)[:count])
        remaining = [p for p in groups if p not in test_patients]
    if not remaining:
        raise MedSegAIInputError("no patients are left for training after holding out the test cases; hold out fewer.")

    validation_cases = [str(c) for c in validation_cases]
    if validation_cases and folds is not None:
        raise ValueError("validation_cases and folds cannot be combined")
    missing = sorted(set(validation_cases) - set(owner))
    if missing:
        raise MedSegAIInputError(f"validation case(s) {missing} are not in the dataset; check the case ids.")
    validation_is_train = False
    if validation_cases:
        validation_patients = {owner[c] for c in validation_cases}
        clash = validation_patients & test_patients
        if clash:
            raise MedSegAIInputError(
                "a validation case belongs to a patient whose cases are held out for testing; "
                "choose validation and test cases of different patients."
            )
        train_patients = set(remaining) - validation_patients
        if not train_patients:
            raise MedSegAIInputError("no patients are left for training after the validation cases; validate on fewer.")
    elif folds is not None:
        assignment = kfold_patients({p: groups[p] for p in remaining}, int(folds), seed)
        validation_patients = set(assignment[int(fold)])
        train_patients = set(remaining) - validation_patients
    elif validation_fraction > 0 and len(remaining) > 1:
        count = min(len(remaining) - 1, max(1, int(round(validation_fraction * len(remaining)))))
        validation_patients = set(_shuffled(remaining, seed, 3)[:count])
        train_patients = set(remaining) - validation_patients
    else:
        train_patients = set(remaining)
        validation_patients = set(remaining)
        validation_is_train = True

    def ids(patients: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(c for p in patients for c in groups[p]))

    split = Split(
        train=ids(train_patients),
        validation=ids(validation_patients),
        test=ids(test_patients),
        folds=folds,
        fold=fold,
        seed=seed,
        validation_is_train=validation_is_train,
        patients={
            "train": len(train_patients),
            "validation": len(validation_patients),
            "test": len(test_patients),
        },
    )
    check_split(split, cases)
    return split


def check_split(split: Split, cases: Sequence[Any]) -> None:
    """Raise ValueError if one patient has cases on two sides of ``split``.

    Validation may equal training only when ``split.validation_is_train`` is set.
    """
    owner = {case_id_of(c): patient_of(c) for c in cases}
    sides = {"train": split.train, "validation": split.validation, "test": split.test}
    patients = {side: {owner[c] for c in ids} for side, ids in sides.items()}
    pairs = [("train", "test"), ("validation", "test")]
    if not split.validation_is_train:
        pairs.append(("train", "validation"))
    for a, b in pairs:
        shared = patients[a] & patients[b]
        if shared:
            raise ValueError(f"{len(shared)} patient(s) have cases in both {a} and {b}")
