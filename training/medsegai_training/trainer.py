"""The training loop: dataset folder + config → model folder (``medsegai train``).

Output folder layout (``-o MODEL_FOLDER``)::

    MODEL_FOLDER/
      model.keras, model.onnx, model.json     the model (written at the end, model.json last)
      NOTICE                                  when the config has a ``notice`` text
      training/run.json                       config, dataset, split, state (epochs done, best Dice)
      training/history.csv                    one row per epoch (loss, mean_dice, val_dice, ...)
      training/logs/                          TensorBoard event files
      training/best.keras, backup/, cache/    while running (removed when the run finished)

An existing folder is refused unless ``resume=True`` and it holds an unfinished run of the same
dataset, config and parent; a resumed run continues after the last finished epoch with the same
weights, optimizer state, sample stream, best Dice and early-stopping counter.

Tensor layouts: channels-last Keras batches, 2D ``(N, y, x, C)`` / 3D ``(N, z, y, x, C)``;
labels are integer maps ``(N, y, x)`` / ``(N, z, y, x)``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from MedSegAILib.core.errors import CancelledError, MedSegAIError, MedSegAIInputError, ModelFolderError
from MedSegAILib.io.imageio import atomic_output
from MedSegAILib.protocol import EXPORT, TRAIN

from .config import TrainConfig, config_from_dict, load_config

__all__ = ["train", "blend_weights", "ExportError", "resolve_config", "finetune_defaults", "parent_card", "make_strategy", "RUN_FILE", "TRAINING_DIR"]

TRAINING_DIR = "training"
RUN_FILE = "run.json"
HISTORY_FILE = "history.csv"
BEST_FILE = "best.keras"
FINAL_WEIGHTS = "final.weights.h5"

ProgressCallback = Callable[[str, int, int, str], None]


class ExportError(MedSegAIError):
    """Training finished but the model folder could not be written; the run can be resumed."""


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _write_json_atomic(path: Path, data: Any) -> None:
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, allow_nan=False, default=_json_default)
        f.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _git_commit() -> dict[str, Any] | None:
    """Commit of the code that trained (the repository holding this package), if it is a git checkout."""
    from MedSegAILib.slicer_bridge.process_tree import hidden_window_flags

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True,
            creationflags=hidden_window_flags(),
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True, creationflags=hidden_window_flags(),
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status)} if commit else None


def parent_card(init: str | os.PathLike[str]) -> Any:
    """The validated card of the model to fine-tune (``--init``): id or folder, with Keras weights.

    Raises:
        ModelFolderError: not found, invalid, no ``model.keras`` or no ``architecture`` record.
    """
    from MedSegAILib.model.modelcard import find_model

    card = find_model(init)
    if card.weights_path("keras") is None:
        raise ModelFolderError(
            f"model {card.id} {card.version} ({card.folder}) has no model.keras; --init needs the Keras weights."
        )
    architecture = card.raw.get("architecture") or {}
    if not isinstance(architecture, dict) or not architecture.get("builder"):
        raise ModelFolderError(
            f"model {card.id} ({card.folder}) does not say how it was built (model.json 'architecture'); "
            "it cannot be fine-tuned with --init."
        )
    return card


def _bump_version(version: str) -> str:
    parts = version.split("-")[0].split(".")
    numbers = [int(p) if p.isdigit() else 0 for p in parts] + [0] * (3 - len(parts))
    numbers = numbers[:3]
    numbers[2] += 1
    return ".".join(str(n) for n in numbers)


def finetune_defaults(parent: Any) -> dict[str, Any]:
    """Recipe defaults taken from a parent model card (for ``--init``).

    Architecture, spatial settings, channels (with the parent's normalisation, fitted statistics
    included), post-processing, id, name, licence come from the parent; the version is the
    parent's with the patch number bumped; labels default to the dataset's (the parent's colours
    and terminology are kept for labels of the same name, see :func:`_decorate_labels`).
    """
    raw = parent.raw
    architecture = raw.get("architecture") or {}
    model_cfg = dict(architecture.get("config") or {})
    model_cfg["builder"] = architecture.get("builder", model_cfg.get("builder"))
    for key in ("in_channels", "num_classes", "encoder_weights"):
        model_cfg.pop(key, None)
    spatial = {k: v for k, v in raw["spatial"].items() if k in ("mode", "axis", "patch_size", "target_spacing", "divisible_by", "batch_size")}
    channels = [
        {k: v for k, v in channel.items() if k in ("name", "modality", "description", "normalization")}
        for channel in raw["channels"]
    ]
    defaults = {
        "model_id": raw["id"],
        "name": raw["name"],
        "version": _bump_version(raw["version"]),
        "description": raw.get("description", ""),
        "license": raw.get("license", ""),
        "model": model_cfg,
        "spatial": spatial,
        "channels": channels,
        "postprocessing": dict(raw.get("postprocessing") or {"method": "argmax"}),
    }
    citation = (raw.get("provenance") or {}).get("citation")
    if isinstance(citation, str):
        defaults["citation"] = citation
    return copy.deepcopy(defaults)


def resolve_config(
    config: TrainConfig | dict[str, Any] | str | os.PathLike[str] | None,
    parent: Any = None,
    dataset: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> TrainConfig:
    """Turn a recipe (object, dict, file or None) into a validated :class:`TrainConfig`.

    With a ``parent`` model card (``--init``), keys the recipe does not set come from
    :func:`finetune_defaults` and, with ``dataset`` too, the schedule of
    :func:`medsegai_training.finetune.fine_tune_plan` (steps scaled to the dataset, learning
    rate, early stopping, the parent's training window). ``overrides`` (e.g. ``epochs=3``; None
    ignored) win over both.
    A :class:`TrainConfig` made by :func:`config_from_dict`/:func:`load_config` remembers which
    keys its recipe set; one constructed directly counts as setting every key.
    """
    if isinstance(config, TrainConfig):
        data = config.to_dict()
        explicit = set(getattr(config, "explicit_keys", data))
    elif isinstance(config, dict):
        data = copy.deepcopy(config)
        data.pop("$comment", None)
        if "id" in data and "model_id" not in data:
            data["model_id"] = data.pop("id")
        explicit = set(data)
    elif config is None:
        data, explicit = {}, set()
    else:
        loaded = load_config(config)
        data = loaded.to_dict()
        explicit = set(loaded.explicit_keys)
    if parent is not None:
        merged = finetune_defaults(parent)
        if dataset is not None:
            from .finetune import fine_tune_plan

            plan = fine_tune_plan(dataset, parent, max_steps=overrides.get("max_steps"),
                                  freeze_encoder=overrides.get("freeze_encoder"))
            merged.update(plan.config())
            merged["spatial"] = dict(merged["spatial"], patch_size=list(plan.patch_size))
        merged.update({k: v for k, v in data.items() if k in explicit})
        data = merged
    data.update({k: v for k, v in overrides.items() if v is not None})
    result = config_from_dict(data)
    result.explicit_keys = frozenset(explicit | {k for k, v in overrides.items() if v is not None})
    return result


def _decorate_labels(labels: list[dict[str, Any]], parent: Any, explicit: set[str]) -> None:
    """Give labels the parent's colour/terminology when a parent label has the same name.

    ``explicit`` names labels whose colour the recipe sets (kept as they are).
    """
    if parent is None:
        return
    by_name = {label.name: label for label in parent.labels}
    for label in labels:
        source = by_name.get(label["name"])
        if source is None:
            continue
        if source.terminology and "terminology" not in label:
            label["terminology"] = copy.deepcopy(source.terminology)
        if label["name"] not in explicit:
            label["color"] = list(source.color)


# ----------------------------------------------------------------------------------------------
# Strategy, precision
# ----------------------------------------------------------------------------------------------


def _tf_config_workers() -> tuple[int, dict[str, Any] | None]:
    text = os.environ.get("TF_CONFIG")
    if not text:
        return 0, None
    try:
        tf_config = json.loads(text)
        cluster = tf_config.get("cluster", {})
        workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    except (ValueError, AttributeError) as e:
        raise MedSegAIInputError(f"TF_CONFIG is not valid JSON ({e}); fix the environment variable.") from e
    return workers, tf_config


def _is_chief(tf_config: dict[str, Any] | None) -> bool:
    if not tf_config:
        return True
    task = tf_config.get("task", {})
    cluster = tf_config.get("cluster", {})
    if task.get("type") == "chief":
        return True
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in cluster


def make_strategy(kind: str = "auto") -> tuple[Any, str]:
    """The ``tf.distribute`` strategy for ``auto``/``mirrored``/``multiworker``/``default``.

    ``auto``: MultiWorkerMirroredStrategy when ``TF_CONFIG`` names more than one worker,
    MirroredStrategy with several GPUs, else the default (single-device) strategy.

    Returns:
        ``(strategy, name)``.
    """
    import tensorflow as tf

    if kind not in ("auto", "mirrored", "multiworker", "default"):
        raise MedSegAIInputError(f"unknown strategy {kind!r}; choose auto, mirrored or multiworker.")
    workers, _ = _tf_config_workers()
    if kind == "multiworker" or (kind == "auto" and workers > 1):
        if workers < 1:
            raise MedSegAIInputError(
                "--strategy multiworker needs the TF_CONFIG environment variable describing the cluster "
                "(see the TensorFlow multi-worker guide); set it on every worker."
            )
        return tf.distribute.MultiWorkerMirroredStrategy(), "multiworker"
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy(), "mirrored"
    return tf.distribute.get_strategy(), "default"


def _use_mixed_precision(setting: Any) -> bool:
    import tensorflow as tf

    if setting == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return bool(setting)


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------


def _learning_rate(config: TrainConfig, total_updates: int) -> Any:
    import keras

    lr = float(config.optimizer["learning_rate"])
    schedule = config.schedule
    name = schedule["name"]
    total_updates = max(1, int(total_updates))
    if name == "warmup_cosine":
        warmup = schedule.get("warmup_steps")
        if warmup is None:
            warmup = int(round(float(schedule.get("warmup_fraction", 0.05)) * total_updates))
        warmup = int(min(max(0, warmup), total_updates - 1))
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=lr * 0.01 if warmup else lr,
            decay_steps=max(1, total_updates - warmup),
            alpha=float(schedule.get("alpha", 0.01)),
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    if name == "step":
        step_size = int(schedule.get("step_size", max(1, total_updates // 3)))
        return keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=max(1, step_size), decay_rate=float(schedule.get("gamma", 0.1)), staircase=True
        )
    return lr  # plateau (ReduceLROnPlateau callback) and constant


def _make_optimizer(config: TrainConfig, total_updates: int, mixed: bool) -> Any:
    import keras

    kwargs: dict[str, Any] = {
        "learning_rate": _learning_rate(config, total_updates),
        "weight_decay": float(config.optimizer["weight_decay"]),
    }
    for key in ("beta_1", "beta_2", "epsilon", "clipnorm"):
        if config.optimizer.get(key) is not None:
            kwargs[key] = float(config.optimizer[key])
    if config.accumulation_steps > 1:
        kwargs["gradient_accumulation_steps"] = int(config.accumulation_steps)
    optimizer = keras.optimizers.AdamW(**kwargs)
    if mixed:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# ----------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------


def _callbacks_module() -> Any:
    import keras

    class ValidationDice(keras.callbacks.Callback):
        """Per-label Dice on whole validation slices/volumes at the end of every epoch."""

        def __init__(self, cases: list[Any], spatial: dict[str, Any], labels: list[dict[str, Any]], batch_size: int) -> None:
            super().__init__()
            self.cases, self.spatial, self.labels, self.batch_size = cases, spatial, labels, batch_size
            self.last: dict[str, Any] = {}
            self._predict: Any = None

        def _predictor(self) -> Callable[[np.ndarray], np.ndarray]:
            import tensorflow as tf

            if self._predict is None:
                model = self.model
                rank = 4 if self.spatial["mode"] == "2d" else 5
                channels = int(model.inputs[0].shape[-1])
                spec = tf.TensorSpec([None] * (rank - 1) + [channels], tf.float32)

                @tf.function(input_signature=[spec], reduce_retracing=True)
                def forward(batch: Any) -> Any:
                    return tf.cast(model(batch, training=False), tf.float32)

                self._predict = lambda batch: forward(np.ascontiguousarray(batch, dtype=np.float32)).numpy()
            return self._predict

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            from .data import validation_dice
            from .losses import metric_name

            logs = logs if logs is not None else {}
            per_label, per_case = validation_dice(
                self._predictor(), self.cases, self.spatial, len(self.labels), self.batch_size
            )
            finite = [v for v in per_label if math.isfinite(v)]
            mean = float(np.mean(finite)) if finite else 0.0
            logs["val_dice"] = mean
            for label, value in zip(self.labels, per_label):
                logs["val_" + metric_name(label["name"])] = value if math.isfinite(value) else 0.0
            self.last = {"mean": mean, "per_label": per_label, "per_case": per_case}

    class RunState(keras.callbacks.Callback):
        """Best checkpoint by validation Dice, early stopping, progress, cancellation, run.json."""

        def __init__(
            self,
            trainer: "_Run",
            validation: ValidationDice,
            patience: int | None,
            epochs: int,
            progress: ProgressCallback | None,
            should_cancel: Callable[[], bool] | None,
        ) -> None:
            super().__init__()
            self.trainer, self.validation = trainer, validation
            self.patience, self.epochs = patience, epochs
            self.progress, self.should_cancel = progress, should_cancel
            self.cancelled = False
            self._epoch_start = time.monotonic()
            self._epoch_seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self._epoch_start = time.monotonic()

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            if self.should_cancel is not None and self.should_cancel():
                self.cancelled = True
                self.model.stop_training = True

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = logs or {}
            state = self.trainer.state
            val = float(logs.get("val_dice", 0.0))
            improved = state.get("best_dice") is None or val > state["best_dice"] + 1e-6
            if improved:
                state["best_dice"] = val
                state["best_epoch"] = epoch + 1
                state["best_per_label"] = [_finite(v) for v in self.validation.last.get("per_label", [])]
                state["best_per_case"] = {
                    case: [_finite(v) for v in values] for case, values in self.validation.last.get("per_case", {}).items()
                }
                state["wait"] = 0
                if self.trainer.is_chief:
                    self.trainer.save_best(self.model)
            else:
                state["wait"] = int(state.get("wait", 0)) + 1
            state["epochs_done"] = epoch + 1
            state["last_loss"] = _finite(float(logs.get("loss", float("nan"))))
            state["last_val_dice"] = _finite(val)
            if self.patience and state["wait"] >= self.patience:
                state["stopped_early"] = True
                self.model.stop_training = True
            self.trainer.save_state()
            if self.progress is not None:
                loss = logs.get("loss", float("nan"))
                seconds = time.monotonic() - self._epoch_start
                self._epoch_seconds.append(seconds)
                left = (self.epochs - epoch - 1) * float(np.median(self._epoch_seconds))
                self.progress(
                    TRAIN, epoch + 1, self.epochs,
                    f"loss {loss:.4f} val dice {val:.4f} (best {state['best_dice']:.4f} @ {state['best_epoch']}) "
                    f"{seconds:.0f} s, about {left:.0f} s left",
                )
            if self.should_cancel is not None and self.should_cancel():
                self.cancelled = True
                self.model.stop_training = True

    class ScalarLogs(keras.callbacks.Callback):
        """TensorBoard scalars per epoch (``train``/``validation`` runs) without the tensorboard package.

        Writes the same event files as ``keras.callbacks.TensorBoard`` (tags ``epoch_<metric>``,
        plugin ``scalars``) with core ``tf.summary.write``, so the logs open in TensorBoard.
        """

        def __init__(self, log_dir: Path) -> None:
            super().__init__()
            self.log_dir = log_dir
            self._writers: dict[str, Any] = {}

        def _writer(self, name: str) -> Any:
            import tensorflow as tf

            if name not in self._writers:
                self._writers[name] = tf.summary.create_file_writer(str(self.log_dir / name))
            return self._writers[name]

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            metadata = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
            )
            values = dict(logs or {})
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                values["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            for key, value in values.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                run_name, tag = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                writer = self._writer(run_name)
                with writer.as_default():
                    tf.summary.write(f"epoch_{tag}", tf.constant(number, tf.float32), step=epoch, metadata=metadata)
            for writer in self._writers.values():
                writer.flush()

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            for writer in self._writers.values():
                writer.close()
            self._writers = {}

    return ValidationDice, RunState, ScalarLogs


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _tensorboard_callback(keras: Any, log_dir: Path, fallback: Any) -> Any:
    """Keras' TensorBoard callback when the tensorboard package is installed, else :class:`ScalarLogs`."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        return keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False, profile_batch=0)
    return fallback(log_dir)


