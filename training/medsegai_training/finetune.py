"""Fine-tuning defaults: how ``medsegai train --init`` and the Slicer panel's **Fine-tune** adapt a model.

:func:`fine_tune_plan` looks only at ``dataset.json`` and the parent's ``model.json`` (no
TensorFlow, no image is read), so the panel can show the plan and its time estimate before it
starts. The trainer applies the same plan to every setting the user's recipe or command line does
not give (``--max-steps``, ``--epochs``, a recipe key ...).

The defaults were chosen by measurement on this project's 2-core CPU (``benchmarks/RESULTS.md``,
"Fine-tuning defaults"; figures measured on the tuning data itself, so optimistic):

* steps grow with the number of corrected cases, ``STEPS_BASE + STEPS_PER_CASE × cases`` (at most
  :data:`MAX_STEPS`), capped so that the estimate stays within :data:`TIME_BUDGET_S` (5 minutes);
  validation looks at no more than 2 cases per epoch: with one case, 100 steps gave
  the best later-study Dice (300 steps over-fitted the single case);
* the parent's *training* window (``training.training_patch_size``, 160×160 for the shipped models)
  instead of its larger inference window: the same pixels per second, 2.6× more steps per minute;
* learning rate :data:`LEARNING_RATE` (1e-4) with a short warm-up and cosine decay: on the
  PGBM-001 loop, 1e-3 lost Dice on the later study (0.746 → 0.715) and forgot the other patients
  (mean 0.718 → 0.357); 1e-4 gained (→ 0.777) and kept them (→ 0.680);
* the whole network is trained: freezing the encoder (learning rate 3e-4) gained nothing on the later
  study (0.746 → 0.745) and forgot as much (→ 0.687);
* the parent's *own* objective is not reused: its tumour class weight 5, 80 % foreground windows
  and its augmentation (the brain recipe's) kept the later-study gain (0.779) but made the model
  draw false tumour elsewhere (other patients 0.718 → 0.419, one study 0.0); learning rate 3e-4
  (whole network) fitted the case better and generalised worse (later study 0.759, other patients → 0.573);
* afterwards :data:`KEEP_PARENT` (half) of the parent's weights are blended back in
  (``keep_parent``, weight-space ensembling as in WiSE-FT): on the PGBM-001 loop the later study
  keeps most of the gain (0.777 unblended → 0.767 blended, 0.746 before) and the other patients
  go from 0.680 to 0.721 (0.718 before; worst study −0.027 instead of −0.071); 0.3 forgot more
  (worst −0.035), 0.7 gained less (0.758) and forgot no less (worst −0.030);
* early stopping only where a patient can be held out (≥ 2 patients): one patient validates,
  patience :data:`PATIENCE` epochs of :data:`STEPS_PER_EPOCH` steps; with one patient the run does
  its planned steps and validates on the training cases (reported as such in ``model.json``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from MedSegAILib.core.errors import MedSegAIInputError

__all__ = [
    "FineTunePlan",
    "fine_tune_plan",
    "STEPS_BASE",
    "STEPS_PER_CASE",
    "MAX_STEPS",
    "STEPS_PER_EPOCH",
    "LEARNING_RATE",
    "PATIENCE",
    "TIME_BUDGET_S",
    "KEEP_PARENT",
]

STEPS_BASE = 60
STEPS_PER_CASE = 40
MIN_STEPS = 60
MAX_STEPS = 400
VALIDATION_MAX_CASES = 2
STEPS_PER_EPOCH = 20
LEARNING_RATE = 1e-4
PATIENCE = 3
BATCH_SIZE = 8
TIME_BUDGET_S = 300.0
KEEP_PARENT = 0.5

# Time per step: taken from the parent's own training record (``training.duration_s`` over the
# steps it ran, scaled to the window and batch of the fine-tune) — 0.19 s for mr-brain-tumor 1.2.0
# and 0.86 s for ct-abdomen-organs 1.1.0 (trained three at a time, so pessimistic) on the 2-core
# CPU. Without a record: window pixels × batch × first-level filters² × _SECONDS_PER_UNIT (fitted
# to those two). A fine-tune step costs _STEP_FACTOR times that (validation every epoch, the
# input pipeline's start per epoch). Fixed cost of a run (TensorFlow start, reading and resampling
# the cases, building the model and its first traced step, ONNX export and check): _FIXED_S +
# _SECONDS_PER_CASE per case. Both fitted (benchmarks/RESULTS.md section 9) to the two measured
# one-case 100-step fine-tunes of the shipped models — 234 CPU-s (brain) and 368 CPU-s (CT) —
# over 1.27, the parallelism of a fine-tune on 2 cores (half its CPU time, start and export, runs
# on one core): 184 s and 290 s on an idle 2-core CPU (the old figures 63 s and 130 s were a third
# of that).
_SECONDS_PER_UNIT = 1.0e-8
_STEP_FACTOR = 1.6
_FIXED_S = 150.0
_SECONDS_PER_CASE = 4.0


@dataclass(frozen=True)
class FineTunePlan:
    """What a fine-tune will do and how long it should take.

    Attributes:
        cases: training cases in the dataset.
        patients: distinct patients among them.
        steps: planned training batches (``epochs × steps_per_epoch``); early stopping may end sooner.
        epochs: planned epochs.
        steps_per_epoch: batches per epoch (one progress line and one validation each).
        batch_size: windows per batch.
        patch_size: training window (array order ``(y, x)`` for 2D).
        learning_rate: AdamW peak learning rate (warm-up then cosine decay).
        freeze_encoder: keep the parent's encoder fixed.
        keep_parent: share of the parent's weights blended back into the result (0 = none).
        early_stopping_patience: epochs without validation improvement before stopping (None: off).
        validation: ``"held-out patient"`` or ``"training cases"``.
        seconds_per_step: estimated seconds per fine-tuning batch (validation included) on this
            machine's reference CPU (2 cores, idle).
        estimated_seconds: estimated wall-clock time of the whole run (upper end: no early stop).
    """

    cases: int
    patients: int
    steps: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    patch_size: tuple[int, ...]
    learning_rate: float
    freeze_encoder: bool
    keep_parent: float
    early_stopping_patience: int | None
    validation: str
    seconds_per_step: float
    estimated_seconds: float

    def config(self) -> dict[str, Any]:
        """The recipe keys this plan sets (:class:`~medsegai_training.config.TrainConfig` names)."""
        values: dict[str, Any] = {
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.batch_size,
            "optimizer": {"learning_rate": self.learning_rate, "weight_decay": 1e-4},
            "schedule": {"name": "warmup_cosine", "warmup_fraction": 0.1},
            "freeze_encoder": self.freeze_encoder,
            "keep_parent": self.keep_parent,
            "early_stopping_patience": self.early_stopping_patience,
        }
        values["validation_fraction"] = 0.2 if self.validation == "held-out patient" else 0.0
        values["validation_max_cases"] = VALIDATION_MAX_CASES  # bounded validation time per epoch
        return values

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (what ``medsegai train --plan --json`` prints)."""
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        return data

    def describe(self) -> str:
        """One line for a user: steps, validation, estimated time."""
        stop = (f"early stopping on a held-out patient (patience {self.early_stopping_patience} epochs)"
                if self.early_stopping_patience else "no early stopping (one patient: validated on its own cases)")
        minutes = self.estimated_seconds / 60.0
        blend = (f", then {self.keep_parent:.0%} of the parent's weights blended back in (less forgetting)"
                 if self.keep_parent else "")
        return (f"fine-tune on {self.cases} case(s) of {self.patients} patient(s): {self.steps} steps "
                f"({self.epochs} × {self.steps_per_epoch}), learning rate {self.learning_rate:g}, "
                f"{'encoder frozen' if self.freeze_encoder else 'whole network trained'}, {stop}"
                f"{blend}; "
                f"about {minutes:.1f} min on a 2-core CPU")


