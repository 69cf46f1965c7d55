"""Training input (medsegai_training.data): preprocessing identical to the engine's, label mapping,
fitted normalisation, the .npy cache, foreground oversampling and the tf.data pipeline — on real
brain MRI and abdomen CT from ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from MedSegAILib.data import dataset as ds
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.io.imageio import read_volume
from MedSegAILib.inference.segment import SegmentOptions, segment_volumes
from MedSegAILib.model.modelcard import ModelCard
from medsegai_training import data
from medsegai_training.config import config_from_dict


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brain_study(shared_data: Path) -> Path:
    return shared_data / "mr-brain-tumor" / "PGBM-001" / "1991-11-19"


@pytest.fixture(scope="module")
def brain_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four NRRD studies with T1post and FLAIR... (FLAIR missing in one: T1post + T1prereg)."""
    root = tmp_path_factory.mktemp("pipeline") / "brain"
    for study in sorted((shared_data / "mr-brain-tumor").glob("PGBM-*/*")):
        if not (study / "T1post.nrrd").is_file():
            continue
        t1 = read_volume(study / "T1post.nrrd")
        pre = read_volume(study / "T1prereg.nrrd")
        label = t1.with_array(read_volume(study / "MaskTumor.nrrd").array)
        ds.add_case(root, [t1, t1.with_array(pre.array)], label, ["T1post", "T1prereg"], {"tumor": 1},
                    patient_key=study.parent.name)
    return root


def _config(**changes: object) -> object:
    recipe = {
        "model": {"builder": "unet_2d", "depth": 3},
        "spatial": {"mode": "2d", "axis": "axial", "patch_size": [64, 64], "target_spacing": [2.5, 2.5, None],
                    "divisible_by": 8},
        "channels": [{"name": "T1post", "normalization": {"method": "zscore", "nonzero": True}}],
    }
    recipe.update(changes)
    return config_from_dict(recipe)


class _Recorder:
    """A fake network that records what the engine feeds it and predicts background."""

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.batches: list[np.ndarray] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(np.array(batch, copy=True))
        out = np.zeros(batch.shape[:-1] + (self.classes,), np.float32)
        out[..., 0] = 1.0
        return out


def _card(channels: list[dict], spatial: dict, folder: Path) -> ModelCard:
    return ModelCard.from_dict(
        {"schema_version": 1, "id": "recorder", "name": "recorder", "version": "1.0.0",
         "channels": channels, "labels": [{"name": "tumor", "value": 1, "color": [1, 0, 0]}],
         "spatial": spatial, "files": {"onnx": "model.onnx"}},
        folder,
    )


def _flip_x(volume: Volume) -> Volume:
    """The same image stored with the x axis reversed (direction column 0 negated)."""
    direction = volume.direction.copy()
    direction[:, 0] *= -1
    last = np.array(volume.origin) + volume.direction @ (np.array(volume.spacing) * np.array([volume.shape[2] - 1, 0, 0]))
    return Volume(np.ascontiguousarray(volume.array[..., ::-1]), volume.spacing, tuple(last), direction)


# ----------------------------------------------------------------------------------------------
# preprocessing == engine
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flipped", [False, True])
def test_2d_preprocessing_equals_what_the_engine_feeds_the_network(brain_study: Path, tmp_path: Path, flipped: bool) -> None:
    t1 = original_t1 = read_volume(brain_study / "T1post.nrrd")
    flair = original_flair = t1.with_array(read_volume(brain_study / "FLAIR.nrrd").array)
    if flipped:
        t1, flair = _flip_x(t1), _flip_x(flair)
    specs = [{"method": "zscore", "nonzero": True}, {"method": "percentile", "lower": 1, "upper": 99}]
    # The recipe's z spacing must be ignored in 2D, as the engine never resamples across slices.
    spatial = {"mode": "2d", "axis": "axial", "target_spacing": [2.5, 2.5, 3.0], "divisible_by": 8}
    image, spacing = data.preprocess_volumes([t1, flair], specs, spatial)
    assert image.dtype == np.float32 and image.shape == (25, 88, 72, 2)
    assert spacing[2] == pytest.approx(t1.spacing[2]) and spacing[0] == pytest.approx(260 * 0.6875 / 72)

    card_spatial = {**spatial, "patch_size": [88, 72], "batch_size": 5}  # one window = one whole slice
    card = _card([{"name": "T1post", "normalization": specs[0]}, {"name": "FLAIR", "normalization": specs[1]}],
                 card_spatial, tmp_path)
    recorder = _Recorder(2)
    segment_volumes([t1, flair], card, recorder, SegmentOptions(overlap=0.0))
    fed = np.concatenate(recorder.batches)
    assert fed.shape == image.shape
    np.testing.assert_allclose(fed, image, rtol=0, atol=1e-6)
    if flipped:  # the canonical view undoes the flip: same network input as the unflipped study
        original, _ = data.preprocess_volumes([original_t1, original_flair], specs, spatial)
        np.testing.assert_allclose(original, image, atol=1e-5)