class _Run:
    """State of one training run (paths, run.json, checkpoints)."""

    def __init__(self, output_dir: Path, is_chief: bool) -> None:
        self.output_dir = output_dir
        self.training_dir = output_dir / TRAINING_DIR
        self.run_file = self.training_dir / RUN_FILE
        self.is_chief = is_chief
        self.record: dict[str, Any] = {}

    @property
    def state(self) -> dict[str, Any]:
        return self.record.setdefault("state", {})

    def save_state(self) -> None:
        self.record["updated"] = _now()
        _write_json_atomic(self.run_file, self.record)

    def save_best(self, model: Any) -> None:
        with atomic_output(self.training_dir / BEST_FILE, overwrite=True) as tmp:
            model.save(tmp, overwrite=True)


def _dataset_identity(info: Any) -> dict[str, Any]:
    ids = [case.id for case in info.cases]
    digest = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16]
    return {
        "path": str(info.root),
        "name": info.root.name,
        "cases": len(ids),
        "patients": len({case.patient for case in info.cases}),
        "channels": list(info.channels),
        "labels": dict(info.labels),
        "case_ids_sha1": digest,
    }


def _open_output(
    output_dir: Path, resume: bool, config: TrainConfig, dataset: dict[str, Any], init: str | None
) -> tuple[dict[str, Any] | None, bool]:
    """Check the output folder; returns ``(stored record or None, resuming)``."""
    run_file = output_dir / TRAINING_DIR / RUN_FILE
    if output_dir.exists() or output_dir.is_symlink():
        if not resume:
            raise MedSegAIInputError(
                f"output folder {output_dir} already exists; choose a new folder (nothing is overwritten), "
                "or add --resume to continue the unfinished run stored there."
            )
        if not run_file.is_file():
            raise MedSegAIInputError(
                f"{output_dir} is not an unfinished MedSegAI training run (it has no {TRAINING_DIR}/{RUN_FILE}); "
                "choose a new output folder."
            )
        try:
            record = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MedSegAIInputError(f"cannot read {run_file} ({e}); start a new run in a new folder.") from e
        if record.get("status") == "finished":
            raise MedSegAIInputError(
                f"the run in {output_dir} already finished; there is nothing to resume (train into a new folder)."
            )
        stored = record.get("config", {})
        if stored != config.to_dict():
            changed = sorted(k for k in set(stored) | set(config.to_dict()) if stored.get(k) != config.to_dict().get(k))
            raise MedSegAIInputError(
                f"{output_dir} was started with different settings ({', '.join(changed)}); resume with the "
                "same --config/--epochs/--folds options, or train into a new folder."
            )
        old = record.get("dataset", {})
        if old.get("path") != dataset["path"] or old.get("case_ids_sha1") != dataset["case_ids_sha1"]:
            raise MedSegAIInputError(
                f"{output_dir} was trained on a different dataset or different cases ({old.get('path')}); "
                "resume with the same dataset, or train into a new folder."
            )
        if record.get("init") != init:
            raise MedSegAIInputError(
                f"{output_dir} was started with --init {record.get('init')!r}, not {init!r}; resume with the same --init."
            )
        return record, True
    if resume:
        raise MedSegAIInputError(f"there is no run to resume in {output_dir} (it does not exist); start without --resume.")
    if not output_dir.parent.is_dir():
        raise MedSegAIInputError(f"the folder {output_dir.parent} does not exist; create it first.")
    return None, False


