"""Segmentation losses and Dice metrics (Keras 3, serialisable, mixed-precision safe).

Layouts (channels-last):

* ``y_true``: integer label maps ``(N, *spatial)`` or ``(N, *spatial, 1)`` (any numeric dtype;
  class index == label value, 0 = background);
* ``y_pred``: probabilities ``(N, *spatial, K)`` (softmax output; float16/bfloat16/float32).

All computations are done in float32 whatever the input dtype. Soft Dice is computed over the
foreground classes ``1..K-1`` with sums over the batch and all spatial axes ("batch Dice"), or per
sample when ``batch_dice=False``. Every class is registered with
``keras.saving.register_keras_serializable(package="medsegai")`` and has ``get_config``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import keras
from keras import ops

__all__ = [
    "DiceCrossEntropyLoss",
    "DiceFocalLoss",
    "LOSSES",
    "MeanForegroundDice",
    "PerLabelDice",
    "get_loss",
    "make_metrics",
    "metric_name",
]

_EPS = 1e-7


def _labels_and_probs(y_true: Any, y_pred: Any) -> tuple[Any, Any, int]:
    """Return (int32 labels ``(N, *spatial)``, float32 probabilities, K)."""
    y_pred = ops.cast(y_pred, "float32")
    num_classes = y_pred.shape[-1]
    if num_classes is None:
        raise ValueError("y_pred must have a known class (last) dimension")
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape):
        y_true = ops.squeeze(y_true, axis=-1)
    elif len(y_true.shape) != len(y_pred.shape) - 1:
        raise ValueError(
            f"y_true must have shape (N, ...) or (N, ..., 1) matching y_pred {tuple(y_pred.shape)}, "
            f"got {tuple(y_true.shape)}"
        )
    labels = ops.cast(ops.round(ops.cast(y_true, "float32")), "int32")
    return labels, y_pred, int(num_classes)


def _check_class_weights(class_weights: Sequence[float] | None) -> list[float] | None:
    if class_weights is None:
        return None
    if isinstance(class_weights, (str, bytes)) or not isinstance(class_weights, Sequence):
        raise TypeError(f"class_weights must be a list of numbers (one per class), got {class_weights!r}")
    weights = []
    for w in class_weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"class_weights must be non-negative numbers, got {class_weights!r}")
        weights.append(float(w))
    if len(weights) < 2 or sum(weights[1:]) <= 0:
        raise ValueError(
            f"class_weights needs one weight per class (K >= 2) and a positive foreground weight, got {weights!r}"
        )
    return weights


def _class_weight_vector(class_weights: list[float] | None, num_classes: int) -> Any:
    if class_weights is None:
        return ops.ones((num_classes,), dtype="float32")
    if len(class_weights) != num_classes:
        raise ValueError(f"class_weights has {len(class_weights)} entries but the model predicts {num_classes} classes")
    return ops.convert_to_tensor(class_weights, dtype="float32")


def _soft_dice_loss(onehot: Any, probs: Any, weights: Any, smooth: float, batch_dice: bool) -> Any:
    """1 - weighted mean soft Dice over foreground classes (float32 scalar)."""
    rank = len(probs.shape)
    axes = tuple(range(0, rank - 1)) if batch_dice else tuple(range(1, rank - 1))
    fg_true = onehot[..., 1:]
    fg_pred = probs[..., 1:]
    intersection = ops.sum(fg_true * fg_pred, axis=axes)
    denominator = ops.sum(fg_true, axis=axes) + ops.sum(fg_pred, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)  # (K-1,) or (N, K-1)
    w = weights[1:]
    return 1.0 - ops.sum(dice * w, axis=-1) / ops.sum(w)  # scalar (batch Dice) or (N,)


class _DiceBase(keras.losses.Loss):
    """Common arguments of the compound Dice losses."""

    def __init__(
        self,
        dice_weight: float = 1.0,
        class_weights: Sequence[float] | None = None,
        smooth: float = 1e-5,
        batch_dice: bool = True,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(dice_weight, bool) or not isinstance(dice_weight, (int, float)) or dice_weight < 0:
            raise ValueError(f"dice_weight must be a non-negative number, got {dice_weight!r}")
        if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or smooth <= 0:
            raise ValueError(f"smooth must be a positive number, got {smooth!r}")
        if not isinstance(batch_dice, bool):
            raise TypeError(f"batch_dice must be a bool, got {batch_dice!r}")
        self.dice_weight = float(dice_weight)
        self.class_weights = _check_class_weights(class_weights)
        self.smooth = float(smooth)
        self.batch_dice = batch_dice

    def _pixel_term(self, onehot: Any, probs: Any, weights: Any) -> Any:
        raise NotImplementedError

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels, probs, k = _labels_and_probs(y_true, y_pred)
        onehot = ops.one_hot(labels, k, dtype="float32")
        weights = _class_weight_vector(self.class_weights, k)
        dice = _soft_dice_loss(onehot, probs, weights, self.smooth, self.batch_dice)
        pixel = self._pixel_term(onehot, probs, weights)
        return self.dice_weight * ops.mean(dice) + pixel

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "dice_weight": self.dice_weight,
                "class_weights": self.class_weights,
                "smooth": self.smooth,
                "batch_dice": self.batch_dice,
            }
        )
        return config


def _weighted_voxel_mean(per_voxel: Any, onehot: Any, weights: Any) -> Any:
    voxel_w = ops.sum(onehot * weights, axis=-1)
    return ops.sum(per_voxel * voxel_w) / ops.maximum(ops.sum(voxel_w), _EPS)


@keras.saving.register_keras_serializable(package="medsegai")
class DiceCrossEntropyLoss(_DiceBase):
    """``dice_weight * (1 - soft Dice) + ce_weight * cross-entropy``.

    Args:
        dice_weight: weight of the soft Dice term (foreground classes only).
        ce_weight: weight of the cross-entropy term.
        class_weights: optional ``K`` non-negative weights: weighted mean of the per-class Dice
            (foreground entries) and per-voxel weights ``w[y]`` of the cross-entropy.
        smooth: Dice smoothing added to numerator and denominator.
        batch_dice: sum Dice statistics over the batch (True) or average per-sample Dice (False).
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        class_weights: Sequence[float] | None = None,
        smooth: float = 1e-5,
        batch_dice: bool = True,
        name: str = "dice_ce",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(dice_weight, class_weights, smooth, batch_dice, name=name, reduction=reduction, dtype=dtype)
        if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) or ce_weight < 0:
            raise ValueError(f"ce_weight must be a non-negative number, got {ce_weight!r}")
        self.ce_weight = float(ce_weight)

    def _pixel_term(self, onehot: Any, probs: Any, weights: Any) -> Any:
        ce = -ops.sum(onehot * ops.log(ops.clip(probs, _EPS, 1.0)), axis=-1)
        return self.ce_weight * _weighted_voxel_mean(ce, onehot, weights)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["ce_weight"] = self.ce_weight
        return config