def test_3d_preprocessing_equals_what_the_engine_feeds_the_network(brain_study: Path, tmp_path: Path) -> None:
    t1 = read_volume(brain_study / "T1post.nrrd")
    spec = {"method": "zscore", "mean": 300.0, "std": 250.0}
    spatial = {"mode": "3d", "target_spacing": [3.0, 3.0, None], "divisible_by": 1}
    image, _ = data.preprocess_volumes([t1], [spec], spatial)
    assert image.shape == (25, 73, 60, 1)
    card = _card([{"name": "T1post", "normalization": spec}], {**spatial, "patch_size": list(image.shape[:3])}, tmp_path)
    recorder = _Recorder(2)
    segment_volumes([t1], card, recorder, SegmentOptions(overlap=0.0))
    assert len(recorder.batches) == 1
    np.testing.assert_allclose(recorder.batches[0][0], image, rtol=0, atol=1e-6)


def test_label_preprocessing_maps_a_subset_of_totalsegmentator_ids(
    shared_data: Path, tmp_path: Path, total_ct_label_names: dict[int, str]
) -> None:
    ct = read_volume(shared_data / "ct-abdomen" / "example_ct_sm.nii.gz")
    seg = read_volume(shared_data / "ct-abdomen" / "example_seg.nii.gz")
    dataset_labels = {"background": 0, **{name: value for value, name in total_ct_label_names.items()}}
    config = _config(
        channels=[{"name": "CT", "normalization": {"method": "ct", "clip": [-200, 300], "fit": True}}],
        labels=[{"name": "liver", "value": 1, "source": [5]}, {"name": "spleen", "value": 2, "source": [1],
                 "color": [0.1, 0.2, 0.3]}],
        spatial={"mode": "2d", "axis": "axial", "patch_size": [64, 64], "target_spacing": [None, None, None]},
    )
    plan = data.make_data_plan(config, ["CT"], dataset_labels)
    assert [label["name"] for label in plan.labels] == ["liver", "spleen"]
    assert plan.labels[1]["color"] == [0.1, 0.2, 0.3] and len(plan.labels[0]["color"]) == 3
    mapped = data.preprocess_label(seg.with_array(seg.array.astype(np.uint8)), plan.lookup, plan.spatial)
    raw = np.asarray(seg.array)
    assert set(np.unique(mapped)) == {0, 1, 2}
    assert (mapped == 1).sum() == (raw == 5).sum() > 1000
    assert (mapped == 2).sum() == (raw == 1).sum() > 100
    assert (mapped == 0).sum() == raw.size - (raw == 5).sum() - (raw == 1).sum()  # others -> background

    channels = data.fit_normalization(lambda case_id: ([ct], seg), ["case_0001"], plan)
    spec = channels[0]["normalization"]
    assert "fit" not in spec
    inside = np.clip(np.asarray(ct.array, np.float64), -200, 300)[(raw == 5) | (raw == 1)]
    assert spec["mean"] == pytest.approx(inside.mean(), abs=1e-3) and spec["std"] == pytest.approx(inside.std(), rel=1e-4)
    assert 0 < spec["mean"] < 200  # soft tissue, not air: the statistics come from the organs

    with pytest.raises(MedSegAIInputError, match="source"):
        data.make_data_plan(_config(channels=["CT"], labels=[{"name": "x", "value": 1, "source": [300]}]), ["CT"],
                            dataset_labels)
    with pytest.raises(MedSegAIInputError, match="channel 'T1post'"):
        data.make_data_plan(_config(), ["CT"], dataset_labels)


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------


