"""End-to-end inference with numpy "networks" on the real CT: exact labels on the input grid."""

from __future__ import annotations

import tracemalloc
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import SimpleITK as sitk
from MedSegAILib.inference import segment as inference
from MedSegAILib.inference.components import StreamedComponents
from MedSegAILib.core.errors import CancelledError, MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.inference.segment import (
    SegmentOptions,
    _RowMapper,
    argmax_labels,
    decide_labels,
    segment_volumes,
    upsample_argmax,
)
from MedSegAILib.inference.postprocessing import postprocess
from MedSegAILib.inference.preprocessing import resample_axis_aligned
from scipy import ndimage

THRESHOLD_HU = 200.0
SLOPE = 0.05


def make_card(
    mode: str = "2d",
    patch: tuple[int, ...] = (32, 32),
    *,
    axis: str = "axial",
    target_spacing=(None, None, None),
    normalization: dict | None = None,
    channels: int = 1,
    classes: int = 2,
    batch_size: int = 4,
    postprocessing: dict | None = None,
) -> types.SimpleNamespace:
    """A stand-in for MedSegAILib.model.modelcard.ModelCard with exactly the attributes inference reads."""
    spec = normalization or {"method": "none"}
    return types.SimpleNamespace(
        channels=[types.SimpleNamespace(name=f"ch{c}", normalization=spec) for c in range(channels)],
        labels=[
            types.SimpleNamespace(name="bone" if v == 1 else f"label{v}", value=v, color=(1.0, 1.0, 1.0))
            for v in range(1, classes)
        ],
        num_classes=classes,
        spatial=types.SimpleNamespace(
            mode=mode, axis=axis, patch_size=patch, target_spacing=target_spacing, divisible_by=4, batch_size=batch_size
        ),
        postprocessing=dict(postprocessing or {}),
    )