def _dataset_counts(dataset_dir: str | os.PathLike[str]) -> tuple[int, int]:
    path = Path(dataset_dir) / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MedSegAIInputError(
            f"{Path(dataset_dir)} is not a readable MedSegAI dataset folder ({e}); export a corrected case first."
        ) from e
    cases = [c for c in data.get("cases") or [] if isinstance(c, dict)]
    if not cases:
        raise MedSegAIInputError(f"dataset {Path(dataset_dir)} has no cases; export a corrected case first.")
    patients = {c.get("patient") or c.get("id") for c in cases}
    return len(cases), len(patients)


def _raw_card(card: Any) -> dict[str, Any]:
    raw = getattr(card, "raw", card)
    if not isinstance(raw, dict):
        raise TypeError(f"card must be a ModelCard or a model.json dict, got {type(card).__name__}")
    return raw


def training_patch(card: Any) -> list[int]:
    """The window the parent was trained on (``training.training_patch_size``), else its inference window."""
    raw = _raw_card(card)
    spatial = raw.get("spatial") or {}
    training = raw.get("training") or {}
    patch = training.get("training_patch_size") or (training.get("config") or {}).get("spatial", {}).get("patch_size")
    if not (isinstance(patch, list) and len(patch) == len(spatial.get("patch_size", [])) and all(
            isinstance(p, int) and p > 0 for p in patch)):
        patch = spatial.get("patch_size")
    return [int(p) for p in patch]