def train(
    dataset_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    config: TrainConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
    init: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    strategy: str = "auto",
    freeze_encoder: bool | None = None,
    should_cancel: Callable[[], bool] | None = None,
    onnx: bool | str = True,
) -> Path:
    """Train a segmentation model on a dataset folder and write a model folder.

    Args:
        dataset_dir: a MedSegAI dataset folder (``dataset.json`` + images + labels).
        output_dir: the model folder to create (must not exist unless ``resume``).
        config: :class:`TrainConfig`, a recipe dict, a recipe file path, or None (defaults; on
            resume the stored config is used).
        init: parent model id or folder to fine-tune from (only read, never modified).
        resume: continue the unfinished run stored in ``output_dir``.
        progress: ``(stage, done, total, message)``; stages ``preprocess``, ``train`` (one call
            per epoch: "loss … val dice …"), ``export``.
        strategy: ``auto``, ``mirrored``, ``multiworker`` (TF_CONFIG) or ``default``.
        freeze_encoder: with ``init``, keep the encoder (``enc_*`` layers) fixed; None = config.
        should_cancel: polled after every batch; True stops after the batch and raises
            :class:`CancelledError` (the run stays resumable).
        onnx: ``True`` writes ``model.onnx`` when it agrees with Keras (else the folder holds
            ``model.keras`` only and ``model.json`` says why), ``False`` never, ``"require"``
            fails instead (see :func:`medsegai_training.export.export_model_folder`).

    Returns:
        ``output_dir`` as an absolute ``Path``; it holds ``model.keras``, ``model.onnx``,
        ``model.json`` (valid for ``medsegai segment``) and ``training/``.

    Raises:
        MedSegAIInputError: existing output folder, bad dataset (before any training), bad config.
        CancelledError: ``should_cancel`` asked to stop.
        ExportError: training finished but writing the model folder failed; the run is kept and
            ``resume=True`` writes the folder without training again.

    With ``init`` and no explicit setting in ``config``, the schedule (steps, learning rate,
    early stopping, encoder freezing) comes from :func:`medsegai_training.finetune.fine_tune_plan`.
    """
    from MedSegAILib.data.dataset import check_dataset, load_dataset

    output = Path(output_dir).expanduser().absolute()
    dataset_path = Path(dataset_dir).expanduser()
    if not (dataset_path / "dataset.json").is_file():
        raise MedSegAIInputError(
            f"{dataset_path} is not a MedSegAI dataset folder (no dataset.json); create one with "
            "`medsegai dataset add` or `medsegai dataset import-nnunet`."
        )
    init_text = str(init) if init is not None else None
    parent = parent_card(init) if init is not None else None
    stored_record = None
    if resume and config is None:
        run_file = output / TRAINING_DIR / RUN_FILE
        if run_file.is_file():
            with contextlib.suppress(OSError, ValueError):
                stored_record = json.loads(run_file.read_text(encoding="utf-8"))
        if stored_record and isinstance(stored_record.get("config"), dict):
            config = stored_record["config"]
            parent_for_config = None
        else:
            parent_for_config = parent
    else:
        parent_for_config = parent
    cfg = resolve_config(config, parent=parent_for_config, dataset=dataset_path, freeze_encoder=freeze_encoder)

    exists = output.exists() or output.is_symlink()
    if exists and not resume:
        raise MedSegAIInputError(
            f"output folder {output} already exists; choose a new folder (nothing is overwritten), "
            "or add --resume to continue the unfinished run stored there."
        )
    if resume and not exists:
        raise MedSegAIInputError(f"there is no run to resume in {output} (it does not exist); start without --resume.")

    # Refuse a bad dataset before anything is created or any TensorFlow work starts.
    report = check_dataset(dataset_path)
    report.raise_if_errors()
    info = load_dataset(dataset_path)
    identity = _dataset_identity(info)
    record, resuming = _open_output(output, resume, cfg, identity, init_text)

    from .data import make_data_plan
    from .splits import make_split

    plan = make_data_plan(cfg, info.channels, info.labels)
    _decorate_labels(plan.labels, parent, {lab["name"] for lab in (cfg.labels or []) if lab.get("color")})
    if parent is not None and len(parent.channels) != len(plan.channels):
        raise MedSegAIInputError(
            f"the parent model {parent.id} takes {len(parent.channels)} channel(s) "
            f"({', '.join(parent.channel_names)}) but this training uses {len(plan.channels)} "
            f"({', '.join(plan.channel_names)}); choose matching channels in the recipe."
        )
    split = make_split(
        info.cases, folds=cfg.folds, fold=cfg.fold, validation_fraction=cfg.validation_fraction,
        validation_cases=cfg.validation_cases, test_cases=cfg.test_cases, test_fraction=cfg.test_fraction, seed=cfg.seed,
    )
    model_cfg, divisible = _model_config(cfg, plan)
    workers, tf_config = _tf_config_workers()
    run = _Run(output, _is_chief(tf_config))

    if record is None:
        output.mkdir(parents=False, exist_ok=False)
        created = True
    else:
        created = False
    try:
        return _prepare_and_run(
            cfg, info, plan, split, run, record, identity, init_text, resuming, parent, strategy,
            progress, should_cancel, workers, model_cfg, divisible, onnx,
        )
    except BaseException:
        if created and not run.state.get("epochs_done"):
            # Nothing worth resuming was written: leave no half-made output folder behind.
            shutil.rmtree(output, ignore_errors=True)
        raise