def threshold_network(threshold: float = THRESHOLD_HU, slope: float = SLOPE, classes: int = 2):
    """Class 1 probability = sigmoid((x - threshold) * slope) of channel 0; class 0 = the rest."""

    def predict(batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.flags.c_contiguous
        x = batch[..., 0]
        with np.errstate(over="ignore"):
            foreground = (1.0 / (1.0 + np.exp(-(x - np.float32(threshold)) * np.float32(slope)))).astype(np.float32)
        out = np.zeros(batch.shape[:-1] + (classes,), dtype=np.float32)
        out[..., 0] = 1.0 - foreground
        out[..., 1] = foreground
        return out

    return predict


@pytest.fixture(scope="module")
def ct(ct_small) -> Volume:
    volume = Volume.from_sitk(sitk.ReadImage(str(ct_small)))
    assert volume.array.shape == (30, 101, 122)
    return volume


def assert_same_grid(result: Volume, reference: Volume) -> None:
    assert result.array.shape == reference.array.shape
    assert result.array.dtype == np.uint8
    assert result.spacing == reference.spacing
    assert result.origin == reference.origin
    np.testing.assert_array_equal(result.direction, reference.direction)


@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
@pytest.mark.parametrize(
    "mode,patch",
    [("2d", (32, 32)), ("2d", (128, 128)), ("3d", (16, 32, 32)), ("3d", (32, 128, 128))],
    ids=["2d-slices-larger-than-patch", "2d-padded", "3d-windows", "3d-padded"],
)
def test_threshold_network_gives_the_numpy_mask_exactly(ct: Volume, mode: str, patch, overlap: float) -> None:
    timings: dict[str, float] = {}
    result = segment_volumes([ct], make_card(mode, patch), threshold_network(), SegmentOptions(overlap=overlap), timings=timings)
    assert_same_grid(result, ct)
    np.testing.assert_array_equal(result.array, (ct.array > THRESHOLD_HU).astype(np.uint8))
    assert set(timings) == {"preprocess", "model", "stitch", "postprocess"}
    assert all(value >= 0 for value in timings.values())


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_2d_along_other_axes(ct: Volume, axis: str) -> None:
    result = segment_volumes([ct], make_card("2d", (32, 32), axis=axis), threshold_network(), SegmentOptions(tta=True))
    np.testing.assert_array_equal(result.array, (ct.array > THRESHOLD_HU).astype(np.uint8))


def reoriented_copies(ct_small) -> list[sitk.Image]:
    image = sitk.ReadImage(str(ct_small))
    flipped = sitk.Flip(image, [True, False, False])  # x now points to L: a left-right-flipped file
    permuted = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [False, True, True])  # sagittal-like storage
    oblique = sitk.Image(image)
    tilt = sitk.VersorTransform((0.0, 0.0, 1.0), np.deg2rad(20.0)).GetMatrix()
    oblique.SetDirection(tuple((np.array(tilt).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    return [flipped, permuted, oblique]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["flipped", "permuted", "oblique"])
@pytest.mark.parametrize("mode,patch", [("2d", (32, 32)), ("3d", (16, 32, 32))])
def test_flipped_permuted_and_oblique_inputs_keep_their_grid(ct_small, index: int, mode: str, patch) -> None:
    volume = Volume.from_sitk(reoriented_copies(ct_small)[index])
    result = segment_volumes([volume], make_card(mode, patch), threshold_network())
    assert_same_grid(result, volume)
    np.testing.assert_array_equal(result.array, (volume.array > THRESHOLD_HU).astype(np.uint8))


def smoothing_network(batch: np.ndarray) -> np.ndarray:
    """Not point-wise: in-plane 5x5 mean, then a threshold. Its output depends on the slicing."""
    smooth = ndimage.uniform_filter(batch[..., 0], size=(1, 5, 5), mode="nearest")
    foreground = (smooth > THRESHOLD_HU).astype(np.float32)
    return np.stack([1.0 - foreground, foreground], axis=-1)


def test_network_sees_the_same_canonical_slices_whatever_the_storage(ct_small) -> None:
    image = sitk.ReadImage(str(ct_small))
    card = make_card("2d", (32, 32))
    reference = segment_volumes([Volume.from_sitk(image)], card, smoothing_network)
    reference_image = Volume.from_sitk(image).with_array(reference.array).to_sitk()
    reference_image.CopyInformation(image)
    permuted = sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [False, True, True])
    result = segment_volumes([Volume.from_sitk(permuted)], card, smoothing_network)
    moved = sitk.Flip(sitk.PermuteAxes(reference_image, [2, 0, 1]), [False, True, True])
    np.testing.assert_array_equal(result.array, sitk.GetArrayFromImage(moved))
    # and it really is a different result from slicing the stored array naively
    naive = smoothing_network(np.ascontiguousarray(Volume.from_sitk(permuted).array[..., None]).astype(np.float32))
    assert not np.array_equal(np.argmax(naive, -1).astype(np.uint8), result.array)


def test_ct_normalisation_and_two_channels_in_order(ct: Volume) -> None:
    card = make_card("2d", (64, 64), normalization={"method": "ct", "clip": [-200, 300]}, channels=2)
    # channel 0 normalised: (HU + 200) / 500; 200.5 HU -> 0.801; channel 1 is ignored unless swapped
    predict = threshold_network(threshold=0.801, slope=50.0)
    other = ct.with_array(np.full_like(ct.array, -1000))
    result = segment_volumes([ct, other], card, predict)
    np.testing.assert_array_equal(result.array, (ct.array > THRESHOLD_HU).astype(np.uint8))
    swapped = segment_volumes([other, ct], card, predict)
    assert not swapped.array.any()


def test_threshold_method_and_postprocessing_overrides(ct: Volume) -> None:
    card = make_card("3d", (16, 32, 32), postprocessing={"method": "threshold", "thresholds": {"bone": 0.9}})
    result = segment_volumes([ct], card, threshold_network())
    cutoff = THRESHOLD_HU + np.log(9.0) / SLOPE  # sigmoid(...) >= 0.9
    np.testing.assert_array_equal(result.array, (ct.array >= cutoff).astype(np.uint8))
    overridden = segment_volumes(
        [ct], card, threshold_network(), SegmentOptions(postprocessing={"method": "argmax", "largest_component": True})
    )
    mask = ct.array > THRESHOLD_HU
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    assert count > 1
    np.testing.assert_array_equal(overridden.array, (components == largest).astype(np.uint8))


@pytest.mark.parametrize("mode, axis", [("2d", "coronal"), ("2d", "axial"), ("3d", "axial")])
def test_postprocessing_while_streaming_equals_postprocessing_the_result(ct: Volume, mode: str, axis: str) -> None:
    """Islands, largest component and holes gathered during inference give what post-processing
    the finished label map gives (the bone of the real CT has many components and holes)."""
    config = {"largest_component": True, "fill_holes": True, "min_island_mm3": 30}
    patch = (32, 32) if mode == "2d" else (16, 32, 32)
    plain = segment_volumes([ct], make_card(mode, patch, axis=axis), threshold_network())
    mask = plain.array == 1
    assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] > 1
    expected = postprocess(plain.array, ct.spacing, config, {1: "bone"})
    assert not np.array_equal(expected, plain.array)
    result = segment_volumes([ct], make_card(mode, patch, axis=axis, postprocessing=config), threshold_network())
    np.testing.assert_array_equal(result.array, expected)


