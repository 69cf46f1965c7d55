"""Augmentation (medsegai_training.augment): identical geometry for image and label, labels only
copied, reproducible seeds, identity at zero magnitude, graph mode inside tf.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from medsegai_training.augment import DEFAULT_AUGMENTATION, augment_2d, augment_3d, resolve_config  # noqa: E402
from MedSegAILib.io.imageio import read_volume  # noqa: E402

INTENSITY_OFF = {name: {"enabled": False} for name in
                 ("intensity_scale", "intensity_shift", "contrast", "gamma", "noise")}
GEOMETRY_OFF = {name: {"enabled": False} for name in ("flip", "rotate", "scale", "shift", "elastic")}


@pytest.fixture(scope="module")
def real_labels(ct_small_labels: Path) -> np.ndarray:
    """Real multi-organ labelmap (z, y, x) with many label values."""
    array = read_volume(ct_small_labels).array.astype(np.int32)
    assert len(np.unique(array)) > 20
    return array


def _strong_geometry(**extra: dict) -> dict:
    config = {
        **INTENSITY_OFF,
        "flip": {"probability": 0.5},
        "rotate": {"probability": 1.0, "max_degrees": 25.0},
        "scale": {"probability": 1.0, "range": [0.8, 1.25]},
        "shift": {"probability": 1.0, "max_fraction": 0.1},
        "elastic": {"probability": 1.0, "magnitude_voxels": 3.0},
    }
    config.update(extra)
    return config


def test_same_geometry_on_image_and_label_2d(real_labels: np.ndarray) -> None:
    """The image channels hold each pixel's own (y, x) coordinates; linear interpolation keeps them
    exact, so the augmented image says where every output pixel was sampled from, and the label
    must hold the nearest source label there."""
    label = real_labels[15]
    ys, xs = np.meshgrid(np.arange(label.shape[0]), np.arange(label.shape[1]), indexing="ij")
    image = np.stack([ys, xs], axis=-1).astype(np.float32)
    values = set(np.unique(label).tolist())
    changed = 0
    for seed in range(4):
        out_image, out_label = augment_2d(image, label, _strong_geometry(), seed=(seed, 7))
        out_image, out_label = out_image.numpy(), out_label.numpy()
        assert out_image.shape == image.shape and out_image.dtype == np.float32
        assert out_label.shape == label.shape and out_label.dtype == label.dtype
        assert set(np.unique(out_label).tolist()) <= values, "a label value was invented"
        source_y = np.clip(np.round(out_image[..., 0]).astype(int), 0, label.shape[0] - 1)
        source_x = np.clip(np.round(out_image[..., 1]).astype(int), 0, label.shape[1] - 1)
        agree = np.mean(label[source_y, source_x] == out_label)
        assert agree > 0.995, agree
        changed += int(np.mean(out_label != label) > 0.05)
    assert changed >= 3, "strong geometric augmentation should change most samples"


def test_label_derived_image_matches_label(real_labels: np.ndarray) -> None:
    liver = np.where(real_labels[15] == 5, 5, 0).astype(np.int32)
    image = liver[..., None].astype(np.float32)
    for seed in range(3):
        out_image, out_label = augment_2d(image, liver, _strong_geometry(), seed=seed)
        out_image, out_label = out_image.numpy(), out_label.numpy()
        assert set(np.unique(out_label).tolist()) <= {0, 5}
        assert np.mean(np.round(out_image[..., 0] / 5) * 5 == out_label) > 0.98
        assert (out_label == 5).sum() > 0.5 * (liver == 5).sum()


def test_same_geometry_on_image_and_label_3d(real_labels: np.ndarray) -> None:
    label = real_labels[8:24, 20:84, 20:100].astype(np.uint8)
    image = np.stack(np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij"), axis=-1).astype(np.float32)
    config = _strong_geometry(rotate={"probability": 1.0, "max_degrees": 20.0, "max_degrees_out_of_plane": 5.0},
                              elastic={"probability": 1.0, "in_plane_only": False})
    out_image, out_label = augment_3d(image, label, config, seed=11)
    out_image, out_label = out_image.numpy(), out_label.numpy()
    assert out_label.dtype == np.uint8 and out_label.shape == label.shape
    assert set(np.unique(out_label).tolist()) <= set(np.unique(label).tolist())
    source = tuple(np.clip(np.round(out_image[..., axis]).astype(int), 0, label.shape[axis] - 1) for axis in range(3))
    assert np.mean(label[source] == out_label) > 0.995
    assert np.mean(out_label != label) > 0.05


def test_flips_are_exact(real_labels: np.ndarray) -> None:
    label = real_labels[10]
    image = label[..., None].astype(np.float32)
    config = {**GEOMETRY_OFF, **INTENSITY_OFF, "flip": {"enabled": True, "probability": 1.0, "axes": ["x"]}}
    out_image, out_label = augment_2d(image, label, config, seed=3)
    np.testing.assert_array_equal(out_label.numpy(), label[:, ::-1])
    np.testing.assert_array_equal(out_image.numpy(), image[:, ::-1])
    config["flip"]["axes"] = ["z"]
    volume = real_labels[:6, :20, :30]
    out_image, out_label = augment_3d(volume[..., None].astype(np.float32), volume, config, seed=3)
    np.testing.assert_array_equal(out_label.numpy(), volume[::-1])


def test_zero_magnitude_is_identity() -> None:
    rng = np.random.default_rng(0)
    image2 = rng.normal(size=(40, 56, 2)).astype(np.float32)
    label2 = rng.integers(0, 4, size=(40, 56)).astype(np.int32)
    config = {
        **INTENSITY_OFF,
        "flip": {"enabled": False},
        "rotate": {"probability": 1.0, "max_degrees": 0.0},
        "scale": {"probability": 1.0, "range": [1.0, 1.0]},
        "shift": {"probability": 1.0, "max_fraction": 0.0},
        "elastic": {"probability": 1.0, "magnitude_voxels": 0.0},
    }
    out_image, out_label = augment_2d(image2, label2, config, seed=5)
    np.testing.assert_array_equal(out_image.numpy(), image2)
    np.testing.assert_array_equal(out_label.numpy(), label2)
    image3 = rng.normal(size=(6, 20, 24, 1)).astype(np.float32)
    label3 = rng.integers(0, 3, size=(6, 20, 24)).astype(np.uint8)
    out_image, out_label = augment_3d(image3, label3, config, seed=5)
    np.testing.assert_array_equal(out_image.numpy(), image3)
    np.testing.assert_array_equal(out_label.numpy(), label3)
    out_image, out_label = augment_2d(image2, label2, {"enabled": False}, seed=1)
    np.testing.assert_array_equal(out_image.numpy(), image2)


def test_reproducible_with_seed_and_in_dataset_map(real_labels: np.ndarray) -> None:
    label = real_labels[12]
    image = np.stack([label.astype(np.float32) / 100.0] * 2, axis=-1)
    config = {name: {"probability": 1.0} for name in DEFAULT_AUGMENTATION if name != "enabled"}
    a = augment_2d(image, label, config, seed=(1, 2))
    b = augment_2d(image, label, config, seed=(1, 2))
    c = augment_2d(image, label, config, seed=(1, 3))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())

    dataset = tf.data.Dataset.from_tensor_slices((image[None].repeat(3, 0), label[None].repeat(3, 0)))
    dataset = dataset.enumerate().map(
        lambda i, sample: augment_2d(sample[0], sample[1], config, seed=tf.stack([tf.constant(1, tf.int64), i + 2])),
        num_parallel_calls=2, deterministic=True)
    results = list(dataset.as_numpy_iterator())
    assert len(results) == 3 and results[0][0].shape == image.shape
    np.testing.assert_allclose(results[0][0], a[0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(results[0][1], a[1].numpy())
    np.testing.assert_array_equal(results[1][1], c[1].numpy())


def test_intensity_only_changes_image(real_labels: np.ndarray) -> None:
    label = real_labels[15]
    image = (label[..., None] / 50.0).astype(np.float32)
    config = {**GEOMETRY_OFF, **{name: {"probability": 1.0} for name in INTENSITY_OFF}}
    out_image, out_label = augment_2d(image, label, config, seed=9)
    np.testing.assert_array_equal(out_label.numpy(), label)
    assert not np.allclose(out_image.numpy(), image)
    gamma_only = {**GEOMETRY_OFF, **INTENSITY_OFF, "gamma": {"enabled": True, "probability": 1.0, "range": [2.0, 2.0]}}
    out_image, _ = augment_2d(image, label, gamma_only, seed=9)
    low, high = image.min(), image.max()
    expected = ((image - low) / (high - low)) ** 2 * (high - low) + low
    np.testing.assert_allclose(out_image.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_config_validation() -> None:
    assert resolve_config(None) == DEFAULT_AUGMENTATION
    merged = resolve_config({"rotate": {"max_degrees": 5}})
    assert merged["rotate"]["max_degrees"] == 5.0 and merged["rotate"]["probability"] == 0.3
    with pytest.raises(ValueError, match="unknown augmentation 'rotation'"):
        resolve_config({"rotation": {}})
    with pytest.raises(ValueError, match="rotate.degrees"):
        resolve_config({"rotate": {"degrees": 3}})
    with pytest.raises(ValueError, match="probability"):
        resolve_config({"noise": {"probability": 2}})
    with pytest.raises(ValueError, match="scale.range"):
        resolve_config({"scale": {"range": [1.2, 0.8]}})
    with pytest.raises(ValueError, match="rank 3"):
        augment_2d(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.int32))
    with pytest.raises(TypeError, match="integer"):
        augment_2d(np.zeros((8, 8, 1), np.float32), np.zeros((8, 8), np.float32))