def _model_config(cfg: TrainConfig, plan: Any) -> tuple[dict[str, Any], int]:
    """The complete builder config (channels and classes filled in) and the size divisor."""
    from . import models

    model_cfg = dict(cfg.model)
    model_cfg["in_channels"] = len(plan.channels)
    model_cfg["num_classes"] = plan.num_classes
    try:
        model_cfg = models.resolve_config(model_cfg)
        network_divisor = models.divisible_by(model_cfg)
    except ValueError as e:
        raise MedSegAIInputError(f"training config 'model': {e}; fix the recipe.") from e
    divisible = int(np.lcm(network_divisor, int(cfg.spatial.get("divisible_by", 1))))
    if any(p % divisible for p in cfg.spatial["patch_size"]):
        raise MedSegAIInputError(
            f"spatial.patch_size {cfg.spatial['patch_size']} must be divisible by {divisible} "
            f"(2**depth of the network); change the patch size or the depth."
        )
    return model_cfg, divisible


def _prepare_and_run(
    cfg: TrainConfig,
    info: Any,
    plan: Any,
    split: Any,
    run: _Run,
    record: dict[str, Any] | None,
    identity: dict[str, Any],
    init_text: str | None,
    resuming: bool,
    parent: Any,
    strategy: str,
    progress: ProgressCallback | None,
    should_cancel: Callable[[], bool] | None,
    workers: int,
    model_cfg: dict[str, Any],
    divisible: int,
    onnx: bool | str = True,
) -> Path:
    """Write run.json, fit normalisation, load the cases, then train and export."""
    from .data import fit_normalization, load_cases

    output = run.output_dir
    if record is None:
        run.training_dir.mkdir()
        run.record = {
            "format": "medsegai-training-run",
            "version": 1,
            "status": "running",
            "created": _now(),
            "config": cfg.to_dict(),
            "dataset": identity,
            "init": init_text,
            "split": split.to_dict(),
            "state": {"epochs_done": 0, "best_dice": None, "best_epoch": None, "wait": 0},
        }
        run.save_state()
    else:
        run.record = record
        if record.get("split", {}).get("train_cases") != list(split.train):
            raise MedSegAIInputError(f"the split of {output} no longer matches the dataset; train into a new folder.")

    def read_for_fit(case_id: str) -> tuple[list[Any], Any]:
        from MedSegAILib.data.dataset import read_case

        images, label = read_case(info, case_id)
        return [images[i] for i in plan.channel_indices], label

    if resuming and run.record.get("channels"):
        plan.channels = copy.deepcopy(run.record["channels"])
    else:
        fit_normalization(read_for_fit, list(split.train), plan, progress)
        run.record["channels"] = copy.deepcopy(plan.channels)
        run.save_state()

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run.training_dir / "cache"
    train_cases = load_cases(info, list(split.train), plan, cache_dir, progress, cfg.seed)
    validation_ids = list(split.validation)
    if cfg.validation_max_cases is not None:
        validation_ids = validation_ids[: cfg.validation_max_cases]
    known = {c.id: c for c in train_cases}
    missing = [c for c in validation_ids if c not in known]
    loaded = load_cases(info, missing, plan, cache_dir, progress, cfg.seed) if missing else []
    known.update({c.id: c for c in loaded})
    validation_cases = [known[c] for c in validation_ids]

    return _fit_and_export(
        cfg, info, plan, split, train_cases, validation_cases, run, parent, strategy, progress,
        should_cancel, workers, cache_dir if not cfg.cache_dir else None, model_cfg, divisible, onnx,
    )