def test_decide_labels_threshold_picks_most_probable_passing_label() -> None:
    labels = [types.SimpleNamespace(name=n, value=v) for n, v in (("a", 1), ("b", 2))]
    decide = decide_labels({"method": "threshold", "thresholds": {"a": 0.3, "b": 0.6}}, labels, 3)
    probabilities = np.array([[0.2, 0.35, 0.45], [0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [0.0, 0.4, 0.6]], np.float32)
    np.testing.assert_array_equal(decide(probabilities), [1, 2, 0, 2])
    with pytest.raises(MedSegAIInputError, match="unknown label"):
        decide_labels({"method": "threshold", "thresholds": {"c": 0.5}}, labels, 3)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize(
    "mode,patch,target",
    [("2d", (64, 64), (2.0, 2.0, None)), ("2d", (32, 32), (4.5, 4.0, 1.0)), ("3d", (16, 32, 32), (2.5, 2.5, 4.0))],
)
def test_target_spacing_resampling_path_maps_back_to_the_input_grid(ct_small, mode: str, patch, target) -> None:
    volume = Volume.from_sitk(reoriented_copies(ct_small)[1])  # permuted storage, to exercise both
    body = -300.0  # the body outline: a large structure that survives resampling
    result = segment_volumes([volume], make_card(mode, patch, target_spacing=target), threshold_network(threshold=body))
    assert_same_grid(result, volume)
    expected = volume.array > body
    assert dice(result.array.astype(bool), expected) > 0.95
    assert not np.array_equal(result.array.astype(bool), expected)  # resampling really happened


def test_progress_and_cancellation(ct: Volume) -> None:
    events: list[tuple[str, int, int]] = []
    segment_volumes([ct], make_card("2d", (32, 32)), threshold_network(), progress=lambda s, d, t, m="": events.append((s, d, t)))
    stages = [stage for stage, _, _ in events]
    assert stages[0] == "preprocess" and stages[-1] == "postprocess"
    assert {"preprocess", "model", "stitch", "postprocess"} <= set(stages)
    model = [(d, t) for s, d, t in events if s == "model"]
    assert model[-1][0] == model[-1][1] and [d for d, _ in model] == sorted(d for d, _ in model)

    calls = {"predict": 0, "polls": 0}

    def counting(batch: np.ndarray) -> np.ndarray:
        calls["predict"] += 1
        return threshold_network()(batch)

    def cancel_after_three() -> bool:
        calls["polls"] += 1
        return calls["polls"] > 3

    for mode, patch in (("2d", (32, 32)), ("3d", (16, 32, 32))):
        calls.update(predict=0, polls=0)
        with pytest.raises(CancelledError):
            segment_volumes([ct], make_card(mode, patch, batch_size=1), counting, should_cancel=cancel_after_three)
        assert 0 < calls["predict"] <= 3


def test_input_problems_are_reported(ct: Volume) -> None:
    with pytest.raises(MedSegAIInputError, match="2 input channel"):
        segment_volumes([ct], make_card(channels=2), threshold_network())
    small = ct.with_array(ct.array)
    small.array = ct.array[:10]
    with pytest.raises(MedSegAIInputError, match="shape"):
        segment_volumes([ct, small], make_card(channels=2), threshold_network())
    with pytest.raises(ValueError, match="overlap"):
        SegmentOptions(overlap=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        SegmentOptions(batch_size=0)


@pytest.mark.parametrize("mode,patch", [("2d", (64, 64)), ("3d", (16, 64, 64))])
def test_peak_memory_stays_far_below_classes_times_volume(shared_data, monkeypatch, mode: str, patch) -> None:
    """8 classes: a float32 (classes x volume) array would be 8 x 4 = 32 bytes per voxel.

    The streaming working set is capped at 4 MiB here (64 MiB by default) so that a small test
    volume shows what a big one does: memory grows with the volume, not with volume x classes.
    """
    monkeypatch.setattr(inference, "STREAM_BUDGET_BYTES", 4 * 2**20)
    base = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "ct-abdomen" / "example_ct.nii.gz"))).astype(np.int16)
    classes = 8
    card = make_card(mode, patch, classes=classes, batch_size=2)
    peaks = {}
    for repeats in (1, 2):
        array = np.ascontiguousarray(np.tile(base, (repeats, 1, 1)))  # 112 or 224 slices of 101 x 122
        volume = Volume(array, spacing=(3.0, 3.0, 3.0), direction=np.diag([-1.0, -1.0, 1.0]))
        tracemalloc.start()
        result = segment_volumes([volume], card, threshold_network(classes=classes))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        np.testing.assert_array_equal(result.array, (array > THRESHOLD_HU).astype(np.uint8))
        peaks[repeats] = peak
        print(f"{mode}: {array.shape} peak {peak / 2**20:.1f} MiB")
    whole = classes * array.size * 4
    assert peaks[2] < 0.5 * whole, f"peak {peaks[2] / 2**20:.1f} MiB vs classes x volume {whole / 2**20:.1f} MiB"
    # doubling the volume adds far less than classes x (added volume) x 4 bytes
    added = classes * base.size * 4
    assert peaks[2] - peaks[1] < 0.5 * added


