"""Is the uncertainty map worth a button? Error capture, region ranking, case ranking and cost (issue 15).

For every case with a reference (shared data) and the model that did not see its patient where
one exists (brain: the leave-one-patient-out fold models of ``bench_loop.py`` under
``--folds/fold-<patient>/model``; otherwise the shipped model, flagged ``trained_on``):

- three candidate maps, each with the prediction it comes with:
  ``entropy`` (normalised entropy of the single-pass softmax, plain prediction),
  ``entropy_tta`` (of the flip-TTA mean, TTA prediction) and
  ``mutual_info`` (``H(mean) − mean H(pass)`` over the three flip passes, TTA prediction);
- error capture: the fraction of error voxels (prediction ≠ reference) among the top 0.05 / 0.1 /
  0.2 / 0.5 / 1 % of voxels ranked by the map (ties in random order: the expected value), and the
  same for the baseline "a band of ±2 voxels around the predicted boundary, in random order";
- regions: the fraction of error voxels inside the first 5 and 10 regions of
  ``uncertain_regions.rank_regions`` (the panel's "Next uncertain region" order) — the regions'
  own voxels and, what the user sees around each jump, their bounding boxes;
- case ranking: Spearman correlation between candidate case scores and the case's Dice;
- cost: wall time and peak RSS of ``medsegai segment`` plain, ``--uncertainty`` and
  ``--uncertainty --tta`` in fresh processes (one case, and a synthetic 512×512×Z CT).

Prints JSON (``--json``) and a Markdown table. CPU: set MEDSEGAI_THREADS to the cores you may use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "MedSegAI"))
sys.path.insert(0, str(REPO_ROOT / "training"))
sys.path.insert(0, str(REPO_ROOT / "training" / "recipes"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"
BUDGETS = (0.0005, 0.001, 0.002, 0.005, 0.01)
MAPS = ("entropy", "entropy_tta", "mutual_info")
BAND_VOXELS = 2
# Region thresholds tried: the entropy of a two-class split p / 1 − p (0.99 = uncertain_level, the default).
REGION_SPLITS = (0.99, 0.9, 0.97)


# ---------------------------------------------------------------- regions (the panel's order)
def rank_regions_fallback(uncertainty: np.ndarray, threshold: int) -> list[np.ndarray]:
    """Minimal stand-in for ``uncertain_regions.rank_regions`` (used only when that module is absent):
    26-connected regions of ``map >= threshold``, most voxels first, then larger sum, then first voxel."""
    from scipy import ndimage

    components, count = ndimage.label(uncertainty >= threshold, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return []
    ids = components.ravel()
    sizes = np.bincount(ids, minlength=count + 1)[1:]
    sums = np.bincount(ids, weights=uncertainty.ravel().astype(np.float64), minlength=count + 1)[1:]
    order = sorted(range(count), key=lambda i: (-sizes[i], -sums[i], i))
    return [components == i + 1 for i in order[:10]]


def region_masks(uncertainty: np.ndarray, labels: np.ndarray, spacing: Sequence[float], threshold: int,
                 count: int = 10) -> tuple[list[np.ndarray], list[tuple[slice, ...]], str]:
    """The first ``count`` regions: voxel masks, bounding boxes, and which implementation ranked them."""
    try:
        from MedSegAILib.report.uncertain_regions import rank_regions
    except ImportError:
        masks = rank_regions_fallback(uncertainty, threshold)[:count]
        boxes = []
        from scipy import ndimage

        for mask in masks:
            boxes.append(ndimage.find_objects(mask.astype(np.uint8))[0])
        return masks, boxes, "bench fallback"
    from scipy import ndimage

    regions = rank_regions(uncertainty, labels, spacing, threshold=threshold, max_regions=count)
    components, _ = ndimage.label(uncertainty >= threshold, structure=np.ones((3, 3, 3), bool))
    masks, boxes = [], []
    for region in regions:
        box = tuple(slice(a, b) for a, b in region.bounds_zyx)
        z, y, x = region.centre_zyx
        masks.append(components == components[z, y, x])
        boxes.append(box)
    return masks, boxes, "MedSegAILib.report.uncertain_regions"


# ---------------------------------------------------------------- figures
def capture_curve(score: np.ndarray, errors: np.ndarray, budgets: Sequence[float]) -> list[float]:
    """Expected fraction of error voxels among the top ``b·N`` voxels by ``score`` (uint8), ties in random order."""
    total_errors = int(errors.sum())
    if total_errors == 0:
        return [1.0 for _ in budgets]
    all_hist = np.bincount(score.ravel(), minlength=256)[::-1].astype(np.float64)  # 255 first
    err_hist = np.bincount(score[errors].ravel(), minlength=256)[::-1].astype(np.float64)
    cum_all, cum_err = np.cumsum(all_hist), np.cumsum(err_hist)
    result = []
    for budget in budgets:
        k = budget * score.size
        level = int(np.searchsorted(cum_all, k, side="left"))  # first level whose cumulative count reaches k
        before_all = cum_all[level - 1] if level > 0 else 0.0
        before_err = cum_err[level - 1] if level > 0 else 0.0
        tie = all_hist[level] if level < 256 else 0.0
        got = before_err + (err_hist[level] * (k - before_all) / tie if tie else 0.0)
        result.append(round(float(got) / total_errors, 4))
    return result


def band_mask(labels: np.ndarray, width: int = BAND_VOXELS) -> np.ndarray:
    """Voxels within ``width`` voxels (Chebyshev) of a predicted boundary (a 6-neighbour with another label)."""
    from scipy import ndimage

    boundary = np.zeros(labels.shape, bool)
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        differ = labels[tuple(a)] != labels[tuple(b)]
        boundary[tuple(a)] |= differ
        boundary[tuple(b)] |= differ
    if not boundary.any():
        return boundary
    return ndimage.binary_dilation(boundary, structure=np.ones((2 * width + 1,) * 3, bool))


def band_curve(band: np.ndarray, errors: np.ndarray, budgets: Sequence[float]) -> list[float]:
    """Expected capture of "the band in random order, then the rest in random order"."""
    total = int(errors.sum())
    if total == 0:
        return [1.0 for _ in budgets]
    n, nb = errors.size, int(band.sum())
    eb = int(np.count_nonzero(errors & band))
    result = []
    for budget in budgets:
        k = budget * n
        got = eb * min(1.0, k / nb) if nb else 0.0
        if k > nb:
            got += (total - eb) * (k - nb) / max(1, n - nb)
        result.append(round(got / total, 4))
    return result


def dice(prediction: np.ndarray, reference: np.ndarray, values: Sequence[int]) -> float | None:
    scores = []
    for value in values:
        p, r = prediction == value, reference == value
        denominator = int(p.sum()) + int(r.sum())
        if denominator:
            scores.append(2.0 * int(np.count_nonzero(p & r)) / denominator)
    return round(float(np.mean(scores)), 4) if scores else None


# ---------------------------------------------------------------- cases
def brain_cases(shared: Path, folds: Path | None) -> list[dict[str, Any]]:
    from bench_loop import _read_mr, mr_studies
    from MedSegAILib.model.modelcard import find_model

    shipped = find_model("mr-brain-tumor")
    cases = []
    for patient, studies in mr_studies(shared).items():
        fold = folds / f"fold-{patient}" / "model" if folds is not None else None
        held_out = fold is not None and (fold / "model.json").is_file()
        for study in studies:
            cases.append({
                "name": f"{patient} {study.name}", "group": "brain", "model": fold if held_out else shipped,
                "trained_on": not held_out, "load": (lambda s=study: _read_mr(s)),
            })
    return cases


def ct_cases(shared: Path) -> list[dict[str, Any]]:
    from build_datasets import _map_totalsegmentator, _resample_nearest
    from MedSegAILib.io.imageio import read_volume
    from MedSegAILib.model.modelcard import find_model

    source = shared / "ct-abdomen"
    model = find_model("ct-abdomen-organs")

    def small() -> tuple[list[Any], Any]:
        image = read_volume(source / "example_ct_sm.nii.gz")
        return [image], image.with_array(_map_totalsegmentator(read_volume(source / "example_seg.nii.gz").array))

    def dicom() -> tuple[list[Any], Any]:
        image = read_volume(source / "example_ct_dicom")
        label = _resample_nearest(read_volume(source / "example_seg_dicom.nii.gz"), image)
        return [image], image.with_array(_map_totalsegmentator(label.array))

    return [{"name": "example_ct_sm", "group": "ct", "model": model, "trained_on": True, "load": small},
            {"name": "example_ct_dicom", "group": "ct", "model": model, "trained_on": True, "load": dicom}]


# ---------------------------------------------------------------- one case
def _flipped(predict: Callable[[np.ndarray], np.ndarray], axis: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(batch: np.ndarray) -> np.ndarray:
        return np.flip(predict(np.ascontiguousarray(np.flip(batch, axis=axis))), axis=axis)

    return run


def measure_case(case: dict[str, Any], predictor: Any, card: Any) -> dict[str, Any]:
    from MedSegAILib.inference.segment import SegmentOptions, segment_volumes
    from MedSegAILib.inference.ranking import case_score
    from MedSegAILib.inference.uncertainty import uncertain_level
    from MedSegAILib.inference.validation import check_channels

    images, reference = case["load"]()
    images = check_channels(images, card.channel_names)
    reference = np.asarray(reference.array)
    shape = np.asarray(images[0].array).shape
    values = [int(label.value) for label in card.labels]
    level = uncertain_level(card.num_classes)
    dims = 2 if card.spatial.mode == "2d" else 3

    def run(predict: Callable[[np.ndarray], np.ndarray], tta: bool) -> tuple[np.ndarray, np.ndarray, float]:
        uncertainty = np.zeros(shape, np.uint8)
        started = time.perf_counter()
        labels = segment_volumes(images, card, predict, SegmentOptions(tta=tta), uncertainty=uncertainty)
        return np.asarray(labels.array), uncertainty, time.perf_counter() - started

    plain_labels, plain_map, _ = run(predictor.predict, False)
    tta_labels, tta_map, _ = run(predictor.predict, True)
    passes = [plain_map] + [run(_flipped(predictor.predict, axis), False)[1] for axis in range(1, 1 + dims)]
    mean_pass = np.mean([p.astype(np.float32) for p in passes], axis=0)
    mutual = np.clip(np.rint(tta_map.astype(np.float32) - mean_pass), 0, 255).astype(np.uint8)
    maps = {"entropy": (plain_map, plain_labels), "entropy_tta": (tta_map, tta_labels), "mutual_info": (mutual, tta_labels)}

    row: dict[str, Any] = {"case": case["name"], "group": case["group"], "model": f"{card.id} {card.version}",
                           "trained_on": case["trained_on"], "voxels": int(np.prod(shape)), "level": level}
    for name, (score, labels) in maps.items():
        errors = labels != reference
        band = band_mask(labels)
        masks, boxes, ranker = region_masks(score, labels, images[0].spacing, level)
        figures: dict[str, Any] = {
            "dice": dice(labels, reference, values), "error_voxels": int(errors.sum()),
            "error_fraction": round(float(errors.mean()), 5),
            "capture": capture_curve(score, errors, BUDGETS), "band": band_curve(band, errors, BUDGETS),
            "band_voxels_fraction": round(float(band.mean()), 4), "regions": len(masks), "region_ranker": ranker,
        }
        total = max(1, int(errors.sum()))
        for first in (5, 10):
            inside = np.zeros(shape, bool)
            seen = np.zeros(shape, bool)
            for mask, box in zip(masks[:first], boxes[:first]):
                inside |= mask
                seen[box] = True
            figures[f"regions{first}_voxels"] = round(int(np.count_nonzero(errors & inside)) / total, 4)
            figures[f"regions{first}_boxes"] = round(int(np.count_nonzero(errors & seen)) / total, 4)
            figures[f"regions{first}_box_fraction"] = round(float(seen.mean()), 4)
            figures[f"regions{first}_voxel_fraction"] = round(float(inside.mean()), 5)
        for split in REGION_SPLITS[1:]:  # lower region thresholds: bigger regions for the panel to visit
            sweep_masks, _, _ = region_masks(score, labels, images[0].spacing, uncertain_level(card.num_classes, split))
            for first in (5, 10):
                inside = np.zeros(shape, bool)
                for mask in sweep_masks[:first]:
                    inside |= mask
                figures[f"regions{first}_voxels@{split}"] = round(int(np.count_nonzero(errors & inside)) / total, 4)
                figures[f"regions{first}_voxel_fraction@{split}"] = round(float(inside.mean()), 5)
        labels_volume = images[0].with_array(labels)
        figures["score"] = case_score(labels_volume, images[0].with_array(score), card.num_classes).__dict__
        figures["score"]["mean_map"] = round(float(score.mean()) / 255, 6)
        figures["score"]["uncertain_fraction"] = round(float((score >= level).mean()), 6)
        for split in REGION_SPLITS[1:]:
            sweep_level = uncertain_level(card.num_classes, split)
            uncertain = int(np.count_nonzero(score >= sweep_level))
            foreground = int(np.count_nonzero(labels))
            figures["score"][f"expected_error@{split}"] = round(uncertain / max(1, uncertain + foreground), 6)
        row[name] = figures
    return row


# ---------------------------------------------------------------- cost
# A small launcher process runs the command: a child forked straight from this (large) process would
# report this process's peak RSS as its own (Linux carries the high-water mark across fork + exec).
_LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(process.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": usage.ru_maxrss / 1024,
                  "code": os.waitstatus_to_exitcode(status), "stderr": process.stderr.read().decode()[-500:]}))
"""