def blend_weights(model: Any, parent_weights: list[np.ndarray], keep_parent: float) -> None:
    """Set ``model``'s weights to ``keep_parent × parent + (1 − keep_parent) × model`` (in place).

    ``parent_weights`` is ``get_weights()`` of the same architecture (the parent's weights as
    adapted to this model's labels, taken before training). Weight-space ensembling of a
    fine-tuned model with its start ("WiSE-FT", Wortsman et al. 2022) keeps part of the gain and
    much of what the parent knew (``benchmarks/RESULTS.md`` section 9).

    Raises:
        ValueError: ``keep_parent`` is outside [0, 1) or the weights do not match the model.
    """
    if not 0.0 <= float(keep_parent) < 1.0:
        raise ValueError(f"keep_parent must be in [0, 1), got {keep_parent!r}")
    current = model.get_weights()
    if len(current) != len(parent_weights) or any(a.shape != b.shape for a, b in zip(current, parent_weights)):
        raise ValueError("parent weights do not match the model's (different architecture or labels)")
    k = float(keep_parent)
    model.set_weights([(k * p + (1.0 - k) * w).astype(w.dtype) for p, w in zip(parent_weights, current)])


def _fit_and_export(
    cfg: TrainConfig,
    info: Any,
    plan: Any,
    split: Any,
    train_cases: list[Any],
    validation_cases: list[Any],
    run: _Run,
    parent: Any,
    strategy_kind: str,
    progress: ProgressCallback | None,
    should_cancel: Callable[[], bool] | None,
    workers: int,
    own_cache: Path | None,
    model_cfg: dict[str, Any],
    divisible: int,
    onnx: bool | str = True,
) -> Path:
    import keras

    from . import losses, models
    from .data import Sampler, make_train_dataset

    started = time.monotonic()
    strategy, strategy_name = make_strategy(strategy_kind)
    mixed = _use_mixed_precision(cfg.mixed_precision)
    epochs, steps_per_epoch = cfg.plan()
    total_updates = (epochs * steps_per_epoch) // cfg.accumulation_steps

    sampler = Sampler(train_cases, cfg.spatial, plan.num_classes, cfg.foreground_fraction, cfg.seed)
    state = run.state
    keras.utils.set_random_seed(cfg.seed)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if mixed else "float32")
    try:
        with strategy.scope():
            model = models.build_model(model_cfg)
            adaptation = None
            if parent is not None:
                from .export import load_keras_model

                parent_model = load_keras_model(parent.folder / parent.files["keras"])
                adaptation = models.adapt_from_parent(
                    model, parent_model, [label.to_dict() for label in parent.labels], plan.labels
                )
                del parent_model
            elif cfg.keep_parent:
                raise MedSegAIInputError("keep_parent needs --init (a parent model to blend back in).")
            start_weights = [np.array(w, copy=True) for w in model.get_weights()] if cfg.keep_parent else None
            if cfg.freeze_encoder:
                if parent is None:
                    raise MedSegAIInputError("freeze_encoder needs --init (a parent model to keep the encoder of).")
                models.freeze_encoder(model)
            optimizer = _make_optimizer(cfg, total_updates, mixed)
            model.compile(
                optimizer=optimizer,
                loss=losses.get_loss(cfg.loss),
                metrics=[losses.MeanForegroundDice(plan.num_classes)],
                jit_compile=False,
            )

        if strategy_name == "multiworker":
            _prebuild_for_multiworker(model, strategy, sampler)

        backup_dir = run.training_dir / "backup"
        initial_epoch = 0
        metadata = backup_dir / "training_metadata.json"
        if metadata.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError):
                initial_epoch = int(json.loads(metadata.read_text())["epoch"])
        if initial_epoch >= epochs and not state.get("stopped_early"):
            initial_epoch = epochs
        start = initial_epoch * steps_per_epoch * cfg.batch_size
        dataset = make_train_dataset(
            sampler, cfg.batch_size, cfg.augmentation_config(), start=start, num_parallel_calls=cfg.num_workers
        )

        ValidationDice, RunState, ScalarLogs = _callbacks_module()
        validation = ValidationDice(validation_cases, cfg.spatial, plan.labels, batch_size=max(1, cfg.batch_size))
        patience = cfg.early_stopping_patience or None
        run_state = RunState(run, validation, patience, epochs, progress, should_cancel)
        callbacks = [validation]
        if cfg.schedule["name"] == "plateau":
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau(
                    monitor="val_dice", mode="max", factor=float(cfg.schedule.get("factor", 0.5)),
                    patience=int(cfg.schedule.get("patience", 5)), min_lr=float(cfg.schedule.get("min_lr", 1e-6)),
                    verbose=0,
                )
            )
        callbacks += [
            run_state,
            keras.callbacks.CSVLogger(str(run.training_dir / HISTORY_FILE), append=True),
            _tensorboard_callback(keras, run.training_dir / "logs", ScalarLogs),
            keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
            keras.callbacks.TerminateOnNaN(),
        ]
        run.record["status"] = "running"
        run.record["runtime"] = {
            "strategy": strategy_name,
            "replicas": int(strategy.num_replicas_in_sync),
            "workers": max(1, workers),
            "mixed_precision": mixed,
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
        }
        if adaptation is not None:
            run.record["adaptation"] = adaptation
        run.save_state()
        stopped_before = bool(state.get("stopped_early"))
        if initial_epoch < epochs and not stopped_before:
            model.fit(
                dataset,
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
                initial_epoch=initial_epoch,
                callbacks=callbacks,
                verbose=0,
                shuffle=False,
            )
        if run_state.cancelled:
            if state.get("epochs_done"):
                raise CancelledError(
                    f"training cancelled after epoch {state['epochs_done']}; continue it with --resume "
                    f"(output folder {run.output_dir})."
                )
            raise CancelledError("training cancelled before the first epoch finished; nothing was kept.")
        if not state.get("epochs_done"):
            raise MedSegAIInputError("training stopped before finishing one epoch; check the loss (NaN?) and the data.")
        if workers > 1:
            model.save_weights(str(run.training_dir / FINAL_WEIGHTS))
    finally:
        keras.config.set_dtype_policy(previous_policy)

    if not run.is_chief:
        _finish(run, own_cache)
        return run.output_dir

    if progress is not None:
        progress(EXPORT, 0, 1, "writing model.keras, model.onnx, model.json")
    from .export import load_keras_model

    best_path = run.training_dir / BEST_FILE
    final_model = load_keras_model(best_path) if best_path.is_file() else model
    if start_weights is not None:
        blend_weights(final_model, start_weights, cfg.keep_parent)
    sample_cases = validation_cases or train_cases
    sample_sampler = Sampler(sample_cases, cfg.spatial, plan.num_classes, 1.0, cfg.seed)
    sample_batch = np.stack([sample_sampler.window(i)[0] for i in range(2)])
    card = _model_card(cfg, info, plan, split, run, parent, model_cfg, divisible, time.monotonic() - started)
    extra = {"NOTICE": cfg.notice} if cfg.notice else None
    try:
        _export_into(final_model, card, run.output_dir, sample_batch, extra, onnx)
    except Exception as e:
        kept = best_path if best_path.is_file() else run.training_dir
        raise ExportError(
            f"training finished ({state.get('epochs_done')} epochs) but writing the model folder failed "
            f"({type(e).__name__}: {e}); the trained weights are kept in {kept}. Run the same command with "
            f"--resume to write the model folder without training again."
        ) from e

    _finish(run, own_cache)
    if progress is not None:
        progress(EXPORT, 1, 1, f"model folder {run.output_dir}")
    return run.output_dir


