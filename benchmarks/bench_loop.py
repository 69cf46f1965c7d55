"""The correct → export → fine-tune loop as a user lives it, measured on ``../shared/data``.

    python benchmarks/bench_loop.py [--shared ../shared/data] [--cache benchmarks/.cache/loop]
                                    [--only mr|ct] [--json FILE] [--fine-tune-config FILE --tag T] [--oracle]

Brain (``mr-brain-tumor`` recipe, channels T1post, T1prereg, FLAIR): for each patient with two
studies (PGBM-001, PGBM-003)

1. the "before" model is that patient's cross-validation fold model: the shipped recipe trained on
   the *other* patients only (leave-one-patient-out, as ``training/recipes/build_models.py`` does),
   with fewer steps (``--fold-epochs``; fold models are not kept in the repository, so this script
   trains them once and caches them under ``--cache``);
2. it segments the earlier study; the reference mask (``MaskTumor``) plays the user's corrected
   segmentation and is exported as a dataset case with ``MedSegAILib.data.dataset.add_case`` (the Slicer
   export's function), recording how many voxels the correction changed;
3. ``medsegai train FT -o NEW --init FOLD_MODEL`` fine-tunes with the default plan (no other option,
   what the panel's Fine-tune runs), timed;
4. both models segment the later study and the other patients' studies; Dice against the masks.

CT (``ct-abdomen-organs``): there are two labelled CT patients and no second study. The model is
fine-tuned on the upper half of ``example_ct_sm``'s labelled slab (slices 15-29) and measured on the
lower half (slices 0-14, same patient, slices the fine-tune never saw) and on the other patient
``example_ct_dicom`` (does it forget?). The "before" model is by default the *shipped* model, which
was trained on both patients (so its "before" is a training-fit figure and the CT row measures
mainly forgetting); ``--fold-epochs-ct N`` trains a fold model on ``example_ct_dicom`` only instead
(about 4× the brain fold's cost per step). Liver Dice (the model's main organ) and the mean over labels
present in the reference are reported.

``--oracle`` (brain) fine-tunes on the later study itself instead of the earlier one: what the loop
could gain at best with the same plan, since no fine-tune on the earlier study should beat one on the
very study it is measured on.

Prints one JSON object and a Markdown table. Everything is CPU-heavy (about 25 min on 2 cores the
first time, fine-tunes and evaluations only once the fold models are cached): run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "MedSegAI"))
sys.path.insert(0, str(REPO_ROOT / "training"))
sys.path.insert(0, str(REPO_ROOT / "training" / "recipes"))

DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CACHE = REPO_ROOT / "benchmarks" / ".cache" / "loop"
MR_CHANNELS = ("T1post", "T1prereg", "FLAIR")
LOOP_PATIENTS = ("PGBM-001", "PGBM-003")
CT_LABELS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "stomach": 5, "aorta": 6}
CT_SPLIT = 15  # example_ct_sm slices [0, 15) = measured, [15, 30) = fine-tuned on


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "MedSegAI"), str(REPO_ROOT / "training"),
                                         env.get("PYTHONPATH", "")])
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def medsegai(*args: str, log: Path | None = None) -> float:
    """Run ``medsegai ARGS`` in a child process; returns its wall-clock seconds."""
    started = time.monotonic()
    command = [sys.executable, "-m", "MedSegAILib.cli", *args]
    print("$ medsegai " + " ".join(args), file=sys.stderr, flush=True)
    if log is None:
        subprocess.run(command, check=True, env=_env())
    else:
        with open(log, "w", encoding="utf-8") as handle:
            result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=_env())
        if result.returncode != 0:
            raise RuntimeError(f"medsegai {' '.join(args)} failed (exit {result.returncode}); see {log}")
    return time.monotonic() - started


def _series(study: Path, name: str) -> Path:
    for candidate in (study / f"{name}.nrrd", study / "dicom" / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{study} has no {name} series")


def mr_studies(shared: Path) -> dict[str, list[Path]]:
    """Patient -> its complete studies (all three channels and the mask), oldest first."""
    root = shared / "mr-brain-tumor"
    found: dict[str, list[Path]] = {}
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        for study in sorted(s for s in patient.iterdir() if s.is_dir()):
            try:
                [_series(study, n) for n in (*MR_CHANNELS, "MaskTumor")]
            except FileNotFoundError:
                continue
            found.setdefault(patient.name, []).append(study)
    return found


def _read_mr(study: Path) -> tuple[list[Any], Any]:
    from MedSegAILib.io.imageio import read_volume

    images = [read_volume(_series(study, n)) for n in MR_CHANNELS]
    mask = read_volume(_series(study, "MaskTumor"))
    return images, mask.with_array((np.asarray(mask.array) > 0).astype(np.uint8))


def _ct_cases(shared: Path) -> dict[str, tuple[list[Any], Any, str]]:
    """name -> (images, label, patient key): the two halves of example_ct_sm and example_ct_dicom."""
    from build_datasets import _map_totalsegmentator, _resample_nearest
    from MedSegAILib.io.imageio import read_volume

    source = shared / "ct-abdomen"
    image = read_volume(source / "example_ct_sm.nii.gz")
    label = image.with_array(_map_totalsegmentator(read_volume(source / "example_seg.nii.gz").array))
    cases = {}
    for name, rows in (("sm_lower", slice(0, CT_SPLIT)), ("sm_upper", slice(CT_SPLIT, None))):
        part = _crop_z(image, rows)
        cases[name] = ([part], part.with_array(np.ascontiguousarray(label.array[rows])), "example_ct")
    dicom = read_volume(source / "example_ct_dicom")
    dicom_label = _resample_nearest(read_volume(source / "example_seg_dicom.nii.gz"), dicom)
    cases["dicom"] = ([dicom], dicom.with_array(_map_totalsegmentator(dicom_label.array)), "example_ct_dicom")
    return cases


def _crop_z(volume: Any, rows: slice) -> Any:
    """The slab ``rows`` of a volume (array ``(z, y, x)``) with its origin moved to the first slice."""
    import dataclasses

    start = rows.start or 0
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(volume.origin, dtype=float) + direction[:, 2] * float(volume.spacing[2]) * start
    return dataclasses.replace(volume, array=np.ascontiguousarray(volume.array[rows]), origin=tuple(origin.tolist()))


def segment(model: Path, images: list[Any], work: Path, name: str) -> np.ndarray:
    """Labels of ``images`` by ``model`` through the engine (the CLI's path), ``(z, y, x)``."""
    from MedSegAILib.io.imageio import read_volume, write_volume
    from MedSegAILib.inference.pipeline import run_segmentation

    folder = work / "inputs" / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"channel_{i}.nrrd"
        if not path.is_file():
            write_volume(path, image)
        paths.append(path)
    out = work / "segmentations" / f"{name}--{model.parent.name}-{model.name}.nrrd"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not model.parent.name.startswith("fold-"):  # only the cached fold models' labels are reused
        out.unlink(missing_ok=True)
    if not out.is_file():
        run_segmentation(paths, out, model=str(model))
    return np.asarray(read_volume(out).array)


def dice_scores(prediction: np.ndarray, reference: np.ndarray, labels: dict[str, int]) -> dict[str, float | None]:
    from medsegai_training.evaluate import dice

    scores: dict[str, float | None] = {}
    for name, value in labels.items():
        ref = reference == value
        scores[name] = round(float(dice(prediction == value, ref)), 4) if ref.any() else None
    return scores


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return round(float(np.mean(finite)), 4) if finite else None


def train_fold(dataset: Path, recipe: dict[str, Any], test_cases: list[str], folder: Path, epochs: int) -> Path:
    """The fold model (trained without ``test_cases``), cached in ``folder/model``."""
    from build_models import INFERENCE_PATCH, set_inference_patch

    model = folder / "model"
    if (model / "model.json").is_file():
        return model
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    fold_recipe = dict(recipe, test_cases=test_cases, validation_fraction=0.0, epochs=epochs)
    (folder / "recipe.json").write_text(json.dumps(fold_recipe, indent=2), encoding="utf-8")
    seconds = medsegai("train", str(dataset), "-o", str(model), "--config", str(folder / "recipe.json"),
                       "--progress", "none", log=folder / "train.log")
    set_inference_patch(model, INFERENCE_PATCH.get(recipe["model_id"]))
    (folder / "seconds.txt").write_text(f"{seconds:.1f}\n")
    return model


def fine_tune(parent: Path, images: list[Any], reference: Any, before: np.ndarray, channels: list[str],
              labels: dict[str, int], patient: str, work: Path,
              recipe: Path | None = None) -> tuple[Path, float, dict[str, Any]]:
    """Export the corrected case like the Slicer panel, then ``medsegai train --init`` with the defaults."""
    from MedSegAILib.data.dataset import add_case

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    card = json.loads((parent / "model.json").read_text(encoding="utf-8"))
    changed = int(np.count_nonzero(before != np.asarray(reference.array)))
    add_case(work / "dataset", images, reference, channels, labels, patient_key=patient,
             source_model={"id": card["id"], "version": card["version"]}, changed_voxels=changed)
    plan_text = subprocess.run(
        [sys.executable, "-m", "MedSegAILib.cli", "train", str(work / "dataset"), "-o", str(work / "model"),
         "--init", str(parent), "--plan"], check=True, capture_output=True, text=True, env=_env()).stdout
    extra = ["--config", str(recipe)] if recipe else []
    cpu = _children_cpu()
    seconds = medsegai("train", str(work / "dataset"), "-o", str(work / "model"), "--init", str(parent),
                       "--progress", "none", *extra, log=work / "train.log")
    cpu = _children_cpu() - cpu
    new_card = json.loads((work / "model" / "model.json").read_text(encoding="utf-8"))
    training = new_card.get("training", {})
    return work / "model", seconds, {
        "changed_voxels": changed,
        "fine_tune_cpu_seconds": round(cpu, 1),
        "plan": json.loads(plan_text),
        "epochs_run": training.get("epochs_run"),
        "stopped_early": training.get("stopped_early"),
        "onnx": "onnx" in new_card.get("files", {}),
        "fine_tune_recipe": json.loads(recipe.read_text(encoding="utf-8")) if recipe else None,
        "learning_rate": training.get("config", {}).get("optimizer", {}).get("learning_rate"),
        "freeze_encoder": training.get("config", {}).get("freeze_encoder"),
        "steps_run": int(training.get("epochs_run") or 0) * int(training.get("steps_per_epoch") or 0),
        "onnx_max_abs_diff": new_card.get("provenance", {}).get("onnx_max_abs_diff"),
        "onnx_label_agreement": new_card.get("provenance", {}).get("onnx_label_agreement"),
    }


def bench_mr(shared: Path, cache: Path, fold_epochs: int, patients: Sequence[str] = LOOP_PATIENTS,
             recipe_override: Path | None = None, tag: str = "", oracle: bool = False) -> list[dict[str, Any]]:
    from MedSegAILib.data.dataset import add_case, load_dataset

    studies = mr_studies(shared)
    recipe = json.loads((REPO_ROOT / "training" / "recipes" / "mr-brain-tumor.json").read_text(encoding="utf-8"))
    recipe.pop("$comment", None)
    dataset = cache / "mr" / "dataset"
    if not (dataset / "dataset.json").is_file():
        shutil.rmtree(dataset, ignore_errors=True)
        for patient, folders in studies.items():
            for study in folders:
                images, mask = _read_mr(study)
                add_case(dataset, images, mask, list(MR_CHANNELS), {"tumor": 1}, patient_key=patient)
    info = load_dataset(dataset)
    case_ids = [c.id for c in info.cases]
    order = [(p, s) for p, folders in studies.items() for s in folders]
    case_of = {f"{p}/{s.name}": case_ids[i] for i, (p, s) in enumerate(order)}
    labels = {"tumor": 1}
    rows = []
    for patient in patients:
        earlier, later = studies[patient][0], studies[patient][-1]
        if oracle:  # the bound: the fine-tune sees the very study it is measured on
            earlier = later
        test = [case_of[f"{patient}/{s.name}"] for s in studies[patient]]
        fold = train_fold(dataset, recipe, test, cache / "mr" / f"fold-{patient}", fold_epochs)
        work = cache / "mr" / f"loop-{patient}{'-oracle' if oracle else ''}{tag}"
        images, reference = _read_mr(earlier)
        before_earlier = segment(fold, images, cache / "mr", f"{patient}-{earlier.name}")
        tuned, seconds, info_ft = fine_tune(fold, images, reference, before_earlier, list(MR_CHANNELS), labels,
                                            patient, work, recipe_override)
        later_images, later_ref = _read_mr(later)
        row: dict[str, Any] = {
            "model": "mr-brain-tumor", "patient": patient, "fine_tuned_on": f"{patient} {earlier.name}",
            "measured_on": f"{patient} {later.name}", "fine_tune_seconds": round(seconds, 1),
            "before_model": f"fold model: shipped recipe, {fold_epochs}x32 steps, trained without {patient}",
            "earlier_dice_before": dice_scores(before_earlier, np.asarray(reference.array), labels)["tumor"],
            **info_ft,
        }
        for when, model in (("before", fold), ("after", tuned)):
            pred = segment(model, later_images, cache / "mr", f"{patient}-{later.name}")
            row[f"later_dice_{when}"] = dice_scores(pred, np.asarray(later_ref.array), labels)["tumor"]
        others: dict[str, dict[str, Any]] = {}
        for other, folders in studies.items():
            if other == patient:
                continue
            for study in folders:
                o_images, o_ref = _read_mr(study)
                key = f"{other} {study.name}"
                others[key] = {}
                for when, model in (("before", fold), ("after", tuned)):
                    pred = segment(model, o_images, cache / "mr", f"{other}-{study.name}")
                    others[key][when] = dice_scores(pred, np.asarray(o_ref.array), labels)["tumor"]
        row["others"] = others
        row["others_mean_before"] = _mean([v["before"] for v in others.values()])
        row["others_mean_after"] = _mean([v["after"] for v in others.values()])
        row["others_worst_change"] = min(round(v["after"] - v["before"], 4) for v in others.values())
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def bench_ct(shared: Path, cache: Path, fold_epochs: int, recipe_override: Path | None = None,
             tag: str = "") -> list[dict[str, Any]]:
    from MedSegAILib.data.dataset import add_case, load_dataset

    cases = _ct_cases(shared)
    recipe = json.loads((REPO_ROOT / "training" / "recipes" / "ct-abdomen-organs.json").read_text(encoding="utf-8"))
    recipe.pop("$comment", None)
    dataset = cache / "ct" / "dataset"
    if not (dataset / "dataset.json").is_file():
        shutil.rmtree(dataset, ignore_errors=True)
        for name in ("sm_lower", "sm_upper", "dicom"):
            images, label, patient = cases[name]
            add_case(dataset, images, label, ["CT"], CT_LABELS, patient_key=patient)
    ids = [c.id for c in load_dataset(dataset).cases]  # sm_lower, sm_upper, dicom
    if fold_epochs > 0:
        fold = train_fold(dataset, recipe, ids[:2], cache / "ct" / "fold-example_ct", fold_epochs)
    else:  # the shipped model (it saw both patients: "before" is optimistic on example_ct_sm)
        from MedSegAILib.model.modelcard import find_model

        fold = find_model("ct-abdomen-organs").folder
    images, reference, patient = cases["sm_upper"]
    before_upper = segment(fold, images, cache / "ct", "sm_upper")
    tuned, seconds, info_ft = fine_tune(fold, images, reference, before_upper, ["CT"], CT_LABELS, patient,
                                        cache / "ct" / f"loop-example_ct{tag}", recipe_override)
    row: dict[str, Any] = {"model": "ct-abdomen-organs", "patient": "example_ct",
                           "before_model": "fold model (trained on example_ct_dicom only)" if fold_epochs > 0
                           else "shipped ct-abdomen-organs (trained on both patients)",
                           "fine_tuned_on": "example_ct_sm slices 15-29", "measured_on": "example_ct_sm slices 0-14",
                           "fine_tune_seconds": round(seconds, 1), **info_ft}
    for name, prefix in (("sm_lower", "later"), ("dicom", "other")):
        images, reference, _ = cases[name]
        for when, model in (("before", fold), ("after", tuned)):
            scores = dice_scores(segment(model, images, cache / "ct", name), np.asarray(reference.array), CT_LABELS)
            row[f"{prefix}_dice_{when}"] = scores["liver"]
            row[f"{prefix}_mean_dice_{when}"] = _mean(list(scores.values()))
            row[f"{prefix}_per_label_{when}"] = scores
    row["others"] = {"example_ct_dicom": {"before": row["other_dice_before"], "after": row["other_dice_after"]}}
    row["others_mean_before"], row["others_mean_after"] = row["other_dice_before"], row["other_dice_after"]
    row["others_worst_change"] = round(row["other_dice_after"] - row["other_dice_before"], 4)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return [row]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | fine-tuned on (corrected voxels) | measured on | Dice before → after | fine-tune time | "
        "other patients' Dice before → after (worst change) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['fine_tuned_on']} ({r['changed_voxels']}) | {r['measured_on']} | "
            f"{r['later_dice_before']:.3f} → **{r['later_dice_after']:.3f}** ({r['later_dice_after'] - r['later_dice_before']:+.3f}) | "
            f"{r['fine_tune_seconds']:.0f} s wall, {r['fine_tune_cpu_seconds']:.0f} CPU-s ({r['plan']['steps']} steps "
            f"planned, {r['epochs_run']} epochs run) | "
            f"{r['others_mean_before']:.3f} → {r['others_mean_after']:.3f} ({r['others_worst_change']:+.3f}) |"
        )
    mr = [r for r in rows if r["model"] == "mr-brain-tumor"]
    if mr:
        gain = np.mean([r["later_dice_after"] - r["later_dice_before"] for r in mr])
        lines.append(f"\nbrain: mean Dice change on the later study {gain:+.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("MEDSEGAI_SHARED_DATA", DEFAULT_SHARED)))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--only", choices=("mr", "ct"), default=None)
    parser.add_argument("--fold-epochs-mr", type=int, default=12, help="epochs (of 32 steps) of the brain fold models")
    parser.add_argument("--fold-epochs-ct", type=int, default=0,
                        help="epochs (of 32 steps) of the CT fold model; 0 (default) starts from the shipped model")
    parser.add_argument("--patients", nargs="+", default=list(LOOP_PATIENTS), help="brain patients to loop over")
    parser.add_argument("--fine-tune-config", type=Path, default=None,
                        help="recipe keys that replace the default fine-tuning plan (to compare settings)")
    parser.add_argument("--tag", default="", help="suffix of the fine-tune folders (keeps variants apart)")
    parser.add_argument("--oracle", action="store_true",
                        help="brain: fine-tune on the later study itself (an upper bound of what the loop can gain)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("MEDSEGAI_THREADS", "2")
    args.cache.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.only in (None, "mr"):
        rows += bench_mr(args.shared, args.cache, args.fold_epochs_mr, args.patients, args.fine_tune_config, args.tag,
                         args.oracle)
    if args.only in (None, "ct"):
        rows += bench_ct(args.shared, args.cache, args.fold_epochs_ct, args.fine_tune_config, args.tag)
    result = {"rows": rows, "fold_epochs": {"mr": args.fold_epochs_mr, "ct": args.fold_epochs_ct}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