def _child(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "MedSegAI"), str(REPO_ROOT / "training"), env.get("PYTHONPATH", "")])
    result = json.loads(subprocess.run([sys.executable, "-c", _LAUNCHER, *command], env=env, check=True,
                                       capture_output=True, text=True).stdout)
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result['stderr']}")
    return round(result["seconds"], 2), round(result["peak_mb"], 1)


def measure_cost(inputs: list[str], model: str, label: str, repeats: int) -> dict[str, Any]:
    row: dict[str, Any] = {"input": label, "model": model}
    with tempfile.TemporaryDirectory() as work:
        for name, extra in (("plain", []), ("uncertainty", ["--uncertainty", "u.nrrd"]),
                            ("plain_tta", ["--tta"]), ("uncertainty_tta", ["--uncertainty", "u.nrrd", "--tta"])):
            times, peaks = [], []
            for _ in range(repeats):
                command = [sys.executable, "-m", "MedSegAILib.cli", "segment", *inputs, "-o", str(Path(work) / "l.nrrd"),
                           "--model", model, "--progress", "none", "--overwrite"]
                command += [str(Path(work) / e) if e == "u.nrrd" else e for e in extra]
                seconds, peak = _child(command)
                times.append(seconds)
                peaks.append(peak)
            row[f"{name}_s"], row[f"{name}_peak_mb"] = float(np.median(times)), max(peaks)
    row["uncertainty_time_ratio"] = round(row["uncertainty_s"] / row["plain_s"], 2)
    row["uncertainty_tta_time_ratio"] = round(row["uncertainty_tta_s"] / row["plain_s"], 2)
    return row