@keras.saving.register_keras_serializable(package="medsegai")
class DiceFocalLoss(_DiceBase):
    """``dice_weight * (1 - soft Dice) + focal_weight * focal loss`` (Lin et al. 2017).

    The focal term is ``-(1 - p_t)**gamma * log(p_t)`` per voxel, with ``p_t`` the probability of the
    true class; ``class_weights`` act as per-class ``alpha`` (weighted voxel mean).

    Args:
        dice_weight: weight of the soft Dice term.
        focal_weight: weight of the focal term.
        gamma: focusing parameter (>= 0; 0 gives cross-entropy).
        class_weights, smooth, batch_dice: as in :class:`DiceCrossEntropyLoss`.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        focal_weight: float = 1.0,
        gamma: float = 2.0,
        class_weights: Sequence[float] | None = None,
        smooth: float = 1e-5,
        batch_dice: bool = True,
        name: str = "dice_focal",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(dice_weight, class_weights, smooth, batch_dice, name=name, reduction=reduction, dtype=dtype)
        for key, value in (("focal_weight", focal_weight), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{key} must be a non-negative number, got {value!r}")
        self.focal_weight = float(focal_weight)
        self.gamma = float(gamma)

    def _pixel_term(self, onehot: Any, probs: Any, weights: Any) -> Any:
        p_t = ops.clip(ops.sum(onehot * probs, axis=-1), _EPS, 1.0)
        focal = -ops.power(1.0 - p_t, self.gamma) * ops.log(p_t)
        return self.focal_weight * _weighted_voxel_mean(focal, onehot, weights)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"focal_weight": self.focal_weight, "gamma": self.gamma})
        return config


LOSSES: dict[str, type[keras.losses.Loss]] = {"dice_ce": DiceCrossEntropyLoss, "dice_focal": DiceFocalLoss}


def get_loss(config: Mapping[str, Any] | str | None = None) -> keras.losses.Loss:
    """Build a loss from a config such as ``{"name": "dice_focal", "gamma": 2, "class_weights": [...]}``.

    Args:
        config: ``None`` (Dice + CE with defaults), a loss name (``"dice_ce"``/``"dice_focal"``), or a
            mapping with ``name`` plus the loss's constructor arguments.

    Returns:
        A ``keras.losses.Loss``.

    Raises:
        TypeError/ValueError: unknown name or argument (the message names it).
    """
    if config is None:
        config = {"name": "dice_ce"}
    elif isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping):
        raise TypeError(f"loss config must be a mapping, a name or None, got {type(config).__name__}")
    kwargs = dict(config)
    name = kwargs.pop("name", "dice_ce")
    if name not in LOSSES:
        raise ValueError(f"loss name must be one of {sorted(LOSSES)}, got {name!r}")
    try:
        return LOSSES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"invalid argument in {name} loss config {sorted(kwargs)}: {e}") from e


def metric_name(label_name: str) -> str:
    """Metric name for a label: ``dice_<name>`` with characters outside ``[A-Za-z0-9_]`` replaced by ``_``.

    Keras logs it as ``val_dice_<name>`` on validation data.
    """
    if not isinstance(label_name, str) or not label_name:
        raise ValueError(f"label_name must be a non-empty string, got {label_name!r}")
    return "dice_" + re.sub(r"[^A-Za-z0-9_]", "_", label_name)


def _hard_stats(y_true: Any, y_pred: Any) -> tuple[Any, Any, int]:
    labels, probs, k = _labels_and_probs(y_true, y_pred)
    predicted = ops.cast(ops.argmax(probs, axis=-1), "int32")
    return labels, predicted, k


@keras.saving.register_keras_serializable(package="medsegai")
class PerLabelDice(keras.metrics.Metric):
    """Hard Dice of one label (``argmax(y_pred) == value`` vs ``y_true == value``), accumulated over batches.

    ``result = 2|A∩B| / (|A| + |B|)`` over all voxels seen since ``reset_state``; 1.0 when the label is
    absent from both prediction and truth.

    Args:
        label_value: the class index / label value (>= 1).
        label_name: used for the default metric name ``dice_<label_name>`` (see :func:`metric_name`).
        name: explicit metric name (overrides the default).
    """

    def __init__(
        self, label_value: int, label_name: str | None = None, name: str | None = None, dtype: str | None = None
    ) -> None:
        if not isinstance(label_value, int) or isinstance(label_value, bool) or label_value < 1:
            raise ValueError(f"label_value must be an integer >= 1, got {label_value!r}")
        if name is None:
            name = metric_name(label_name if label_name is not None else str(label_value))
        super().__init__(name=name, dtype=dtype)
        self.label_value = label_value
        self.label_name = label_name
        self.intersection = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="intersection")
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="total")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels, predicted, _ = _hard_stats(y_true, y_pred)
        t = ops.cast(ops.equal(labels, self.label_value), "float32")
        p = ops.cast(ops.equal(predicted, self.label_value), "float32")
        self.intersection.assign_add(ops.sum(t * p))
        self.total.assign_add(ops.sum(t) + ops.sum(p))

    def result(self) -> Any:
        return ops.where(self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 1.0)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"label_value": self.label_value, "label_name": self.label_name})
        return config


@keras.saving.register_keras_serializable(package="medsegai")
class MeanForegroundDice(keras.metrics.Metric):
    """Mean hard Dice over foreground classes ``1..num_classes-1``, accumulated over batches.

    Each class's Dice uses all voxels seen since ``reset_state``; classes absent from both prediction
    and truth are left out of the mean (1.0 if every class is absent).

    Args:
        num_classes: ``K`` (background included), >= 2.
        name: metric name (default ``mean_dice``; logged as ``val_mean_dice``).
    """

    def __init__(self, num_classes: int, name: str = "mean_dice", dtype: str | None = None) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        super().__init__(name=name, dtype=dtype)
        self.num_classes = num_classes
        self.intersection = self.add_variable(
            shape=(num_classes - 1,), initializer="zeros", dtype="float32", name="intersection"
        )
        self.total = self.add_variable(shape=(num_classes - 1,), initializer="zeros", dtype="float32", name="total")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels, predicted, k = _hard_stats(y_true, y_pred)
        if k != self.num_classes:
            raise ValueError(f"MeanForegroundDice was made for {self.num_classes} classes but y_pred has {k}")
        t = ops.reshape(ops.one_hot(labels, k, dtype="float32")[..., 1:], (-1, k - 1))
        p = ops.reshape(ops.one_hot(predicted, k, dtype="float32")[..., 1:], (-1, k - 1))
        self.intersection.assign_add(ops.sum(t * p, axis=0))
        self.total.assign_add(ops.sum(t, axis=0) + ops.sum(p, axis=0))

    def result(self) -> Any:
        present = ops.cast(self.total > 0, "float32")
        dice = 2.0 * self.intersection / ops.maximum(self.total, 1.0)
        n = ops.sum(present)
        return ops.where(n > 0, ops.sum(dice * present) / ops.maximum(n, 1.0), 1.0)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["num_classes"] = self.num_classes
        return config


def make_metrics(
    labels: Sequence[str | Mapping[str, Any]], num_classes: int | None = None
) -> list[keras.metrics.Metric]:
    """One :class:`PerLabelDice` per label (names ``dice_<name>``) plus a :class:`MeanForegroundDice`.

    Args:
        labels: label names (value = position + 1) or ``model.json`` label dicts (``name``, ``value``).
        num_classes: ``K``; default ``max(value) + 1``.
    """
    from .models import label_values

    if not labels:
        raise TypeError(f"labels must be a non-empty sequence of names or label dicts, got {labels!r}")
    by_name = label_values(labels, "labels")
    metrics: list[keras.metrics.Metric] = [PerLabelDice(value, name) for name, value in by_name.items()]
    values = list(by_name.values())
    k = num_classes if num_classes is not None else max(values) + 1
    metrics.append(MeanForegroundDice(k))
    return metrics