def seconds_per_step(card: Any, batch_size: int = BATCH_SIZE, patch: list[int] | None = None) -> float:
    """Estimated seconds of one training batch of ``card``'s network on the 2-core reference CPU."""
    raw = _raw_card(card)
    patch = patch or training_patch(card)
    training = raw.get("training") or {}
    try:
        steps = int(training["epochs_run"]) * int(training["steps_per_epoch"])
        trained_batch = int(training["batch_size"])
        trained_pixels = float(math.prod(training.get("training_patch_size") or
                                         training["config"]["spatial"]["patch_size"]))
        measured = float(training["duration_s"]) / steps
        if steps >= 50 and measured > 0:
            return measured * (batch_size / trained_batch) * (float(math.prod(patch)) / trained_pixels)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    config = (raw.get("architecture") or {}).get("config") or {}
    base = float(config.get("base_filters", 16))
    channels = len(raw.get("channels") or [1])
    pixels = float(math.prod(patch))
    if (raw.get("spatial") or {}).get("mode") == "3d":
        pixels *= 9.0  # 3×3×3 kernels: three times the work per voxel, three times the depth
    work = batch_size * pixels * base * base * (1.0 + 0.05 * channels)
    return _SECONDS_PER_UNIT * work


def fine_tune_plan(dataset_dir: str | os.PathLike[str], card: Any, max_steps: int | None = None,
                   freeze_encoder: bool | None = None) -> FineTunePlan:
    """The fine-tuning schedule for ``dataset_dir`` starting from the model ``card`` (TF-free).

    Args:
        dataset_dir: a MedSegAI dataset folder (only ``dataset.json`` is read).
        card: the parent :class:`~MedSegAILib.model.modelcard.ModelCard` (or its ``model.json`` dict).
        max_steps: the user's cap on the number of steps (``--max-steps``), or None.
        freeze_encoder: the user's choice, or None for the default.

    Returns:
        The :class:`FineTunePlan`; ``plan.config()`` gives the recipe keys it sets.

    Raises:
        MedSegAIInputError: the dataset folder is unreadable or has no case.
        ValueError: ``max_steps`` is not a whole number ≥ 1.
    """
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a whole number >= 1 or None, got {max_steps!r}")
    cases, patients = _dataset_counts(dataset_dir)
    patch = training_patch(card)
    per_step = _STEP_FACTOR * seconds_per_step(card, BATCH_SIZE, patch)
    fixed = _FIXED_S + _SECONDS_PER_CASE * cases
    affordable = max(MIN_STEPS, int((TIME_BUDGET_S - fixed) / per_step))
    steps = min(STEPS_BASE + STEPS_PER_CASE * cases, MAX_STEPS, affordable) if max_steps is None else max_steps
    steps_per_epoch = min(STEPS_PER_EPOCH, steps)
    epochs = max(1, steps // steps_per_epoch)  # whole epochs, as TrainConfig.plan() runs them
    steps = epochs * steps_per_epoch
    held_out = patients >= 2
    return FineTunePlan(
        cases=cases,
        patients=patients,
        steps=int(steps),
        epochs=int(epochs),
        steps_per_epoch=int(steps_per_epoch),
        batch_size=BATCH_SIZE,
        patch_size=tuple(patch),
        learning_rate=LEARNING_RATE,
        freeze_encoder=bool(freeze_encoder) if freeze_encoder is not None else False,
        keep_parent=KEEP_PARENT,
        early_stopping_patience=PATIENCE if held_out else None,
        validation="held-out patient" if held_out else "training cases",
        seconds_per_step=round(per_step, 3),
        estimated_seconds=round(fixed + per_step * steps, 0),
    )
