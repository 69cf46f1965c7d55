"""Dice + CE / Dice + focal losses and the Dice metrics: known values, serialisation, float16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from medsegai_training.losses import (  # noqa: E402
    DiceCrossEntropyLoss,
    DiceFocalLoss,
    MeanForegroundDice,
    PerLabelDice,
    get_loss,
    make_metrics,
    metric_name,
)
from medsegai_training.models import build_model  # noqa: E402


def _labels() -> np.ndarray:
    """(2, 8, 8) labels: class 1 = 16 voxels/sample top-left, class 2 = 16 voxels/sample bottom-right."""
    y = np.zeros((2, 8, 8), np.int32)
    y[:, :4, :4] = 1
    y[:, 4:, 4:] = 2
    return y


def _onehot(y: np.ndarray, k: int = 3) -> np.ndarray:
    return np.eye(k, dtype="float32")[y]


def _numpy_soft_dice(y: np.ndarray, p: np.ndarray, smooth: float = 1e-5) -> np.ndarray:
    t = _onehot(y, p.shape[-1])
    axes = tuple(range(p.ndim - 1))
    inter = (t * p).sum(axis=axes)
    return (2 * inter + smooth) / (t.sum(axis=axes) + p.sum(axis=axes) + smooth)


@pytest.mark.parametrize(
    "loss", [DiceCrossEntropyLoss(), DiceFocalLoss(), get_loss({"name": "dice_ce", "batch_dice": False})]
)
def test_perfect_prediction_gives_zero_loss(loss: keras.losses.Loss) -> None:
    y = _labels()
    p = _onehot(y)
    assert float(loss(y, p)) == pytest.approx(0.0, abs=1e-5)
    assert float(loss(y[..., None], p)) == pytest.approx(0.0, abs=1e-5)  # (N, ..., 1) labels
    wrong = _onehot(np.where(y == 1, 2, np.where(y == 2, 1, 0)))
    assert float(loss(y, wrong)) > 1.0


def test_soft_dice_term_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    y = _labels()
    logits = rng.normal(size=y.shape + (3,))
    p = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype("float32")
    dice_only = DiceCrossEntropyLoss(ce_weight=0.0)
    expected = 1.0 - _numpy_soft_dice(y, p)[1:].mean()
    assert float(dice_only(y, p)) == pytest.approx(expected, rel=1e-5)
    ce_only = DiceCrossEntropyLoss(dice_weight=0.0)
    expected_ce = -np.log(np.take_along_axis(p, y[..., None], axis=-1)).mean()
    assert float(ce_only(y, p)) == pytest.approx(expected_ce, rel=1e-5)
    focal_only = DiceFocalLoss(dice_weight=0.0, gamma=2.0)
    pt = np.take_along_axis(p, y[..., None], axis=-1)
    assert float(focal_only(y, p)) == pytest.approx((-((1 - pt) ** 2) * np.log(pt)).mean(), rel=1e-5)
    assert float(DiceFocalLoss(dice_weight=0.0, gamma=0.0)(y, p)) == pytest.approx(expected_ce, rel=1e-5)


def test_class_weights() -> None:
    rng = np.random.default_rng(1)
    y = _labels()
    p = rng.dirichlet(np.ones(3), size=y.shape).astype("float32")
    w = [0.5, 1.0, 3.0]
    dice = _numpy_soft_dice(y, p)[1:]
    loss = DiceCrossEntropyLoss(ce_weight=0.0, class_weights=w)
    assert float(loss(y, p)) == pytest.approx(1.0 - (dice * np.array(w[1:])).sum() / 4.0, rel=1e-5)
    ce = -np.log(np.take_along_axis(p, y[..., None], axis=-1))[..., 0]
    vw = np.array(w)[y]
    ce_loss = DiceCrossEntropyLoss(dice_weight=0.0, class_weights=w)
    assert float(ce_loss(y, p)) == pytest.approx((ce * vw).sum() / vw.sum(), rel=1e-5)
    with pytest.raises(ValueError, match="4 entries"):
        DiceCrossEntropyLoss(class_weights=[1, 1, 1, 1])(y, p)
    with pytest.raises(ValueError, match="non-negative"):
        DiceCrossEntropyLoss(class_weights=[1, -1, 1])


def test_float16_inputs_are_finite() -> None:
    y = _labels()
    hard = _onehot(y).astype("float16")  # exact zeros: log(0) must be clipped
    wrong = _onehot((y + 1) % 3).astype("float16")
    for loss in (DiceCrossEntropyLoss(), DiceFocalLoss(), DiceCrossEntropyLoss(batch_dice=False)):
        for p in (hard, wrong):
            value = float(loss(y, p))
            assert np.isfinite(value)
    big = np.zeros((1, 512, 512), np.int32)
    big[:, :300, :300] = 1
    p = np.full((1, 512, 512, 2), 0.5, np.float16)  # sums of 262144 halves overflow float16
    value = float(DiceCrossEntropyLoss()(big, p))
    assert np.isfinite(value) and value == pytest.approx(1.0 - 2 * 0.5 * 90000 / (90000 + 131072) + np.log(2), rel=1e-4)


def test_hard_dice_metrics_known_overlap() -> None:
    y = _labels()
    pred = _onehot(y)
    pred[:, :2, :4] = [1, 0, 0]  # half of label 1 predicted as background
    pred[:, 0, 7] = [0, 0, 1]  # one extra voxel of label 2 per sample
    m1 = PerLabelDice(1, "liver")
    assert m1.name == "dice_liver"
    m1.update_state(y, pred)
    assert float(m1.result()) == pytest.approx(2 * 16 / (32 + 16))
    m2 = PerLabelDice(2, "spleen")
    m2.update_state(y, pred)
    assert float(m2.result()) == pytest.approx(2 * 32 / (32 + 34))
    mean = MeanForegroundDice(3)
    mean.update_state(y, pred)
    assert float(mean.result()) == pytest.approx((2 / 3 + 64 / 66) / 2)
    # accumulation over batches: a second perfect batch
    m1.update_state(y, _onehot(y))
    assert float(m1.result()) == pytest.approx(2 * (16 + 32) / (48 + 64))
    m1.reset_state()
    m1.update_state(y[..., None], _onehot(y))
    assert float(m1.result()) == pytest.approx(1.0)
    empty = PerLabelDice(2)
    empty.update_state(np.zeros((1, 4, 4)), _onehot(np.zeros((1, 4, 4), int)))
    assert float(empty.result()) == 1.0  # absent in both: perfect
    absent = MeanForegroundDice(3)
    absent.update_state(np.where(y == 2, 0, y), _onehot(np.where(y == 2, 0, y)))
    assert float(absent.result()) == pytest.approx(1.0)  # class 2 absent everywhere: left out


def test_metric_names_and_factory() -> None:
    assert metric_name("kidney left") == "dice_kidney_left"
    metrics = make_metrics([{"name": "liver", "value": 1}, {"name": "spleen", "value": 2}])
    assert [m.name for m in metrics] == ["dice_liver", "dice_spleen", "mean_dice"]
    assert metrics[-1].num_classes == 3
    with pytest.raises(ValueError, match="label_value"):
        PerLabelDice(0)
    with pytest.raises(ValueError, match="loss name"):
        get_loss("dice_bce")
    with pytest.raises(ValueError, match="invalid argument"):
        get_loss({"name": "dice_ce", "gamma": 2})
    assert isinstance(get_loss(None), DiceCrossEntropyLoss)
    assert get_loss({"name": "dice_focal", "gamma": 1.5}).gamma == 1.5


def test_serialisation_round_trip() -> None:
    for obj in (
        DiceCrossEntropyLoss(ce_weight=0.5, class_weights=[0.1, 1.0, 2.0], batch_dice=False),
        DiceFocalLoss(gamma=1.0, smooth=1e-3),
        PerLabelDice(2, "spleen"),
        MeanForegroundDice(4),
    ):
        config = keras.saving.serialize_keras_object(obj)
        assert config["module"] == "medsegai" or config.get("registered_name", "").startswith("medsegai>")
        clone = keras.saving.deserialize_keras_object(config, safe_mode=True)
        assert type(clone) is type(obj)
        assert clone.get_config() == obj.get_config()


def test_compiled_model_trains_logs_val_dice_and_reloads(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = build_model({"builder": "unet_2d", "base_filters": 4, "depth": 2, "num_classes": 3})
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=get_loss({"name": "dice_focal", "class_weights": [0.5, 1.0, 1.0]}),
        metrics=make_metrics(["liver", "spleen"]),
    )
    y = np.zeros((4, 16, 16), np.int32)
    y[:, 2:8, 2:8] = 1
    y[:, 9:14, 9:14] = 2
    x = (y[..., None] * 0.5).astype("float32")
    history = model.fit(x, y, validation_data=(x, y[..., None]), epochs=2, batch_size=2, verbose=0)
    assert {"val_dice_liver", "val_dice_spleen", "val_mean_dice", "val_loss"} <= set(history.history)
    assert all(np.isfinite(history.history["loss"]))
    path = tmp_path / "compiled.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True, compile=True)
    assert isinstance(reloaded.loss, DiceFocalLoss)
    assert reloaded.loss.class_weights == [0.5, 1.0, 1.0]
    results = reloaded.evaluate(x, y, verbose=0, return_dict=True)
    assert "dice_liver" in results and 0.0 <= results["dice_liver"] <= 1.0