def _finish(run: _Run, own_cache: Path | None) -> None:
    """Mark the run finished and remove what only a resumed run needs (backup, cache, best checkpoint).

    The dataset's absolute path (kept while the run can be resumed) is dropped from run.json, so a
    shared model folder does not carry local paths.
    """
    run.record["status"] = "finished"
    run.record["finished"] = _now()
    run.record.get("dataset", {}).pop("path", None)
    run.save_state()
    for leftover in (run.training_dir / "backup", own_cache):
        if leftover is not None and leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
    (run.training_dir / BEST_FILE).unlink(missing_ok=True)


def _prebuild_for_multiworker(model: Any, strategy: Any, sampler: Any) -> None:
    """Make ``model.fit`` work under MultiWorkerMirroredStrategy with Keras 3.

    Two places of Keras' TensorFlow trainer (3.x) fail with MultiWorkerMirroredStrategy's
    collective reduce: the start of ``fit`` builds the compiled metrics by ``strategy.reduce``-ing
    a whole distributed ``(x, y)`` batch (a nested ``PerReplica`` value it cannot convert), and the
    train function reduces the scalar loss/metrics of each step ``axis=0`` (invalid for scalars).
    Here the model, loss, metrics and optimizer are built from one plain local batch, that first
    step is skipped, and the train function runs ``model.train_step`` per replica (gradients are
    all-reduced by the optimizer as usual) and averages the scalar logs over all replicas.
    Every worker runs this at the same point, so collective variable creation stays in step.
    """
    import tensorflow as tf

    windows = [sampler.window(i) for i in range(2)]
    images = tf.constant(np.stack([w[0] for w in windows]))
    labels = tf.constant(np.stack([w[1] for w in windows]).astype(np.int32))
    with strategy.scope():
        model._symbolic_build(data_batch=(images, labels))
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None

    @tf.function(reduce_retracing=True)
    def one_step(iterator: Any) -> dict[str, Any]:
        outputs = strategy.run(model.train_step, args=(next(iterator),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in outputs.items()}

    model.train_function = one_step


def _model_card(
    cfg: TrainConfig,
    info: Any,
    plan: Any,
    split: Any,
    run: _Run,
    parent: Any,
    model_cfg: dict[str, Any],
    divisible: int,
    seconds: float,
) -> dict[str, Any]:
    import tensorflow as tf

    state = run.state
    spatial: dict[str, Any] = {
        "mode": cfg.spatial["mode"],
        "orientation": "LPS",
        "patch_size": list(cfg.spatial["patch_size"]),
        "target_spacing": list(cfg.spatial["target_spacing"]),
        "divisible_by": int(divisible),
        "batch_size": int(cfg.spatial.get("batch_size", 8 if cfg.spatial["mode"] == "2d" else 1)),
    }
    if cfg.spatial["mode"] == "2d":
        spatial["axis"] = cfg.spatial.get("axis", "axial")
    parent_patch = list(parent.raw["spatial"]["patch_size"]) if parent is not None else None
    training_patch = list(spatial["patch_size"])
    if parent_patch and parent_patch != training_patch and len(parent_patch) == len(training_patch) and not any(
            p % divisible for p in parent_patch):
        spatial["patch_size"] = parent_patch  # fully convolutional: keep the parent's (larger) inference window
    names = [label["name"] for label in plan.labels]
    per_label = state.get("best_per_label") or [None] * len(names)
    postprocessing = dict(cfg.postprocessing)
    for key in ("largest_component", "fill_holes"):
        if isinstance(postprocessing.get(key), list):
            postprocessing[key] = [n for n in postprocessing[key] if n in names]
    architecture_config = dict(model_cfg)
    if "encoder_weights" in architecture_config:
        architecture_config["encoder_weights"] = None  # the trained weights are in model.keras
    provenance: dict[str, Any] = {
        "trained_with": "medsegai train",
        "training_data": info.root.name,
    }
    if cfg.citation:
        provenance["citation"] = cfg.citation
    if parent is not None:
        provenance["parent"] = {"id": parent.id, "version": parent.version, "name": parent.name}
    card: dict[str, Any] = {
        "schema_version": 1,
        "id": cfg.model_id,
        "name": cfg.name,
        "version": cfg.version,
        "description": cfg.description or f"{cfg.name}, trained with medsegai train on {info.root.name}.",
        "channels": copy.deepcopy(plan.channels),
        "labels": copy.deepcopy(plan.labels),
        "spatial": spatial,
        "postprocessing": postprocessing,
        "architecture": {"builder": model_cfg["builder"], "config": architecture_config},
        "provenance": provenance,
        "metrics": {
            "validation": {
                "dice": {name: value for name, value in zip(names, per_label)},
                "mean_dice": _finite(state.get("best_dice")),
                "cases": list(split.validation),
                "validation_is_train": bool(split.validation_is_train),
                "space": "model grid (resampled), argmax, no post-processing",
            }
        },
        "training": {
            "dataset": {k: v for k, v in run.record["dataset"].items() if k != "path"},
            "split": split.to_dict(),
            "epochs_planned": cfg.plan()[0],
            "epochs_run": int(state.get("epochs_done", 0)),
            "best_epoch": state.get("best_epoch"),
            "stopped_early": bool(state.get("stopped_early", False)),
            "steps_per_epoch": cfg.plan()[1],
            "training_patch_size": training_patch,
            "batch_size": cfg.batch_size,
            "runtime": run.record.get("runtime", {}),
            "duration_s": round(seconds, 1),
            "date": _now(),
            "git": _git_commit(),
            "tensorflow": tf.__version__,
            "config": cfg.to_dict(),
        },
    }
    if cfg.keep_parent:
        card["metrics"]["validation"]["note"] = (
            f"measured on the trained weights before {cfg.keep_parent:g} of the parent's weights were blended back in")
    if cfg.license:
        card["license"] = cfg.license
    return card


def _export_into(model: Any, card: dict[str, Any], output: Path, sample_batch: np.ndarray, extra: Any,
                 onnx: bool | str = True) -> None:
    """Export into a hidden sibling folder, then move the files into ``output`` (model.json last)."""
    from .export import MODEL_JSON, export_model_folder

    staging = output.parent / f".{output.name}.export-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    export_model_folder(model, card, staging, sample_batch, onnx=onnx, extra_files=extra)
    try:
        names = sorted(p.name for p in staging.iterdir() if p.name != MODEL_JSON)
        for name in names:
            target = output / name
            if target.exists() and target.is_dir():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        os.replace(staging / MODEL_JSON, output / MODEL_JSON)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