def test_3d_with_tta_and_odd_batches(ct: Volume) -> None:
    result = segment_volumes([ct], make_card("3d", (8, 32, 32)), threshold_network(), SegmentOptions(tta=True, batch_size=3))
    np.testing.assert_array_equal(result.array, (ct.array > THRESHOLD_HU).astype(np.uint8))


def test_streamed_mapping_back_equals_whole_volume_interpolation() -> None:
    """Rows pushed in uneven pieces give exactly argmax(linear resampling of the whole array), and
    the label boxes gathered on the way are those of the finished map."""
    rng = np.random.default_rng(3)
    logits = ndimage.gaussian_filter(rng.normal(size=(13, 20, 24, 4)), sigma=(1, 2, 2, 0)) * 20
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = (probabilities / probabilities.sum(-1, keepdims=True)).astype(np.float32)
    out_shape = (31, 17, 50)
    expected = np.argmax(resample_axis_aligned(probabilities, out_shape, order=1, axes=(0, 1, 2)), axis=-1)
    out = np.full(out_shape, 255, dtype=np.uint8)
    components = StreamedComponents(out, 3)
    mapper = _RowMapper(13, components, argmax_labels, 4)
    for first, stop in ((0, 1), (1, 5), (5, 6), (6, 13)):
        mapper.push(first, probabilities[first:stop].copy())
    mapper.check_complete()
    np.testing.assert_array_equal(out, expected)
    assert components.boxes() == ndimage.find_objects(out, max_label=3)
    with pytest.raises(ValueError, match="in order"):
        _RowMapper(13, StreamedComponents(out, 3), argmax_labels, 4).push(2, probabilities[2:4].copy())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12), st.integers(1, 5)),
    out=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    smooth=st.sampled_from([0.0, 1.0, 3.0]),
    levels=st.sampled_from([0, 2, 3]),
)
def test_upsample_argmax_equals_argmax_of_dense_resampling(seed, shape, out, smooth, levels) -> None:
    """Border-only interpolation gives exactly the dense path's labels: growing, shrinking or equal
    sizes, smooth or speckled maps, and exact ties (probabilities quantised to a few levels)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape)
    if smooth:
        logits = ndimage.gaussian_filter(logits, sigma=(0, smooth, smooth, 0)) * 10
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    if levels:
        probabilities = np.round(probabilities * levels) / levels  # many exact ties
    probabilities = probabilities.astype(np.float32)
    dense = argmax_labels(resample_axis_aligned(probabilities, out, order=1, axes=(1, 2)))
    np.testing.assert_array_equal(upsample_argmax(probabilities, out), dense)


def test_upsample_argmax_keeps_no_reference_to_the_probabilities() -> None:
    """The slab's probabilities are freed when the caller drops them, without waiting for the
    cyclic garbage collector (a self-referencing closure once kept every slab alive)."""
    import gc
    import weakref

    rng = np.random.default_rng(5)
    slab = ndimage.gaussian_filter(rng.random((4, 20, 24, 3)), sigma=(0, 2, 2, 0)).astype(np.float32)
    alive = weakref.ref(slab)
    gc.disable()
    try:
        labels = upsample_argmax(slab[1:3], (41, 37))  # a view, with label borders to interpolate
        assert labels.shape == (2, 41, 37)
        del slab
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("failing", ["normalize", "upsample_argmax"], ids=["prefetch-thread", "mapping-thread"])
def test_errors_on_worker_threads_reach_the_caller_and_leave_no_thread(ct: Volume, monkeypatch, failing: str) -> None:
    import threading

    monkeypatch.setattr(inference, "STREAM_BUDGET_BYTES", 256 * 1024)  # several slabs
    original = getattr(inference, failing)
    calls = {"n": 0}

    def fails_on_third_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError(f"{failing} broke")
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, failing, fails_on_third_call)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match=f"{failing} broke"):
        segment_volumes([ct], make_card("2d", (32, 32)), threshold_network())
    assert {t.name for t in threading.enumerate()} - before == set()
    monkeypatch.setattr(inference, failing, original)
    expected = (np.asarray(ct.array, dtype=np.float32) > THRESHOLD_HU).astype(np.uint8)
    np.testing.assert_array_equal(segment_volumes([ct], make_card("2d", (32, 32)), threshold_network()).array, expected)


@pytest.mark.parametrize(("device", "expected"), [("cpu", 8), ("gpu", 16)])
def test_cpu_runs_cap_the_windows_per_call(ct_small, device: str, expected: int) -> None:
    """The shipped CT card asks for 16 windows per call; on a CPU the pipeline sends 8 (same speed, less memory)."""
    from MedSegAILib.inference.pipeline import segment_case
    from MedSegAILib.io.imageio import read_volume
    from MedSegAILib.model.modelcard import find_model

    card = find_model("ct-abdomen-organs")
    assert card.spatial.batch_size == 16 and inference.cpu_batch_size(card) == 8
    calls: list[int] = []

    class Recorder:
        def __init__(self) -> None:
            self.device = device

        def predict(self, batch: np.ndarray) -> np.ndarray:
            calls.append(batch.shape[0])
            probabilities = np.zeros(batch.shape[:-1] + (card.num_classes,), np.float32)
            probabilities[..., 0] = 1.0
            return probabilities

    image = read_volume(ct_small)
    labels, _ = segment_case([image], card, predictor=Recorder())
    assert labels.same_grid(image) and not labels.array.any()
    assert max(calls) == expected and sum(calls) == image.array.shape[0]  # one window per axial slice
    calls.clear()
    segment_case([image], card, predictor=Recorder(), options=inference.SegmentOptions(batch_size=3))
    assert max(calls) == 3  # the user's choice is kept
