"""The Volume helpers shared by the engine's modules."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MedSegAILib.core.image import present_values


def test_present_values_equals_numpy_unique_on_real_labels(ct_small_labels) -> None:
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_small_labels)))
    assert labels.dtype == np.uint8
    expected = {int(v) for v in np.unique(labels)}
    assert len(expected) > 5
    assert present_values(labels) == expected
    assert present_values(labels[:, ::3, ::-2]) == {int(v) for v in np.unique(labels[:, ::3, ::-2])}
    assert present_values(labels.astype(np.int16) - 1) == {v - 1 for v in expected}
    assert present_values(labels == 5) == {0, 1}


def test_present_values_finds_single_voxels_the_sample_misses() -> None:
    rng = np.random.default_rng(0)
    for unseen in (1, 3, 20):  # a few values the strided sample misses, and more than it checks one by one
        labels = np.zeros((7, 30, 41), dtype=np.uint8)
        values = rng.choice(np.arange(1, 40), size=unseen, replace=False)
        places = rng.choice(np.arange(1, labels.size // 64), size=unseen, replace=False) * 64 - 1
        labels.reshape(-1)[places] = values  # one voxel each, off the every-64th-voxel sample
        assert present_values(labels) == {0, *map(int, values)} == {int(v) for v in np.unique(labels)}
    assert present_values(np.zeros((0, 3, 3), dtype=np.uint8)) == set()
    assert present_values(np.full((2, 2, 2), 9, dtype=np.uint8)) == {9}
