"""measurements: a sphere of known size, the real CT labels, degenerate segments, CSV/JSON output."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from MedSegAILib.io import imageio
from MedSegAILib.core.errors import MedSegAIInputError
from MedSegAILib.core.image import Volume
from MedSegAILib.report.measurements import CSV_COLUMNS, compute_measurements, max_feret_diameter, write_measurements


def _brute_force_diameter(points: np.ndarray) -> float:
    """Largest distance over all pairs, directly (blocks of 500 rows)."""
    blocks = range(0, len(points), 500)
    return max(float(np.sqrt(((points[s : s + 500, None] - points[None]) ** 2).sum(-1).max())) for s in blocks)


def _sphere(radius_mm: float, spacing: tuple[float, float, float], shape: int = 72) -> Volume:
    z, y, x = np.mgrid[:shape, :shape, :shape]
    centre = np.array([35.3, 36.1, 34.7])
    distance2 = sum(((axis - c) * s) ** 2 for axis, c, s in zip((x, y, z), centre, spacing))
    angle = np.deg2rad(30.0)
    direction = np.array([[np.cos(angle), 0.0, np.sin(angle)], [0.0, -1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]])
    return Volume((distance2 <= radius_mm**2).astype(np.uint8), spacing, (10.0, -5.0, 3.0), direction)


@pytest.mark.parametrize("radius", [12.0, 24.5])
def test_sphere_volume_and_diameter(radius: float) -> None:
    spacing = (0.8, 0.9, 1.2)
    row = compute_measurements(_sphere(radius, spacing), [{"name": "ball", "value": 1}])[0]
    true_ml = 4.0 / 3.0 * np.pi * radius**3 / 1000.0
    shell_ml = 4.0 * np.pi * radius**2 * max(spacing) / 1000.0  # one voxel layer
    assert row["volume_ml"] == pytest.approx(true_ml, abs=shell_ml / 2)
    assert abs(row["max_diameter_mm"] - 2 * radius) <= max(spacing)
    assert row["voxel_count"] * np.prod(spacing) / 1000.0 == pytest.approx(row["volume_ml"])


def test_real_ct_labels(ct_small_labels: Path) -> None:
    labels = imageio.read_volume(ct_small_labels)
    spec = [{"name": "liver", "value": 5}, {"name": "spleen", "value": 1}, {"name": "aorta", "value": 52}]
    rows = {row["name"]: row for row in compute_measurements(labels, spec)}
    voxel_ml = 3.0 * 3.0 * 3.0 / 1000.0
    for item in spec:
        row, mask = rows[item["name"]], labels.array == item["value"]
        assert row["value"] == item["value"]
        assert row["voxel_count"] == int(mask.sum()) > 0
        assert row["volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
        k, j, i = np.nonzero(mask)
        assert row["bbox_ijk"] == [[i.min(), j.min(), k.min()], [i.max(), j.max(), k.max()]]
        corners = np.array([[a, b, c] for a in (i.min(), i.max()) for b in (j.min(), j.max())
                            for c in (k.min(), k.max())])  # fmt: skip
        physical = corners @ (labels.direction @ np.diag(labels.spacing)).T + labels.origin
        np.testing.assert_allclose(row["bbox_lps_mm"], [physical.min(0), physical.max(0)])
    assert 500 < rows["liver"]["volume_ml"] < 3000  # an adult liver (partly in the field of view)
    assert 100 < rows["liver"]["max_diameter_mm"] < 300


def test_diameter_equals_brute_force_on_real_segment(ct_small_labels: Path) -> None:
    labels = imageio.read_volume(ct_small_labels)
    row = compute_measurements(labels, [{"name": "kidney_right", "value": 2}])[0]
    k, j, i = np.nonzero(labels.array == 2)
    assert len(k) > 2000  # enough boundary points for the convex-hull path
    points = np.stack([i, j, k], axis=1) @ (labels.direction @ np.diag(labels.spacing)).T + labels.origin
    brute = _brute_force_diameter(points)
    assert row["max_diameter_mm"] == pytest.approx(brute, rel=1e-9)


def test_degenerate_segments() -> None:
    array = np.zeros((10, 12, 14), np.uint8)
    array[4, 5, 6] = 1  # one voxel
    array[2, 3, 1:11] = 2  # a line along x: 10 voxels
    array[7, 2:8, 3:12] = 3  # a flat 6 x 9 patch
    volume = Volume(array, spacing=(0.5, 2.0, 3.0))
    spec = [{"name": n, "value": v} for n, v in [("dot", 1), ("line", 2), ("patch", 3), ("none", 4)]]
    rows = compute_measurements(volume, spec)
    assert rows[0]["max_diameter_mm"] == 0.0 and rows[0]["voxel_count"] == 1
    assert rows[1]["max_diameter_mm"] == pytest.approx(9 * 0.5)
    assert rows[2]["max_diameter_mm"] == pytest.approx(np.hypot(8 * 0.5, 5 * 2.0))
    assert rows[3] == {"name": "none", "value": 4, "voxel_count": 0, "volume_ml": 0.0, "max_diameter_mm": 0.0,
                       "bbox_ijk": None, "bbox_lps_mm": None}  # fmt: skip


def test_large_flat_segment_uses_hull_fallback() -> None:
    # > 2000 boundary points, all in one plane: qhull fails without joggling.
    array = np.zeros((3, 120, 120), np.uint8)
    array[1, 10:110, 5:115] = 1
    row = compute_measurements(Volume(array), [{"name": "sheet", "value": 1}])[0]
    assert row["max_diameter_mm"] == pytest.approx(np.hypot(109, 99))
    assert max_feret_diameter(np.array([[0.0, 0.0, 0.0]])) == 0.0


def test_large_volume_is_fast() -> None:
    array = np.zeros((300, 512, 512), np.uint8)
    z, y, x = np.ogrid[:300, :512, :512]
    array[((z - 150) / 120.0) ** 2 + ((y - 250) / 200.0) ** 2 + ((x - 260) / 180.0) ** 2 <= 1.0] = 1
    array[100:140, 50:90, 400:470] = 2
    start = time.perf_counter()
    spec = [{"name": "a", "value": 1}, {"name": "b", "value": 2}]
    rows = compute_measurements(Volume(array, spacing=(0.8, 0.8, 1.0)), spec)
    assert time.perf_counter() - start < 30.0
    assert abs(rows[0]["max_diameter_mm"] - 2 * 200 * 0.8) <= 1.0
    assert rows[1]["bbox_ijk"] == [[400, 50, 100], [469, 89, 139]]


def test_write_csv_and_json(tmp_path: Path, ct_small_labels: Path) -> None:
    labels = imageio.read_volume(ct_small_labels)
    rows = compute_measurements(labels, [{"name": "liver", "value": 5}, {"name": "absent", "value": 200}])
    write_measurements(tmp_path / "m.csv", rows)
    with open(tmp_path / "m.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(CSV_COLUMNS)
    assert table[0]["name"] == "liver" and int(table[0]["voxel_count"]) == rows[0]["voxel_count"]
    assert float(table[0]["volume_ml"]) == pytest.approx(rows[0]["volume_ml"], abs=1e-4)
    assert int(table[0]["bbox_k_max"]) == rows[0]["bbox_ijk"][1][2]
    assert table[1]["bbox_i_min"] == "" and table[1]["voxel_count"] == "0"
    write_measurements(tmp_path / "m.json", rows)
    assert json.loads((tmp_path / "m.json").read_text()) == rows
    with pytest.raises(MedSegAIInputError, match="exists; pass --overwrite"):
        write_measurements(tmp_path / "m.json", rows)
    with pytest.raises(MedSegAIInputError, match="must end with .csv or .json"):
        write_measurements(tmp_path / "m.xlsx", rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.json"]


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=3000),
    scale=st.tuples(*[st.floats(min_value=0.1, max_value=200.0)] * 3),
    shift=st.tuples(*[st.floats(min_value=-500.0, max_value=500.0)] * 3),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_feret_diameter_matches_brute_force(count: int, scale: tuple, shift: tuple, seed: int) -> None:
    points = np.random.default_rng(seed).normal(size=(count, 3)) * scale + shift
    assert max_feret_diameter(points) == pytest.approx(_brute_force_diameter(points), rel=1e-9, abs=1e-9)
