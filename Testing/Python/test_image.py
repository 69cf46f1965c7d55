"""The Volume helpers shared by the engine's modules."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MedSegAILib.image import present_values


def test_present_values_equals_numpy_unique_on_real_labels(ct_small_labels) -> None:
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_small_labels)))
    assert labels.dtype == np.uint8
    expected = {int(v) for v in np.unique(labels)}
    assert len(expected) > 5
    assert present_values(labels) == expected
    assert present_values(labels[:, ::3, ::-2]) == {int(v) for v in np.unique(labels[:, ::3, ::-2])}
    assert present_values(labels.astype(np.int16) - 1) == {v - 1 for v in expected}
    assert present_values(labels == 5) == {0, 1}