# ---------------------------------------------------------------- report
def spearman(rows: list[dict[str, Any]], group: str | None) -> dict[str, Any]:
    from scipy.stats import spearmanr

    result: dict[str, Any] = {}
    chosen = [r for r in rows if group is None or r["group"] == group]
    for name in MAPS:
        dices = [r[name]["dice"] for r in chosen]
        for key in ("expected_error", "uncertain_ml", "mean_uncertainty", "mean_map", "uncertain_fraction",
                    *(f"expected_error@{split}" for split in REGION_SPLITS[1:])):
            scores = [r[name]["score"][key] for r in chosen]
            if len(chosen) < 3 or any(d is None for d in dices):
                result[f"{name}:{key}"] = None
                continue
            rho = spearmanr(scores, dices).statistic
            result[f"{name}:{key}"] = None if rho != rho else round(float(rho), 3)
    return {"group": group or "all", "cases": len(chosen), "rho": result}


def table(rows: list[dict[str, Any]], name: str) -> str:
    head = ("| case | model | Dice | errors | " + " | ".join(f"{b * 100:g}%: map / band" for b in BUDGETS)
            + " | errors in first 5 regions | first 10 (share of volume) | expected error |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f = r[name]
        cells = " | ".join(f"{c:.2f} / {b:.2f}" for c, b in zip(f["capture"], f["band"]))
        model = r["model"] + (" (trained on it)" if r["trained_on"] else " (held out)")
        lines.append(f"| {r['case']} | {model} | {f['dice']} | {f['error_voxels']} | {cells} | "
                     f"{f['regions5_voxels']:.2f} | {f['regions10_voxels']:.2f} ({f['regions10_voxel_fraction'] * 100:.2f}%) | "
                     f"{f['score']['expected_error']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--folds", type=Path, default=Path("/work/cache/loop/mr"),
                        help="folder holding fold-<patient>/model brain fold models (bench_loop.py)")
    parser.add_argument("--only", choices=("brain", "ct"), default=None)
    parser.add_argument("--cases", nargs="*", default=None, metavar="TEXT", help="only cases whose name contains one of these")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--cost-slices", type=int, default=100, help="Z of the synthetic 512x512xZ CT for the cost run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from MedSegAILib.model.backends import load_predictor
    from MedSegAILib.model.modelcard import ModelCard

    cases = []
    if args.cost_only:
        args.only = "none"
    if args.only in (None, "brain"):
        cases += brain_cases(args.shared, args.folds if args.folds.is_dir() else None)
    if args.only in (None, "ct"):
        cases += ct_cases(args.shared)
    if args.cases:
        cases = [case for case in cases if any(text in case["name"] for text in args.cases)]
    rows, loaded = [], {}
    for case in cases:
        folder = str(case["model"] if isinstance(case["model"], Path) else case["model"].folder)
        if folder not in loaded:
            card = ModelCard.from_folder(folder)
            loaded = {folder: (card, load_predictor(card))}  # one network in memory at a time
        card, predictor = loaded[folder]
        started = time.perf_counter()
        row = measure_case(case, predictor, card)
        row["model_folder"] = folder
        row["bench_seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result: dict[str, Any] = {"budgets": BUDGETS, "rows": rows,
                              "spearman": [spearman(rows, "brain"), spearman(rows, "ct"), spearman(rows, None)]}
    if not args.skip_cost:
        from _common import synthetic_ct

        costs = []
        if args.only in (None, "brain", "none"):
            study = Path(args.shared) / "mr-brain-tumor" / "PGBM-003" / "1995-03-29"
            costs.append(measure_cost([str(study / f"{c}.nrrd") for c in ("T1post", "T1prereg", "FLAIR")],
                                      "mr-brain-tumor", "PGBM-003 1995-03-29 (3 channels)", args.repeats))
        with tempfile.TemporaryDirectory() as work:
            ct = synthetic_ct((512, 512, args.cost_slices), Path(work) / "ct.nrrd")
            costs.append(measure_cost([str(ct)], "ct-abdomen-organs", f"synthetic CT 512x512x{args.cost_slices}", args.repeats))
        result["cost"] = costs
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for name in MAPS:
        print(f"\n### {name}\n")
        print(table(rows, name))
    print("\n### Spearman (score vs Dice)\n")
    print(json.dumps(result["spearman"], indent=1))
    if "cost" in result:
        print("\n### Cost\n")
        print(json.dumps(result["cost"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