def test_npy_cache_is_used_and_keyed_by_settings(brain_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = ds.load_dataset(brain_dataset)
    config = _config(channels=[{"name": "T1prereg", "normalization": {"method": "zscore", "nonzero": True}}])
    plan = data.make_data_plan(config, info.channels, info.labels)
    assert plan.channel_indices == [1]
    cache = tmp_path / "cache"
    first = data.load_cases(info, ["case_0001", "case_0002"], plan, cache)
    assert len(list(cache.glob("*.image.npy"))) == 2 and len(list(cache.glob("*.label.npy"))) == 2
    images, label = ds.read_case(info, "case_0001")
    expected, _ = data.preprocess_volumes([images[1]], plan.normalizations, plan.spatial)
    np.testing.assert_array_equal(first[0].image, expected)
    assert first[0].label.dtype == np.uint8 and first[0].label.shape == expected.shape[:3]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("read_case must not be called when the cache is complete")

    monkeypatch.setattr(ds, "read_case", refuse)
    second = data.load_cases(info, ["case_0001", "case_0002"], plan, cache)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert a.spacing == b.spacing
    monkeypatch.undo()

    other = data.make_data_plan(
        _config(channels=[{"name": "T1prereg", "normalization": {"method": "percentile"}}]), info.channels, info.labels)
    assert other.fingerprint() != plan.fingerprint()
    data.load_cases(info, ["case_0001"], other, cache)
    assert len(list(cache.glob("*.image.npy"))) == 3  # a new entry, the old ones untouched


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brain_cases(brain_dataset: Path) -> tuple[list[data.PreprocessedCase], object]:
    info = ds.load_dataset(brain_dataset)
    config = _config()
    plan = data.make_data_plan(config, info.channels, info.labels)
    return data.load_cases(info, [c.id for c in info.cases], plan), config


def test_foreground_oversampling_at_least_a_third(brain_cases: tuple) -> None:
    cases, config = brain_cases
    tumour_share = np.mean([(c.label > 0).mean() for c in cases])
    assert tumour_share < 0.01  # tiny tumours: uniform sampling alone would rarely hit them
    sampler = data.Sampler(cases, config.spatial, 2, 1.0 / 3.0, seed=5)
    windows = [sampler.window(i) for i in range(600)]
    with_foreground = np.mean([label.any() for _, label, _ in windows])
    forced = [f for _, _, f in windows]
    assert sum(forced) == 200
    assert all(label.any() for _, label, f in windows if f)
    assert with_foreground >= 1.0 / 3.0
    image, label, _ = windows[2]
    assert image.shape == (64, 64, 1) and image.dtype == np.float32 and label.dtype == np.uint8
    # reproducible: the same index gives the same window
    again = data.Sampler(cases, config.spatial, 2, 1.0 / 3.0, seed=5).window(17)
    np.testing.assert_array_equal(again[0], windows[17][0])
    # image and label stay aligned: forced windows hold the bright enhancing rim of the tumour
    tumour = np.concatenate([img[..., 0][lab > 0] for img, lab, f in windows if f])
    assert tumour.mean() > 0.5  # z-scored units, brighter than the average brain voxel


def test_3d_patches_and_other_axes(brain_cases: tuple) -> None:
    cases, _ = brain_cases
    sampler = data.Sampler(cases, {"mode": "3d", "patch_size": [16, 32, 32]}, 2, 0.5, seed=1)
    assert not sampler.is_forced(0) and sampler.is_forced(1)
    image, label, forced = sampler.window(1)
    assert image.shape == (16, 32, 32, 1) and label.shape == (16, 32, 32) and forced and label.any()
    coronal = data.Sampler(cases, {"mode": "2d", "axis": "coronal", "patch_size": [32, 64]}, 2, 1.0, seed=1)
    image, label, _ = coronal.window(3)
    assert image.shape == (32, 64, 1) and label.any()
    view = data.slicing_view(cases[0].label, "sagittal")
    assert view.shape == (cases[0].label.shape[2], cases[0].label.shape[0], cases[0].label.shape[1])


def test_tf_dataset_batches_augmented_with_foreground(brain_cases: tuple) -> None:
    import tensorflow as tf

    cases, config = brain_cases
    sampler = data.Sampler(cases, config.spatial, 2, 1.0 / 3.0, seed=3)
    dataset = data.make_train_dataset(sampler, 6, augmentation=config.augmentation_config(), start=0)
    batches = list(dataset.take(10))
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    assert images.shape == (60, 64, 64, 1) and images.dtype == np.float32
    assert labels.shape == (60, 64, 64) and labels.dtype == np.int32
    assert set(np.unique(labels)) <= {0, 1}
    assert np.mean(labels.reshape(60, -1).any(axis=1)) >= 1.0 / 3.0
    # the same start index gives the same (augmented) stream: resumable and reproducible
    again = next(iter(data.make_train_dataset(sampler, 6, augmentation=config.augmentation_config(), start=0)))
    np.testing.assert_array_equal(again[0].numpy(), batches[0][0].numpy())
    # resuming at sample 6 continues with the second batch
    resumed = next(iter(data.make_train_dataset(sampler, 6, augmentation=config.augmentation_config(), start=6)))
    np.testing.assert_array_equal(resumed[1].numpy(), batches[1][1].numpy())
    # augmentation changes the windows (flips/rotations/intensity), never the label values
    plain = next(iter(data.make_train_dataset(sampler, 6, augmentation={"enabled": False})))
    assert not np.array_equal(plain[0].numpy(), batches[0][0].numpy())
    assert isinstance(dataset, tf.data.Dataset)


def test_dice_per_label_and_validation() -> None:
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[1:3, 2:6, 2:6] = 1
    prediction = truth.copy()
    prediction[1, 2:6, 2:6] = 0
    scores = data.dice_per_label(prediction, truth, 2)
    assert scores[0] == pytest.approx(2 * 16 / (16 + 32)) and np.isnan(scores[1])

    case = data.PreprocessedCase("case_x", np.zeros((4, 8, 8, 1), np.float32), truth, (1.0, 1.0, 1.0))

    def perfect(batch: np.ndarray) -> np.ndarray:
        return np.zeros(batch.shape[:-1] + (3,), np.float32) + np.array([1, 0, 0], np.float32)

    per_label, per_case = data.validation_dice(perfect, [case], {"mode": "2d", "axis": "axial", "patch_size": [8, 8]}, 2)
    assert per_label[0] == 0.0 and np.isnan(per_label[1]) and per_case["case_x"][0] == 0.0
